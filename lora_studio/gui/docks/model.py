"""The base model panel: pick a model, see whether it fits BEFORE loading, load it with progress and Cancel."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.model.dtypes import DTYPES
from lora_studio.core.model.estimate import MemoryEstimate
from lora_studio.core.model.placement import PlannedPlacement, parse_max_memory, plan_placement
from lora_studio.core.model.quantize import QUANTIZE_CHOICES, Quantize
from lora_studio.core.session import SessionState
from lora_studio.core.system.devices import Devices
from lora_studio.core.system.memory import format_bytes
from lora_studio.gui.base.jobs import Job
from lora_studio.gui.base.panel import Panel
from lora_studio.gui.base.widgets import MessageLine, ask_yes_no, names_shown

if TYPE_CHECKING:
    from lora_studio.core.errors import ErrorDescription
    from lora_studio.core.model.sources import ModelSource
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import CancelToken, Report
    from lora_studio.gui.base.context import TabContext

VERDICT_TEXT = {
    "fits": ("✔ fits", "ok"),
    "offload": ("⚠ will offload", "warn"),
    "does_not_fit": ("✖ does not fit", "error"),
}


def format_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


class ModelPanel(Panel):
    loaded = Signal(object)  # SessionState after a successful load
    load_failed = Signal(object)  # ErrorDescription

    def __init__(
        self, ctx: TabContext, gpu_count: int = 0, parent: QWidget | None = None, *, mps: bool = False
    ) -> None:
        super().__init__(ctx, parent)
        self.estimate: MemoryEstimate | None = None
        self.placement_plan: PlannedPlacement | None = None  # accelerate's share of each device, under the limits
        self.load_job: Job | None = None
        self.saved_model_folders: list[Path] = []  # where this window saved merged models: listed "on this machine"
        # loading another base detaches the adapters: asked first (tests answer it)
        self.confirm_replace_base: Callable[[Sequence[str]], bool] = self._ask_replace_base

        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("model folder, .gguf file, or cached repo id")
        self.source_edit.setClearButtonEnabled(True)
        folder_btn = QPushButton("Folder…")
        folder_btn.setToolTip("Pick a Hugging Face model folder (config.json + .safetensors)")
        folder_btn.clicked.connect(self.browse_folder)
        gguf_btn = QPushButton("GGUF…")
        gguf_btn.setToolTip("Pick a .gguf model file (dequantised on load)")
        gguf_btn.clicked.connect(self.browse_gguf)
        pick_row = QHBoxLayout()
        pick_row.addWidget(self.source_edit, 1)
        pick_row.addWidget(folder_btn)
        pick_row.addWidget(gguf_btn)

        self.local_list = QListWidget()
        self.local_list.setMinimumHeight(44)  # about two rows; it takes what height the dock has left
        self.local_list.setToolTip(
            "Models on this machine: the demo and the local Hugging Face cache (never downloads)"
        )
        self.local_list.itemClicked.connect(self._pick_local)
        self.local_list.itemDoubleClicked.connect(self._load_local)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh_local)
        local_head = QHBoxLayout()
        local_head.addWidget(QLabel("On this machine:"))
        local_head.addStretch(1)
        local_head.addWidget(refresh)

        self.dtype_combo = QComboBox()
        self.dtype_combo.addItems(DTYPES)
        self.dtype_combo.setToolTip("Precision of the weights in memory; bfloat16/float16 halve the memory of float32")
        self.device_combo = QComboBox()
        self.device_combo.addItems(Devices(gpu_count, mps).choices())
        self.device_combo.setToolTip(
            "cpu, one GPU, mps (Apple silicon: the GPU shares the RAM), or auto (spread over GPUs and RAM)"
            if mps
            else "cpu, one GPU, or auto (spread over GPUs and RAM)"
        )
        self.quantize_combo = QComboBox()
        self.quantize_combo.addItem("none", None)
        for kind in QUANTIZE_CHOICES:
            self.quantize_combo.addItem(kind, kind)
        self.quantize_combo.setToolTip(
            "Quantize the base on load (bitsandbytes): its linear weights in 4 bits (nf4, fp4) or 8 (int8), "
            "computing in the dtype; adapters attach, switch and compare on it as on any base"
        )
        self.max_memory_edit = QLineEdit()
        self.max_memory_edit.setPlaceholderText("one device")
        self.max_memory_edit.setToolTip(
            "Each device's limit, e.g. cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB: accelerate places the layers (the "
            "estimate shows each device's share), and what is left goes to disk. Empty: the whole model on the device"
        )
        # dtype and device on one row, quantize under them: the column stays narrow (no sideways scrolling) and the
        # Load button and the Loaded box stay in view on a 720-pixel screen (the model list gives up the height)
        form = QGridLayout()
        for row, column, text, combo in (
            (0, 0, "dtype", self.dtype_combo),
            (0, 2, "device", self.device_combo),
            (1, 0, "quant", self.quantize_combo),
            (1, 2, "limits", self.max_memory_edit),
        ):
            label = QLabel(text)
            label.setBuddy(combo)
            form.addWidget(label, row, column)
            form.addWidget(combo, row, column + 1)
        form.setColumnStretch(1, 1)
        form.setColumnStretch(3, 1)
        for combo in (self.dtype_combo, self.device_combo, self.quantize_combo):
            # "bfloat16" elides in a narrow column rather than making it scroll sideways
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(1)

        self.verdict_label = MessageLine()
        self.verdict_label.show_message("pick a model to see whether it fits")
        self.detail_label = QLabel("")
        self.detail_label.setWordWrap(True)
        self.detail_label.setStyleSheet("color: palette(mid);")

        self.load_btn = QPushButton("Load")
        self.load_btn.setDefault(True)
        self.load_btn.clicked.connect(self.load)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel_load)
        # the load's progress between Load and Cancel (its place kept while hidden), not on a row of its own
        self.progress.setMinimumWidth(40)  # it elides its text: the column stays narrow at 1000 pixels
        for button in (folder_btn, gguf_btn, refresh, self.load_btn, self.cancel_btn):
            button.setMinimumWidth(64)  # under the style's 80 pixels: the column fits a 1000-pixel window whole
        btn_row = QHBoxLayout()
        btn_row.addWidget(self.load_btn)
        btn_row.addWidget(self.progress, 1)
        btn_row.addWidget(self.cancel_btn)
        self.loaded_label = QLabel("No base model loaded.")
        self.loaded_label.setWordWrap(True)
        self.loaded_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        pick_box = QGroupBox("Choose a model")
        pick_layout = QVBoxLayout(pick_box)
        pick_layout.addLayout(pick_row)
        pick_layout.addLayout(local_head)
        pick_layout.addWidget(self.local_list, 1)
        pick_layout.addLayout(form)
        est_box = QGroupBox("Memory estimate")
        est_layout = QVBoxLayout(est_box)
        est_layout.addWidget(self.verdict_label)
        est_layout.addWidget(self.detail_label)
        state_box = QGroupBox("Loaded")
        state_layout = QVBoxLayout(state_box)
        state_layout.addWidget(self.loaded_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(pick_box, 1)
        layout.addWidget(est_box)
        layout.addLayout(btn_row)
        layout.addWidget(self.message)
        layout.addWidget(state_box)

        self._estimate_timer = QTimer(self, singleShot=True, interval=300)  # debounce typing
        self._estimate_timer.timeout.connect(self.update_estimate)
        self.source_edit.textChanged.connect(lambda _: self._estimate_timer.start())
        self.dtype_combo.currentTextChanged.connect(lambda _: self._estimate_timer.start())
        self.device_combo.currentTextChanged.connect(lambda _: self._estimate_timer.start())
        self.max_memory_edit.textChanged.connect(lambda _: self._estimate_timer.start())
        self.quantize_combo.currentIndexChanged.connect(lambda _: self._estimate_timer.start())
        self._local_sources: dict[str, object] = {}
        self.update_buttons()
        self.show_state(self.state)

    # -- choosing -------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return self.dtype_combo.currentText()

    @property
    def device(self) -> str:
        return self.device_combo.currentText()

    @property
    def quantize(self) -> Quantize | None:
        kind = self.quantize_combo.currentData()
        return kind if kind in QUANTIZE_CHOICES else None

    def set_source(self, path: str) -> None:
        self.source_edit.setText(str(path))
        self._estimate_timer.stop()
        self.update_estimate()

    def browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model folder", self._start_dir())
        if path:
            self.remember_folder("model", path)
            self.set_source(path)

    def browse_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a GGUF model", self._start_dir(), "GGUF models (*.gguf);;All files (*)"
        )
        if path:
            self.remember_folder("model", path)
            self.set_source(path)

    def _start_dir(self) -> str:
        """Where the last model dialog ended; else beside the model in the box; else home."""
        text = self.source_edit.text().strip()
        beside = Path(text).expanduser().parent if text else None
        return self.start_folder("model", str(beside) if beside is not None and beside.is_dir() else "")

    def add_saved_models(self, folder: str) -> None:
        """A merged model was saved in ``folder``: list what is there with the machine's models."""
        if Path(folder) not in self.saved_model_folders:
            self.saved_model_folders.append(Path(folder))
        self.refresh_local()

    def refresh_local(self) -> None:
        from lora_studio.core.demo.model import list_local_models

        folders = tuple(self.saved_model_folders)
        self.op(
            "listing local models",
            lambda session, *, cancel, report: list_local_models(folders),
            exclusive=False,
            key="list-models",
            progress=False,
        ).on_success(self._show_local).on_failure(lambda _desc: None).run()

    def _show_local(self, sources: list[ModelSource]) -> None:
        self.local_list.clear()
        self._local_sources.clear()
        for source in sources:
            kind = {"hf-cache": "HF cache", "gguf": "GGUF", "demo": "demo", "folder": "folder"}.get(
                source.kind, source.kind
            )
            item = QListWidgetItem(f"{source.label}   [{kind}]")
            item.setData(Qt.ItemDataRole.UserRole, str(source.file))
            item.setToolTip(
                str(source.file)
                + ("\nthe base alone: File → Open the demo also attaches its adapters" if source.kind == "demo" else "")
            )
            self.local_list.addItem(item)
        if not sources:
            item = QListWidgetItem("(none found: use Folder… or GGUF…)")
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.local_list.addItem(item)

    def _load_local(self, item: QListWidgetItem) -> None:
        self._pick_local(item)
        self.load()

    def _pick_local(self, item: QListWidgetItem) -> None:
        path = item.data(Qt.ItemDataRole.UserRole)
        if path:
            self.set_source(path)

    # -- estimate (a keyed side job: a newer one replaces an older one) ------------------------------------------------
    def update_estimate(self) -> None:
        text = self.source_edit.text().strip()
        if not text:
            self.verdict_label.show_message("pick a model to see whether it fits")
            self.detail_label.setText("")
            return
        from lora_studio.core.model.estimate import estimate
        from lora_studio.core.model.sources import resolve_source

        dtype, device, quantize, limits = self.dtype, self.device, self.quantize, self.max_memory_text

        def run(
            session: Session, *, cancel: CancelToken, report: Report
        ) -> tuple[MemoryEstimate, PlannedPlacement | None]:
            source = resolve_source(text)
            cancel.raise_if_cancelled()
            found = estimate(source, dtype, device, quantize=None if source.gguf_file else quantize)
            plan = plan_placement(source, dtype, parse_max_memory(limits)) if limits else None
            return found, plan

        self.verdict_label.show_message("estimating…")
        self.op("estimating memory", run, exclusive=False, key="estimate", progress=False).on_success(
            self._show_estimate
        ).on_failure(self._estimate_failed).on_cancel(lambda: None).run()

    def _show_estimate(self, found: tuple[MemoryEstimate, PlannedPlacement | None]) -> None:
        est, self.placement_plan = found
        self.estimate = est
        text, kind = VERDICT_TEXT.get(est.verdict, (est.verdict, "info"))
        offloaded = self.placement_plan is not None and "disk" in self.placement_plan.bytes_per_device
        disk = " · beyond the limits, layers run from disk (slower)" if offloaded else ""
        self.verdict_label.show_message(f"{text} — {est.explanation}{disk}", "warn" if offloaded else kind)
        fp = est.footprint
        self.detail_label.setText(
            f"{fp.architecture} · {format_params(fp.params)} params · checkpoint {fp.checkpoint_dtype} "
            f"({format_bytes(fp.checkpoint_bytes)}) · weights as {est.dtype}"
            f"{f' + {self.quantize}' if self.quantize and not fp.checkpoint_dtype.startswith('gguf') else ''}: "
            f"{format_bytes(est.weights_bytes)}, "
            f"needs ≈ {format_bytes(est.needed_bytes)}"
            + (
                "<br>placed: " + html.escape(self._plan_text()).replace("\n", "<br>")
                if self.placement_plan is not None
                else ""
            )
        )
        self.load_btn.setText("Load anyway" if est.verdict == "does_not_fit" else "Load")

    def _plan_text(self) -> str:
        plan = self.placement_plan
        if plan is None:
            return ""
        layers = plan.to_json()["layers"]
        shares = plan.bytes_per_device.items()
        return "\n".join(f"{device} ≈ {format_bytes(size)} ({layers.get(device, '')})" for device, size in shares)

    @property
    def max_memory_text(self) -> str:
        return self.max_memory_edit.text().strip()

    def _estimate_failed(self, desc: ErrorDescription) -> None:
        self.estimate = None
        self.verdict_label.show_message(desc.message, "error")
        self.detail_label.setText("")

    # -- loading ------------------------------------------------------------------------------------------------------
    def may_replace_base(self) -> bool:
        """Whether another base may load: with adapters attached, the user is asked first (they would be detached);
        a "no" is said in the message line. While a job runs the load is refused anyway: nothing is asked."""
        attached = [name for name, _path, _size in self.state.adapters]
        if attached and not self.busy_reason and not self.confirm_replace_base(attached):
            self.show_message("the loaded base and its adapters stay", "info")
            return False
        return True

    def load(self, source_text: str | None = None) -> Job | None:
        """Load a base model (a model job).

        Returns the Job, or None when it did not start (said in the message line).
        """
        from lora_studio.core.model.sources import resolve_source

        text = (source_text if isinstance(source_text, str) else self.source_edit.text()).strip()
        dtype, device, quantize, limits = self.dtype, self.device, self.quantize, self.max_memory_text
        if not self.may_replace_base():
            return None

        def run(session: Session, *, cancel: CancelToken, report: Report) -> SessionState:
            source = resolve_source(text)
            max_memory = parse_max_memory(limits) if limits else None
            return session.load(
                source,
                dtype=dtype,
                device_map=device,
                quantize=quantize,
                max_memory=max_memory,
                cancel=cancel,
                report=report,
            )

        settings = ", ".join(filter(None, (dtype, quantize, device)))
        label = f"{Path(text).name or text or 'model'} ({settings})"  # the log says which load of a model it was
        job = (
            self.op(f"loading {label}", run)
            .on_end(self._end_load)
            .on_success(self._loaded)
            .on_failure(self._load_failed)
            .on_cancel(lambda: self.show_message("load cancelled; the previous model (if any) is unchanged", "warn"))
            .run(f"loading {label}…")
        )
        if job is not None:  # refused (Busy): the running load stays the one Cancel stops
            self.load_job = job
            self.update_buttons()  # the Cancel button follows load_job
        return job

    def _ask_replace_base(self, attached: Sequence[str]) -> bool:
        return ask_yes_no(
            self,
            "Load another base?",
            f"Loading another base detaches the {len(attached)} attached adapter(s) ({names_shown(attached)}) "
            "with the current one.\n\nTheir folders on disk stay as they are; attach them again to use them. "
            "Load it?",
        )

    def cancel_load(self) -> None:
        self.cancel_job(self.load_job)

    def _end_load(self) -> None:
        self.load_job = None

    def _loaded(self, state: SessionState) -> None:
        self.show_message(f"loaded {state.base}", "ok")
        self.loaded.emit(state)

    def _load_failed(self, desc: ErrorDescription) -> None:
        self.show_message(desc.message, "error")
        self.load_failed.emit(desc)

    def show_state(self, state: SessionState) -> None:
        self.state = state
        if not state.base:
            self.loaded_label.setText("No base model loaded.")
            return
        params = f"{format_params(state.params)} params" if state.params else ""
        quantized = f"<br>{html.escape(state.quantization)}" if state.quantization else ""
        if state.placement:
            placed = "<br>".join(html.escape(f"{device}: {modules}") for device, modules in state.placement)
            quantized += f"<br>placed: {placed}"
        self.loaded_label.setText(
            f"<b>{state.base}</b><br>{state.dtype} on {state.device} · {params}{quantized}<br>"
            f"<span style='color:gray'>{state.base_path}</span>"
        )

    def update_buttons(self) -> None:
        self.set_reasons(
            {self.load_btn: (self.busy_reason, "Load this model (replaces the current one and its adapters)")}
        )
        self.cancel_btn.setEnabled(self.load_job is not None and not self.load_job.done)
