"""The Train tab's files: the training data, the validation data and the adapter folder to write.

Each has a "…" button that opens a dialog where the last one of its kind ended. The adapter folder is
suggested from the data's name and the settings (``<data>-<init>-r<r>``), numbered past folders that earlier
runs left.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from PySide6.QtWidgets import QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton, QWidget

from lora_studio.core.io.paths import data_dir, free_path
from lora_studio.core.train.records import checkpoints_beside
from lora_studio.core.train.settings import CONVERTED_INITS
from lora_studio.gui.base.file_filters import TRAIN_DATA_FILTER
from lora_studio.gui.tabs.train.form import TrainSettingsForm


class FolderHost(Protocol):
    """Where the dialogs open (the Panel is one)."""

    def start_folder(self, kind: str, fallback: str = "") -> str: ...
    def remember_folder(self, kind: str, path: str) -> None: ...


def default_out_parent() -> Path:
    """Where a trained adapter goes unless the user picks another folder."""
    return data_dir() / "trained"


def with_browse(edit: QLineEdit, browse: Callable[[], None]) -> QWidget:
    """``edit`` with a "…" button beside it that calls ``browse``."""
    row = QWidget()
    h = QHBoxLayout(row)
    h.setContentsMargins(0, 0, 0, 0)
    h.addWidget(edit, 1)
    button = QPushButton("…")
    button.setFixedWidth(32)
    button.setToolTip("browse")
    button.clicked.connect(browse)
    h.addWidget(button)
    return row


class DataFiles(QWidget):
    """The three path rows; ``form`` gives the settings the suggested folder name follows."""

    def __init__(self, host: FolderHost, form: TrainSettingsForm, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.host, self.form = host, form
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("training data: .jsonl, .csv, .parquet or a save_to_disk folder")
        self.val_edit = QLineEdit()
        self.val_edit.setPlaceholderText("validation data (optional: else a share of the training rows is held out)")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("adapter folder to write")
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addRow("Data", with_browse(self.data_edit, lambda: self._browse_file(self.data_edit)))
        layout.addRow("Validation", with_browse(self.val_edit, lambda: self._browse_file(self.val_edit)))
        layout.addRow("Save to", with_browse(self.out_edit, self._browse_out))

    def _browse_file(self, edit: QLineEdit) -> None:
        start = self.host.start_folder("train-data")
        path, _ = QFileDialog.getOpenFileName(self, "Training data", start, TRAIN_DATA_FILTER)
        if path:
            self.host.remember_folder("train-data", str(Path(path).parent))
            edit.setText(path)

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the adapter in", self.host.start_folder("train-out"))
        if folder:
            self.host.remember_folder("train-out", folder)
            self.out_edit.setText(str(self.suggested_out(Path(folder))))

    def suggested_out(self, parent: Path) -> Path:
        """``parent/<data>-<init>-r<r>``, numbered past the folders an earlier run left there (a run refuses to
        replace one)."""
        stem = Path(self.data_edit.text()).stem.split(".")[0] or "adapter"
        init = self.form.init.currentData()
        # the rank the folder will hold: OLoRA and PiSSA are saved converted to a plain LoRA of twice the rank
        r = self.form.r.value() * (2 if init in CONVERTED_INITS else 1)
        name = f"{stem}-{init}-r{r}" if init != "default" else f"{stem}-r{r}"
        return free_path(parent, name, taken=lambda out: out.exists() or checkpoints_beside(out).exists())

    def advance(self) -> None:
        """A run ended, or another base was loaded: a folder name already taken moves on to the next free one in
        the same place (a second run with the defaults would otherwise be refused, or replace the first)."""
        current = self.out_edit.text().strip()
        if not current:
            self.follow_data()
            return
        taken = Path(current).expanduser()
        if taken.exists() or checkpoints_beside(taken).exists():
            self.out_edit.setText(str(self.suggested_out(taken.parent)))

    def follow_data(self) -> None:
        """The data changed: an adapter folder left empty or in the default place follows its name."""
        default_parent = default_out_parent()
        current = self.out_edit.text()
        if not current or Path(current).parent == default_parent:
            self.out_edit.setText(str(self.suggested_out(default_parent)))
