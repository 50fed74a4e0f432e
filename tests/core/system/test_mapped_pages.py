"""A load's mapped checkpoint pages let go of as it reads (``release_mapped_pages``): the process's RSS shrinks and
nothing anyone wrote into a mapping is ever thrown away."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from lora_studio.core.system.allocator import release_mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")

PAGE = mmap.PAGESIZE


def a_file(tmp_path: Path, pages: int = 64) -> Path:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(bytes(range(256)) * (pages * PAGE // 256))
    return path


def read_every_page(mapping: mmap.mmap) -> int:
    return sum(mapping[offset] for offset in range(0, len(mapping), PAGE))


@pytest.mark.parametrize("access", [mmap.ACCESS_READ, mmap.ACCESS_COPY], ids=["shared, read-only", "private"])
def test_the_pages_read_are_let_go_of_and_read_back_the_same(tmp_path, access):
    path = a_file(tmp_path)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=access) as mapping:
        before = read_every_page(mapping)
        assert release_mapped_pages([path]) == len(mapping)  # all 64 pages were resident
        assert release_mapped_pages([path]) == 0  # none is now
        assert read_every_page(mapping) == before and mapping[: 3 * PAGE] == path.read_bytes()[: 3 * PAGE]


def test_a_mapping_something_wrote_into_is_left_alone(tmp_path):
    """A private mapping holds the written page as a copy of its own: letting go of it would lose the write."""
    path = a_file(tmp_path)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapping:
        read_every_page(mapping)
        mapping[5 * PAGE] = 7
        assert release_mapped_pages([path]) == 0
        assert mapping[5 * PAGE] == 7


def test_other_files_and_paths_that_are_not_mapped_are_untouched(tmp_path):
    path, other = a_file(tmp_path), tmp_path / "other.bin"
    other.write_bytes(b"x" * PAGE * 4)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        read_every_page(mapping)
        assert release_mapped_pages([other, tmp_path / "missing.safetensors"]) == 0
        assert release_mapped_pages([]) == 0
        assert release_mapped_pages([path]) == len(mapping)
