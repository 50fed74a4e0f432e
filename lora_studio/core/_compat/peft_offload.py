"""PEFT's copies of disk-offloaded checkpoint files, written into the session's offload folder.

When an adapter attaches to a model whose layers accelerate offloaded to disk, PEFT (``PeftModel._update_offload``)
writes each offloaded checkpoint file again with the adapter's factors added, at a path it makes by splitting the
original path on ``os.sep`` and joining the parts again: the leading separator is lost, so the copy of
``/models/base/model.safetensors`` lands at ``models/base/model.safetensors`` under the process's working directory,
wherever LoRA Studio was started. :func:`offload_copies_in` swaps the ``os`` module PEFT's module uses, for the
calling thread and the duration of the attach, for one whose ``path.join`` roots such a path in the given folder
(every other use is ``os``'s own). If PEFT no longer builds that path through ``os.path.join`` in
``_update_offload``, the plain path is used, with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import code_uses_name, import_target, swapped, warn_inactive

HOOK = "PEFT offload copies"
MODULE = "peft.peft_model"
TARGET = f"{MODULE}.os (PeftModel._update_offload)"


class _RootedPath:
    """``os.path`` whose ``join`` puts a path that lost its root (a first part of "") inside ``folder``."""

    def __init__(self, folder: Path) -> None:
        self._folder = str(folder)

    def join(self, first: Any, *rest: Any) -> Any:
        if first == "" and rest:
            return os.path.join(self._folder, *rest)
        return os.path.join(first, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(os.path, name)


class _RootedOs:
    def __init__(self, folder: Path) -> None:
        self.path = _RootedPath(folder)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _inactive_reason() -> tuple[Any, str]:
    module, reason = import_target(MODULE)
    if module is None:
        return None, reason
    if getattr(module, "os", None) is not os:
        return None, f"{MODULE} no longer uses the os module"
    update = getattr(getattr(module, "PeftModel", None), "_update_offload", None)
    if update is None:
        return None, f"{MODULE}.PeftModel has no _update_offload"
    if not code_uses_name(update, "join") or not code_uses_name(update, "os"):
        return None, f"{MODULE}.PeftModel._update_offload no longer names its copies with os.path.join"
    return module, ""


def checks() -> dict[str, str]:
    return {TARGET: _inactive_reason()[1] or ACTIVE}


@contextmanager
def offload_copies_in(folder: Path) -> Iterator[None]:
    """While inside, PEFT on this thread writes its copies of disk-offloaded checkpoint files under ``folder``."""
    module, reason = _inactive_reason()
    if module is None:
        warn_inactive(HOOK, reason)
        yield
        return
    with swapped(module, "os", _RootedOs(Path(folder))):
        yield
