"""What was read from a model file, remembered while the file stays as it is, and handed on to a worker process.

Reading a GGUF's metadata parses every token of its vocabulary in Python: ~4 s for Gemma 3's 262k tokens, once
for its configuration and once for its tensor list. A process reads each once per file; a worker that exports for
the window takes what the window has read instead of reading it again (:func:`carried_reads`, :func:`take_reads`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

V = TypeVar("V")
_ENTRIES = 4  # files remembered per kind of read: the bases a session moves between

# (file, size, modification time in ns): a file replaced or rewritten is read again
FileKey = tuple[str, int, int]


def file_key(path: Path) -> FileKey:
    """Raises OSError when the file cannot be read."""
    stat = path.stat()
    return str(path.absolute()), stat.st_size, stat.st_mtime_ns


class FileReads(Generic[V]):
    """One kind of read (a GGUF's configuration, its footprint), by file as it is, the last few files. A failed read
    is not remembered."""

    def __init__(self, kind: str) -> None:
        if kind in _KINDS:
            raise ValueError(f"two kinds of file reads are named {kind!r}")
        self.kind = kind
        self._values: OrderedDict[FileKey, V] = OrderedDict()
        self._lock = threading.Lock()  # the window reads from its job threads
        _KINDS[kind] = self

    def get(self, key: FileKey, read: Callable[[], V]) -> V:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = read()  # outside the lock: a slow read does not hold up another file's
        self._keep(key, value)
        return value

    def _keep(self, key: FileKey, value: V) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > _ENTRIES:
                self._values.popitem(last=False)

    def of_file(self, path: Path) -> list[tuple[FileKey, V]]:
        name = str(path.absolute())
        with self._lock:
            return [(key, value) for key, value in self._values.items() if key[0] == name]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


_KINDS: dict[str, FileReads] = {}


@dataclass(frozen=True)
class CarriedReads:
    """What this process has read from one file, for a worker process (picklable)."""

    values: tuple[tuple[str, FileKey, object], ...] = ()


def carried_reads(path: Path) -> CarriedReads:
    """Everything read so far from ``path``, by every kind of read."""
    read = [(kind, key, value) for kind, reads in _KINDS.items() for key, value in reads.of_file(path)]
    return CarriedReads(tuple(read))


def take_reads(carried: CarriedReads) -> None:
    """Remember what another process read (its file unchanged since, by size and time: else it is read again)."""
    for kind, key, value in carried.values:
        if kind in _KINDS:
            _KINDS[kind]._keep(key, value)
