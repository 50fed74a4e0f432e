"""Evaluation sets: local data files in the training data's shapes, tokenised as the trainer sees them.

An example is a prompt and the reference answer the variants are scored on (for ``text`` rows: the first token
is the prompt and the rest the answer). Rows are rendered exactly as training renders them (the chat template
applied; :func:`lora_studio.core.train.data.encode`), so that an adapter's validation loss here equals the one its
training run reported.

Defaults, when the user names no file: the validation file recorded in a trained adapter's ``lora_studio.json``
(training in the app writes it), the demo validation sets for the demo adapters.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_studio.core.adapters.files import SIDECAR_NAME
from lora_studio.core.demo.assets import demo_dir
from lora_studio.core.errors import UserError
from lora_studio.core.io.hashing import tree_sha256
from lora_studio.core.train import data as train_data

MAX_LENGTH = 1024  # tokens of prompt + answer; longer rows are cut at the end (and said so)


@dataclass(frozen=True)
class EvalExample:
    """One row: the prompt's and the answer's token ids, and their text for display."""

    index: int  # 0-based, across every set of the evaluation
    dataset: str
    source_row: int  # 1-based row in its file
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    prompt: str
    answer: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: Path
    sha256: str | None
    shape: str
    examples: tuple[EvalExample, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "rows": len(self.examples),
            "shape": self.shape,
            "warnings": list(self.warnings),
        }


def set_name(path: Path) -> str:
    """``pirate.val.jsonl`` -> ``pirate.val``: the file name without its data suffix."""
    name = path.name
    for suffix in train_data.SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def load_eval_set(
    path: str | Path,
    tokenizer: Any,
    *,
    name: str | None = None,
    first_index: int = 0,
    max_length: int = MAX_LENGTH,
    limit: int | None = None,
) -> EvalSet:
    """Read, check and tokenise one evaluation file (or ``save_to_disk`` folder)."""
    path = Path(path).expanduser()
    rows, columns = train_data.read_rows(path)
    if not rows:
        raise UserError(f"{path.name} has no rows", "an evaluation set needs at least one example")
    if limit is not None:
        rows = rows[: max(1, limit)]
    shape = train_data.detect_shape(columns, path.name)
    name = name or set_name(path)
    examples: list[EvalExample] = []
    warnings: list[str] = []
    cut = 0
    for n, row in enumerate(rows, 1):
        item = train_data.row_as_conversation(row, shape, f"{path.name}, row {n}")
        encoded = train_data.encode(tokenizer, item, completion_only=True, source_row=n)
        ids = encoded.input_ids[:max_length]
        cut += len(encoded.input_ids) > max_length
        start = encoded.completion_mask.index(1) if 1 in encoded.completion_mask else len(encoded.input_ids)
        start = max(1, start)  # the first token has no prediction: a "text" row's answer starts after it
        if start >= len(ids):
            raise UserError(
                f"{path.name}, row {n}: the answer starts after token {max_length}",
                "shorten the prompt, or evaluate with a longer maximum length",
            )
        prompt_text, answer_text = _texts(item)
        examples.append(
            EvalExample(
                first_index + len(examples),
                name,
                n,
                tuple(ids[:start]),
                tuple(ids[start:]),
                prompt_text,
                answer_text,
            )
        )
    if cut:
        warnings.append(f"{cut} row(s) are longer than {max_length} tokens and are cut at the end")
    return EvalSet(name, path, tree_sha256(path), shape, tuple(examples), tuple(warnings))


def max_length_for(model: Any) -> int:
    """The tokens of prompt + answer an evaluation row keeps on ``model``: MAX_LENGTH, or fewer when the model has
    fewer positions (GPT-2's 1024, a tiny model's 128): a longer row would index past its position table."""
    from lora_studio.core.generation.generate import context_limit

    positions = context_limit(model)
    return min(MAX_LENGTH, positions) if isinstance(positions, int) and positions > 1 else MAX_LENGTH


def load_eval_sets(
    paths: Sequence[str | Path], tokenizer: Any, *, max_length: int = MAX_LENGTH, limit: int | None = None
) -> list[EvalSet]:
    """Several files, examples numbered across all of them; two files of one name get their parent's name too."""
    if not paths:
        raise UserError("no evaluation data given", "pick a JSONL, CSV or Parquet file (or use the defaults)")
    resolved = [Path(p).expanduser() for p in paths]
    names = [set_name(p) for p in resolved]
    out: list[EvalSet] = []
    for path, name in zip(resolved, names, strict=True):
        if names.count(name) > 1:
            name = f"{path.parent.name}/{name}"
        first = sum(len(s.examples) for s in out)
        out.append(load_eval_set(path, tokenizer, name=name, first_index=first, max_length=max_length, limit=limit))
    return out


def _texts(item: train_data.Conversation | str) -> tuple[str, str]:
    if isinstance(item, str):
        return "", item
    prompt, completion = item
    return prompt[-1]["content"], "\n\n".join(t["content"] for t in completion)


# -- defaults --------------------------------------------------------------------------------------------------------


def demo_sets() -> list[Path]:
    """The demo adapters' validation files (12 held-out pairs each)."""
    folder = demo_dir() / "data"
    return sorted(folder.glob("*.val.jsonl")) if folder.is_dir() else []


def default_set_for(adapter_folder: Path) -> Path | None:
    """The validation data an adapter was trained with, when its folder says: the app's training record, or the
    demo adapters' own validation files."""
    sidecar = Path(adapter_folder) / SIDECAR_NAME
    try:
        record = json.loads(sidecar.read_text("utf-8")) if sidecar.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return None
    data = record.get("data") if isinstance(record, dict) else None
    val = data.get("val_file") if isinstance(data, dict) else None
    digest = data.get("val_sha256") if isinstance(data, dict) else None
    # only the very file the training recorded (its hash): a record that names another file, anywhere on the
    # machine, is not a reason to read it
    recorded = isinstance(val, str) and isinstance(digest, str) and (Path(val).is_file() or Path(val).is_dir())
    if recorded and _hash_of(Path(str(val))) == digest:
        return Path(str(val))
    demo = demo_dir() / "data" / f"{Path(adapter_folder).name}.val.jsonl"
    if isinstance(record, dict) and "demo" in str(record.get("tool", "")) and demo.is_file():
        return demo
    return None


def _hash_of(path: Path) -> str | None:
    """``tree_sha256`` of a recorded data file, read once while it is unchanged (size and time): the window asks
    for the default sets after every change of the session, on its own thread. A folder's time does not follow its
    files' contents, so a saved dataset is hashed each time."""
    if path.is_dir():
        return tree_sha256(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    return _hash_of_version(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _hash_of_version(path: Path, _size: int, _mtime_ns: int) -> str | None:
    return tree_sha256(path)


def default_sets(adapter_folders: Sequence[Path]) -> list[Path]:
    """One validation file per adapter that has one (each once), else the demo sets."""
    found: list[Path] = []
    for folder in adapter_folders:
        path = default_set_for(folder)
        if path is not None and path not in found:
            found.append(path)
    return found or demo_sets()
