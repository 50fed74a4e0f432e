"""The Merge tab's inputs: which adapters (and their weights, the combination) and where and how to save."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.adapters.combinations import (
    COMBINATIONS,
    DEFAULT_COMBINATION,
    NEEDS_DENSITY,
    combination_refusal,
    combined_rank,
    fitting_combination,
)
from lora_studio.core.errors import UserError
from lora_studio.core.export import DEFAULT_TYPE, GGUF_FORMATS, OUTPUT_TYPES
from lora_studio.core.export.adapter import ADAPTER_TYPES
from lora_studio.core.export.serving_plan import DEFAULT_GPU_GIB
from lora_studio.core.merge import AdapterSpec, MergeOptions
from lora_studio.core.merge.plan import EngineName
from lora_studio.core.model.dtypes import DTYPES
from lora_studio.gui.base.widgets import STYLES
from lora_studio.gui.tabs.merge.parts import AdapterRow

ENGINE_CHOICES = (("auto", None), ("streaming", "streaming"), ("in-memory", "in-memory"))
# what a merge saves: a Hugging Face folder (core/merge) or a GGUF file (core/export)
FORMAT_CHOICES = (
    ("Hugging Face folder", "hf"),
    ("GGUF, merged (llama.cpp, Ollama)", "gguf"),
    ("GGUF, adapter only (llama-server --lora)", "gguf-lora"),
    ("mlx-lm adapter (Mac: mlx_lm --adapter-path)", "mlx"),
    ("PEFT adapter, from one attached from mlx-lm", "peft"),
)


class AdapterPicker(QGroupBox):
    """A row per attached adapter (tick it, weigh it), the combination type and its density, Preview and Save.

    The combination type follows the ticks: it starts at one that works for any ranks (cat), keeps the one the
    user chose while it works, and when new ticks make it fail (linear with unequal ranks) it moves to one that
    works (svd, which keeps the rank, for a rank-keeping choice; else cat), saying so below.
    """

    changed = Signal()  # a tick, a weight, the combination or the density changed

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Adapters to merge", parent)
        self.rows: list[AdapterRow] = []
        self.rows_host = QWidget()
        self.rows_grid = QGridLayout(self.rows_host)
        self.rows_grid.setContentsMargins(2, 2, 2, 2)
        self.rows_grid.setColumnStretch(2, 1)
        self.no_adapters = QLabel("Attach an adapter in the Adapters tab; it appears here.")
        self.no_adapters.setStyleSheet("color: palette(mid);")
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.rows_host)
        scroll.setMinimumHeight(110)
        self.combo_type = QComboBox()
        self.combo_type.addItems(COMBINATIONS)
        self.combo_type.setCurrentText(DEFAULT_COMBINATION)
        self.combo_type.setToolTip(
            "how several adapters are combined (PEFT add_weighted_adapter): cat and svd take any ranks "
            "(cat is exact, its rank the sum; svd keeps the largest rank); linear, ties, dare_* and "
            "magnitude_prune need equal ranks"
        )
        self.chosen_type: str | None = None  # the type the user picked (None: the default)
        self._fitting = False  # the picker itself is changing the type
        self.type_note = ""  # why the picker changed the type
        self.refusal_text = ""
        self.density = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, decimals=2, value=0.5)
        self.density.setToolTip("fraction of entries kept (ties, dare_linear, dare_ties, magnitude_prune)")
        self.mode_label = QLabel("")
        self.mode_label.setWordWrap(True)
        self.mode_label.setStyleSheet("color: palette(mid);")
        self.preview_btn = QPushButton("Preview in Compare")
        self.save_adapter_btn = QPushButton("Save as adapter…")
        combo_row = QHBoxLayout()
        combo_row.addWidget(QLabel("Combination"))
        combo_row.addWidget(self.combo_type)
        combo_row.addWidget(QLabel("density"))
        combo_row.addWidget(self.density)
        combo_row.addStretch(1)
        # the buttons on a row of their own: on one row with the combination they made the Merge tab ~1040 px
        # wide at least, which squeezed the Base model dock at 1280 px (window-ux)
        action_row = QHBoxLayout()
        action_row.addStretch(1)
        action_row.addWidget(self.preview_btn)
        action_row.addWidget(self.save_adapter_btn)
        layout = QVBoxLayout(self)
        layout.addWidget(self.no_adapters)
        layout.addWidget(scroll, 1)
        layout.addLayout(combo_row)
        layout.addLayout(action_row)
        layout.addWidget(self.mode_label)
        self.combo_type.currentIndexChanged.connect(self._type_changed)
        self.density.valueChanged.connect(self._changed)

    def show_adapters(self, adapters: tuple[tuple[str, str, int], ...], active: str | None) -> None:
        """One row per (name, path, size); the rows of adapters still attached are kept with their ticks and weights
        (a new row reads its adapter's config, so only new adapters are read)."""
        wanted = [(name, path) for name, path, _ in adapters]
        if wanted == [(r.name, r.path) for r in self.rows]:
            return
        kept = {(r.name, r.path): r for r in self.rows}
        old = {r.name: (r.check.isChecked(), r.weight) for r in self.rows}
        for r in self.rows:
            gone = (r.name, r.path) not in wanted
            for w in r.widgets():
                self.rows_grid.removeWidget(w)
                if gone:
                    w.deleteLater()
        self.rows = []
        for i, (name, path) in enumerate(wanted):
            row = kept.get((name, path))
            if row is None:
                # a combination previewed in Compare is registered with a description, not a folder
                row = AdapterRow(name, path, Path(path).is_dir())
                checked, weight = old.get(name, (None, 1.0))
                row.set_weight(weight)
                row.check.setChecked(bool(checked))
                row.check.toggled.connect(self._ticks_changed)
                row.slider.valueChanged.connect(self._changed)
            for col, widget in enumerate(row.widgets()):
                self.rows_grid.addWidget(widget, i, col)
            self.rows.append(row)
        self.rows_grid.setRowStretch(len(self.rows), 1)
        if self.rows and not any(r.checked for r in self.rows):  # default: the active adapter (or the only one)
            pick = next((r for r in self.rows if r.mergeable and r.name == active), None)
            pick = pick or next((r for r in self.rows if r.mergeable), None)
            if pick is not None:
                pick.check.setChecked(True)
        self.no_adapters.setVisible(not self.rows)
        self.fit_type()

    def fit_type(self) -> None:
        """After the ticks changed: a combination type that works for the ticked adapters (see the class)."""
        members = [r.member for r in self.checked_rows()]
        known = [m for m in members if m is not None]
        current = self.combination()
        refusal = combination_refusal(known, current) if len(known) == len(members) else None
        if refusal is None:
            self.type_note = ""
            return
        wanted = fitting_combination(known, self.chosen_type or current)
        if wanted == current or combination_refusal(known, wanted) is not None:
            self.type_note = ""  # nothing works better (a DoRA adapter, ...): the plan says why
            return
        why = refusal[0].split(": ", 1)[-1]
        kept = "exact" if wanted == "cat" else "keeps the largest rank"
        self.type_note = (
            f"switched from {current} to {wanted} ({kept}, rank {combined_rank(known, wanted)}): {current} {why[3:]}"
            if why.startswith("it ")
            else f"switched from {current} to {wanted}: {why}"
        )
        self._fitting = True
        try:
            self.combo_type.setCurrentText(wanted)
        finally:
            self._fitting = False

    def _ticks_changed(self, *_args: object) -> None:
        self.fit_type()
        self.changed.emit()

    def _type_changed(self, *_args: object) -> None:
        if not self._fitting:  # the user's choice: kept while it works for the ticked adapters
            self.chosen_type = self.combination()
            self.type_note = ""
        self.changed.emit()

    def checked_rows(self) -> list[AdapterRow]:
        return [r for r in self.rows if r.checked]

    def combination(self) -> str:
        return self.combo_type.currentText()

    def density_for(self, combination: str) -> float | None:
        """The density, for the combinations that take one."""
        return round(self.density.value(), 4) if combination in NEEDS_DENSITY else None

    def update_enabled(self) -> None:
        """Weights and the combination apply to two or more ticked adapters; say which merge the ticks make."""
        rows = self.checked_rows()
        several = len(rows) > 1
        self.mode_label.setStyleSheet("color: palette(mid);")
        self.refusal_text = ""  # the combination's refusal shown in mode_label ('' for none)
        for r in self.rows:
            r.set_enabled(r.checked)  # alone, the weight is the adapter's scale
        self.combo_type.setEnabled(several)
        self.density.setEnabled(several and self.combination() in NEEDS_DENSITY)
        if not rows:
            self.mode_label.setText("")
        elif several:
            members = [r.member for r in rows if r.member is not None]
            known = len(members) == len(rows)
            refusal = combination_refusal(members, self.combination()) if known else None
            if refusal is not None:  # the plan refuses it too; said here, beside the type, before anything runs
                self.refusal_text = refusal[0]
                self.mode_label.setText(f"{refusal[0]} ({refusal[1]})")
                self.mode_label.setStyleSheet(STYLES["warn"])
                return
            rank = f", rank {combined_rank(members, self.combination())}" if known else ""
            self.mode_label.setText(
                f"{self.combination()} combination of {len(rows)} adapters "
                f"(PEFT add_weighted_adapter{rank}), merged by the in-memory engine"
                + (f"\n{self.type_note}" if self.type_note else "")
            )
        else:
            scale = rows[0].weight
            at = f" at scale {scale:g}" if scale != 1.0 else ""
            self.mode_label.setText(
                f"plain merge of {rows[0].name}{at} (alone, its weight is its LoRA scale: 1 is as trained)"
            )

    def _changed(self, *_args: object) -> None:
        self.changed.emit()


class OutputBox(QGroupBox):
    """Where the merged model goes and in which format: a Hugging Face folder (dtype, engine, safe merge) or a
    GGUF file (its type); and the verify switch."""

    changed = Signal()
    format_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Output", parent)
        self.format_combo = QComboBox()
        for label, fmt in FORMAT_CHOICES:
            self.format_combo.addItem(label, fmt)
        self.format_combo.setToolTip(
            "Hugging Face folder: for transformers and vLLM. GGUF: one file for llama.cpp and Ollama, merged, "
            "or the adapter alone for any GGUF of this base"
        )
        self.gguf_type_combo = QComboBox()
        for spec in OUTPUT_TYPES.values():
            self.gguf_type_combo.addItem(f"{spec.name} — {spec.description}", spec.name)
        self.gguf_type_combo.setCurrentIndex(list(OUTPUT_TYPES).index(DEFAULT_TYPE))
        self.gguf_type_combo.setToolTip("the GGUF's weight type; the K-quants are written by llama.cpp's quantiser")
        self.serve_gpu_spin = QDoubleSpinBox()
        self.serve_gpu_spin.setRange(1.0, 4096.0)
        self.serve_gpu_spin.setDecimals(0)
        self.serve_gpu_spin.setValue(DEFAULT_GPU_GIB)
        self.serve_gpu_spin.setSuffix(" GiB")
        self.serve_gpu_spin.setToolTip(
            "the GPU the serving notes plan vLLM on: how many adapters like this one fit beside the model "
            "(--max-loras, --max-cpu-loras)"
        )
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("folder for the merged model (created)")
        self.out_edit.setClearButtonEnabled(True)
        self.browse_btn = QPushButton("Choose…")
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.browse_btn)
        self.dtype_combo = QComboBox()
        self.dtype_combo.addItems(DTYPES)
        self.dtype_combo.setToolTip("dtype of the saved weights (default: the base's)")
        self.engine_combo = QComboBox()
        for label, value in ENGINE_CHOICES:
            self.engine_combo.addItem(label, value)
        self.engine_combo.setToolTip(
            "auto: streaming (one tensor at a time, low memory) where it applies, else in-memory"
        )
        self.merge_into_combo = QComboBox()
        for label, value in (
            ("auto (measured)", None),
            ("original weights (W16 + ΔW)", "original"),
            ("dequantized weights (dequant(Wq) + ΔW)", "dequantized"),
        ):
            self.merge_into_combo.addItem(label, value)
        self.merge_into_combo.setToolTip(
            "For an adapter trained on a quantised base (QLoRA, or a base loaded quantised): merge into the "
            "checkpoint's weights, into the dequantised ones the adapter learned on, or the closer of the two "
            "measured against the adapter on the quantised base (auto). The output is never quantised again."
        )
        self.full_precision_edit = QLineEdit()
        self.full_precision_edit.setPlaceholderText("the 16/32-bit folder this base was quantised from")
        self.full_precision_edit.setToolTip(
            "A base saved in 4 or 8 bits has no full-precision weights of its own: name the folder it was quantised "
            "from. Its weights are the original ones; the saved quantised ones are what the adapter learned on."
        )
        full_precision_btn = QPushButton("…")
        full_precision_btn.setToolTip("choose the full-precision folder")
        full_precision_btn.clicked.connect(self._browse_full_precision)
        self.full_precision_row = QHBoxLayout()
        self.full_precision_row.addWidget(self.full_precision_edit, 1)
        self.full_precision_row.addWidget(full_precision_btn)
        self._saved_quantised = False
        self.engine_note = QLabel("")
        self.engine_note.setWordWrap(True)
        self.engine_note.setStyleSheet("color: palette(mid);")
        self.verify_check = QCheckBox("Verify after saving")
        self.verify_check.setChecked(True)
        self.verify_check.setToolTip("load the saved folder plainly and compare its logits with the adapter model")
        self.safe_check = QCheckBox("Safe merge (NaN/Inf check)")
        self.safe_check.setToolTip(
            "PEFT's safe_merge: check each merged weight for NaN/Inf (in-memory engine; "
            "the streaming engine always checks float16 for Inf)"
        )
        checks = QHBoxLayout()
        checks.addWidget(self.verify_check)
        checks.addWidget(self.safe_check)
        checks.addStretch(1)
        self.install_btn = QPushButton("Install llama.cpp…")
        self.install_btn.setToolTip(
            "build llama.cpp's Python binding in the background (minutes, once): K-quant types and checking "
            "the GGUF in llama.cpp itself"
        )
        self.install_btn.hide()
        for combo in (self.format_combo, self.gguf_type_combo, self.merge_into_combo):
            # long choices ("q4_k_m — …") elide in a narrow window instead of scrolling the tab sideways
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(14)
        self.form = form = QFormLayout(self)
        form.addRow("Format", self.format_combo)
        form.addRow("Save to", out_row)
        form.addRow("dtype", self.dtype_combo)
        form.addRow("Engine", self.engine_combo)
        form.addRow("", self.engine_note)
        form.addRow("Merge into", self.merge_into_combo)
        form.addRow("16-bit base", self.full_precision_row)
        form.addRow("GGUF type", self.gguf_type_combo)
        form.addRow("vLLM GPU", self.serve_gpu_spin)
        form.addRow("", checks)
        form.addRow("", self.install_btn)
        self._dtype_for: str | None = None  # the base whose dtype the dtype box was last set to
        self._last_format = ""
        self.suggested_out: str | None = None  # the output the tab last suggested (it follows the inputs)
        self.format_combo.currentIndexChanged.connect(self._format_changed)
        self._format_changed()
        self.gguf_type_combo.currentIndexChanged.connect(self._gguf_type_changed)
        for signal in (
            self.format_combo.currentIndexChanged,
            self.gguf_type_combo.currentIndexChanged,
            self.serve_gpu_spin.valueChanged,
            self.out_edit.textChanged,
            self.dtype_combo.currentIndexChanged,
            self.engine_combo.currentIndexChanged,
            self.merge_into_combo.currentIndexChanged,
            self.full_precision_edit.textChanged,
            self.verify_check.toggled,
            self.safe_check.toggled,
        ):
            signal.connect(lambda *_: self.changed.emit())

    def format(self) -> str:
        """ "hf", "gguf", "gguf-lora", "mlx" or "peft"."""
        return str(self.format_combo.currentData())

    def gguf_type(self) -> str:
        return str(self.gguf_type_combo.currentData())

    def _format_changed(self, *_args: object) -> None:
        fmt = self.format()
        gguf = fmt in GGUF_FORMATS
        for widget in (self.dtype_combo, self.engine_combo, self.engine_note):
            self.form.setRowVisible(widget, fmt == "hf")
        # a merged GGUF of a QLoRA adapter is written from the weights chosen the same way
        self.form.setRowVisible(self.merge_into_combo, fmt in ("hf", "gguf"))
        self.form.setRowVisible(self.full_precision_row, fmt == "hf" and self._saved_quantised)
        self.safe_check.setVisible(fmt == "hf")
        self.form.setRowVisible(self.gguf_type_combo, gguf)
        self.form.setRowVisible(self.serve_gpu_spin, gguf)
        # an adapter-only GGUF is small: only the float types and q8_0
        model = self.gguf_type_combo.model()
        for i in range(self.gguf_type_combo.count()):
            allowed = fmt != "gguf-lora" or self.gguf_type_combo.itemData(i) in ADAPTER_TYPES
            model.item(i).setEnabled(allowed)  # type: ignore[attr-defined]  # a QStandardItemModel
        if fmt == "gguf-lora" and self._last_format != "gguf-lora":  # an adapter is small: f16, as llama.cpp's
            self.gguf_type_combo.setCurrentIndex(list(OUTPUT_TYPES).index("f16"))
        self._last_format = fmt
        self.out_edit.setPlaceholderText(
            "the .gguf file to write"
            if gguf
            else "folder for the mlx-lm adapter (created)"
            if fmt == "mlx"
            else "folder for the PEFT adapter (created)"
            if fmt == "peft"
            else "folder for the merged model (created)"
        )
        self.format_changed.emit()

    def _gguf_type_changed(self, *_args: object) -> None:
        """A file name that says its type (``….q8_0.gguf``) follows a new type."""
        text = self.out_edit.text().strip()
        if text == self.suggested_out:
            return  # the tab suggests the new name itself
        for name in OUTPUT_TYPES:
            for said in (f".{name}.gguf", f".lora-{name}.gguf"):
                if text.endswith(said):
                    kind = "lora-" if said.startswith(".lora-") else ""
                    self.out_edit.setText(text[: -len(said)] + f".{kind}{self.gguf_type()}.gguf")
                    return

    def browse(self, base_folder: Path, suggested_gguf: Path | None) -> None:
        """The output's dialog: a .gguf file to save (starting at ``suggested_gguf``), or a folder."""
        start = self.out_edit.text().strip() or str(base_folder)
        if self.format() in GGUF_FORMATS:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the GGUF as", str(suggested_gguf or start), "GGUF files (*.gguf)"
            )
        else:
            what = {"mlx": "the mlx-lm adapter", "peft": "the PEFT adapter"}.get(self.format(), "the merged model")
            path = QFileDialog.getExistingDirectory(self, f"Choose the output folder for {what}", start)
        if path:
            self.out_edit.setText(path)

    def out_path(self) -> Path | None:
        text = self.out_edit.text().strip()
        return Path(text).expanduser().absolute() if text else None

    def _browse_full_precision(self) -> None:
        start = self.full_precision_edit.text().strip() or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose the folder the base was quantised from", start)
        if path:
            self.full_precision_edit.setText(path)

    def full_precision(self) -> Path | None:
        """The full-precision folder of a base saved quantised (None: not asked, or the base is not)."""
        text = self.full_precision_edit.text().strip()
        return Path(text).expanduser().absolute() if text and self._saved_quantised else None

    def show_saved_quantised(self, saved: bool) -> None:
        """The 16-bit base row is for a base saved in 4 or 8 bits (a base quantised on load has its own)."""
        self._saved_quantised = saved
        self._format_changed()

    def follow_base(self, base_path: str | None, dtype: str | None) -> None:
        """A new base: the dtype box starts at the base's dtype (core.merge.base_dtype with a session)."""
        if base_path != self._dtype_for and dtype in DTYPES:
            self._dtype_for = base_path
            self.dtype_combo.blockSignals(True)
            self.dtype_combo.setCurrentText(dtype)
            self.dtype_combo.blockSignals(False)

    def engine(self) -> EngineName | None:
        """The engine chosen (None: auto)."""
        return self.engine_combo.currentData()


def use_scale(picker: AdapterPicker, adapter: str, scale: float) -> bool:
    """Tick ``adapter`` alone at weight ``scale`` (its LoRA scale in a plain merge); False when it is not listed."""
    rows = [r for r in picker.rows if r.name == adapter and r.mergeable]
    if not rows:
        return False
    for r in picker.rows:
        r.check.setChecked(r is rows[0])
    rows[0].set_weight(scale)
    picker.update_enabled()
    return True


def merge_request(
    picker: AdapterPicker, output: OutputBox, out: Path | None = None
) -> tuple[list[AdapterSpec], MergeOptions]:
    """What the inputs ask for as a merge; raises UserError when they cannot make one."""
    rows = picker.checked_rows()
    if not rows:
        raise UserError("no adapter ticked", "tick the adapter(s) to merge")
    combination = density = None
    if len(rows) == 1:
        specs = [AdapterSpec(rows[0].name, Path(rows[0].path), rows[0].weight)]  # alone: its scale
    else:
        specs = [AdapterSpec(r.name, Path(r.path), r.weight) for r in rows]
        combination = picker.combination()
        density = picker.density_for(combination)
    options = MergeOptions(
        out=out or output.out_path() or Path.home() / "merged-model",
        dtype=output.dtype_combo.currentText(),
        engine=output.engine(),
        combination=combination,
        density=density,
        safe_merge=output.safe_check.isChecked(),
        verify=output.verify_check.isChecked(),
        merge_into=output.merge_into_combo.currentData(),
        full_precision=output.full_precision(),
    )
    return specs, options
