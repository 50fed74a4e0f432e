"""Each tensor ``gguf.GGUFWriter.write_tensors_to_file`` writes, reported (and a chance to cancel) first.

llama.cpp's converter queues every tensor lazily and computes each one as the writer writes it, so the write is
where an export spends its time. The writer's loop calls ``tofile`` on each queued tensor; :func:`reporting_writes`
wraps the queued tensors so ``on_tensor(index, count, name)`` runs before each one is computed and written (it may
raise ``Cancelled``). It relies on the writer's ``tensors`` (one dict of ``TensorInfo`` per shard, each with
``tensor`` and ``nbytes``); when those are not what it expects, nothing is wrapped and the export runs without
per-tensor progress, with a warning once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import warn_inactive

HOOK = "GGUF write progress"
TARGET = "gguf.GGUFWriter.write_tensors_to_file"


def _inactive_reason(writer: Any | None = None) -> str:
    try:
        import gguf
    except ImportError as exc:
        return f"gguf is not importable ({exc})"
    try:
        source = inspect.getsource(gguf.GGUFWriter.write_tensors_to_file)
    except (AttributeError, OSError, TypeError):
        return "the source of GGUFWriter.write_tensors_to_file is not readable"
    for expected in ("self.tensors", "ti.tensor.tofile(", "ti.nbytes"):
        if expected not in source:
            return f"GGUFWriter.write_tensors_to_file no longer uses {expected}"
    if writer is not None:
        shards = getattr(writer, "tensors", None)
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            return "the writer's tensor queue is not a list of dicts"
    return ""


def checks() -> dict[str, str]:
    return {TARGET: _inactive_reason() or ACTIVE}


class _ReportingTensor:
    """A queued tensor that calls back before it is computed and written."""

    def __init__(self, tensor: Any, before: Callable[[], None]) -> None:
        self._tensor = tensor
        self._before = before
        self.nbytes = tensor.nbytes

    def tofile(self, *args: Any, **kwargs: Any) -> None:
        self._before()
        tensor, self._tensor = self._tensor, None  # computed once, then let go
        tensor.tofile(*args, **kwargs)


def reporting_writes(writer: Any, on_tensor: Callable[[int, int, str], None]) -> None:
    """Wrap every tensor queued in ``writer`` so ``on_tensor(index, count, name)`` runs before it is written."""
    reason = _inactive_reason(writer)
    if reason:
        warn_inactive(HOOK, reason)
        return
    queued = [(name, info) for shard in writer.tensors for name, info in shard.items()]
    count = len(queued)
    for index, (name, info) in enumerate(queued):
        if getattr(info, "tensor", None) is None:
            continue
        info.tensor = _ReportingTensor(info.tensor, partial(on_tensor, index, count, name))
