"""Reading a training-loss CSV into series the window can plot.

An adapter folder may carry ``loss.csv`` (the demo adapters do; so can any
adapter a user trains): one row per step with the training loss and, on some or
all steps, the validation loss. Column names follow the common spellings
(``step``/``global_step``, ``train_loss``/``loss``, ``val_loss``/``eval_loss``),
so a CSV exported from a transformers Trainer log works too. Blank cells mean
"not measured at this step". Anything else that is not a number is an error
naming the line and column, never a silently wrong plot.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from lora_studio.core.errors import UserError

LOSS_CSV = "loss.csv"
MAX_BYTES = 64 * 1024 * 1024  # a loss log is small; a bigger file is something else

STEP_COLUMNS = ("step", "global_step", "iteration", "iter")
TRAIN_COLUMNS = ("train_loss", "loss", "training_loss", "train")
VAL_COLUMNS = ("val_loss", "eval_loss", "validation_loss", "valid_loss", "val")


@dataclass(frozen=True)
class Series:
    steps: tuple[float, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    @property
    def best(self) -> float | None:
        return min(self.values) if self.values else None


@dataclass(frozen=True)
class TrainingLog:
    path: Path
    train: Series
    val: Series
    train_column: str | None
    val_column: str | None
    warnings: tuple[str, ...] = ()

    @property
    def has_validation(self) -> bool:
        return len(self.val) > 0


def find_loss_csv(adapter_folder: Path) -> Path | None:
    """The loss CSV that sits beside an adapter, if there is one."""
    path = Path(adapter_folder) / LOSS_CSV
    return path if path.is_file() else None


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    return None


def _number(text: str, path: Path, line: int, column: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(
            f"{path.name} line {line}: {column} is {text[:40]!r}, not a number",
            "fix the CSV, or remove it from the adapter folder",
        ) from None


def read_loss_csv(path: Path) -> TrainingLog:
    """Parse a loss CSV. Raises UserError with the line and column of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no loss log at {path}", "the adapter folder has no loss.csv")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(
            f"{path.name} is {path.stat().st_size // (1024 * 1024)} MB, too big for a loss log",
            "pick the CSV with one row per training step",
        )
    try:
        text = path.read_text("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path.name} is not UTF-8 text", "save the loss log as a UTF-8 CSV") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise UserError(f"{path.name} is empty", "a loss log needs a header row and one row per step")
    header = [h.strip() for h in rows[0]]
    step_col = _pick(header, STEP_COLUMNS)
    train_col = _pick(header, TRAIN_COLUMNS)
    val_col = _pick(header, VAL_COLUMNS)
    if step_col is None:
        raise UserError(
            f"{path.name} has no step column (header: {', '.join(header)[:120]})",
            "the first row must name the columns, e.g. step,train_loss,val_loss",
        )
    if train_col is None and val_col is None:
        raise UserError(
            f"{path.name} has no loss column (header: {', '.join(header)[:120]})",
            "name a column train_loss or val_loss",
        )
    index = {name: header.index(name) for name in (step_col, train_col, val_col) if name is not None}
    train: list[tuple[float, float]] = []
    val: list[tuple[float, float]] = []
    skipped = 0
    for line, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise UserError(
                f"{path.name} line {line} has {len(row)} fields, the header has {len(header)}",
                "fix the CSV, or remove it from the adapter folder",
            )
        step = _number(row[index[step_col]], path, line, step_col)
        if step is None or not math.isfinite(step):
            raise UserError(f"{path.name} line {line}: the step is missing", "every row needs a step number")
        for column, out in ((train_col, train), (val_col, val)):
            if column is None:
                continue
            value = _number(row[index[column]], path, line, column)
            if value is None:
                continue
            if not math.isfinite(value):  # a diverged run logs nan/inf: show the rest, say so
                skipped += 1
                continue
            out.append((step, value))
    if not train and not val:
        raise UserError(f"{path.name} has no loss values", "the CSV has a header but no numbers")
    warnings = (f"{skipped} non-finite loss values (nan/inf) not plotted",) if skipped else ()
    return TrainingLog(path, _series(train), _series(val), train_col, val_col, warnings)


def _series(points: list[tuple[float, float]]) -> Series:
    points.sort(key=lambda p: p[0])  # stable: rows logged out of order still plot left to right
    return Series(tuple(p[0] for p in points), tuple(p[1] for p in points))


def read_loss_log(adapter_folder: Path) -> TrainingLog | str | None:
    """The adapter's loss.csv as a TrainingLog, its one-line problem as a str, or None when it has none.

    For a display that shows the problem in place of the plot rather than failing the whole inspection.
    """
    path = find_loss_csv(adapter_folder) if adapter_folder.is_dir() else None
    if path is None:
        return None
    try:
        return read_loss_csv(path)
    except UserError as exc:
        return str(exc)
