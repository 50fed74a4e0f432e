"""Headers, pread tensors, the streaming writer and the atomic output folder."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_studio.core.errors import UserError
from lora_studio.core.io import atomic, shard_writer
from lora_studio.core.io import safetensors_format as stf


def test_header_and_read_tensor_roundtrip(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, 2).to(torch.bfloat16),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    header = stf.read_header(tmp_path / "x.safetensors")
    assert header.tensors["a"].shape == (3, 4) and header.tensors["c"].dtype == "BF16"
    for name, t in tensors.items():
        assert torch.equal(stf.read_tensor(header.tensors[name], header.path), t)


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {f"w{i}": torch.randn(10, 7).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    plan = {k: (stf.st_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    paths = shard_writer.write_state_dict(tmp_path, iter(tensors.items()), plan, max_shard_bytes=300)
    assert len(paths) > 1 and (tmp_path / stf.INDEX_NAME).is_file()
    index = json.loads((tmp_path / stf.INDEX_NAME).read_text())
    loaded = {}
    for p in paths:
        loaded.update(load_file(p))
    assert set(index["weight_map"]) == set(tensors)
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda b: b[:5], "only 5 bytes"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "corrupt safetensors header"),
        (lambda b: b[:8] + b"{" * (len(b) - 8), "corrupt safetensors header"),
        (lambda b: b[:-8], "truncated"),
    ],
)
def test_damaged_files(tmp_path, damage, needle):
    save_file({"a": torch.randn(4, 4)}, tmp_path / "x.safetensors")
    p = tmp_path / "x.safetensors"
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(UserError, match=needle):
        stf.read_header(p)


def test_index_naming_missing_shard(tmp_path):
    (tmp_path / stf.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"shard model-00001-of-00002.safetensors but it is missing"):
        stf.checkpoint_files(tmp_path)


def test_atomic_dir_success_failure_and_existing(tmp_path):
    target = tmp_path / "out"
    with atomic.atomic_output_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new"
    with pytest.raises(UserError, match="already exists"), atomic.atomic_output_dir(target):
        pass
    with pytest.raises(RuntimeError), atomic.atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")
    assert (target / "f").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folders left behind
    with atomic.atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "g").write_text("replaced")
    assert sorted(os.listdir(target)) == ["g"]


def test_atomic_dir_disk_full_message(tmp_path):
    with pytest.raises(UserError, match=r"disk .* is full"), atomic.atomic_output_dir(tmp_path / "out"):
        raise OSError(28, "No space left on device")
    assert not (tmp_path / "out").exists()


def test_leftovers_of_killed_runs_are_cleaned_or_restored(tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f".out.partial-{dead_pid}-abcd"
    stale.mkdir()
    (stale / "half.safetensors").write_text("x")
    kept_old = tmp_path / f".prev.old-{dead_pid}-abcd"
    kept_old.mkdir()
    (kept_old / "f").write_text("old")
    with atomic.atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert not stale.exists()
    with pytest.raises(UserError, match="already exists"), atomic.atomic_output_dir(tmp_path / "prev"):
        pass
    assert (tmp_path / "prev" / "f").read_text() == "old"  # killed between renames: the old folder came back
    bracketed = tmp_path / f".run[1].partial-{dead_pid}-abcd"  # a name a glob would read as a pattern
    bracketed.mkdir()
    with atomic.atomic_output_dir(tmp_path / "run[1]") as tmp:
        (tmp / "f").write_text("new")
    assert not bracketed.exists()


def test_exchange_swaps_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("renameat2 exchange not supported here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def _big_plan_and_tensors():
    # sizes that straddle the staging buffer: several whole chunks, odd tails, a tensor of zero elements
    tensors = {
        "a": torch.randn(3, 1001),
        "b": torch.randn(700_001).to(torch.bfloat16),
        "c": torch.zeros(0),
        "d": torch.arange(13, dtype=torch.int64),
    }
    return tensors, {k: (stf.st_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()}


def test_direct_writer_across_chunks_and_file_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_writer._DirectAppender, "CHUNK", 64 * 1024)
    tensors, plan = _big_plan_and_tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    header = stf.read_header(src)
    out = tmp_path / "out.safetensors"
    writer = shard_writer.ShardWriter(out, plan, direct=True)
    for name, t in tensors.items():
        info = header.tensors[name]
        writer.write(name, stf.FileSlice(src, info.dtype, info.shape, info.begin, info.nbytes) if name in "ab" else t)
    writer.close()
    assert out.stat().st_size == writer.nbytes
    got = stf.read_header(out)
    for name, t in tensors.items():
        assert torch.equal(stf.read_tensor(got.tensors[name], out), t), name


def test_filesystem_that_refuses_direct_writes(tmp_path, monkeypatch):
    """EINVAL from a direct write: the writer turns O_DIRECT off on that file and carries on through the cache."""
    import errno

    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_writer._DirectAppender, "CHUNK", 64 * 1024)
    monkeypatch.setattr(os, "pwrite", pwrite)
    tensors, plan = _big_plan_and_tensors()
    shard_writer.write_state_dict(tmp_path, iter(tensors.items()), plan, direct=True)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    if hasattr(os, "O_DIRECT") and not _is_tmpfs(tmp_path):
        assert refused
    got = stf.read_header(tmp_path / stf.SINGLE_NAME)
    for name, t in tensors.items():
        assert torch.equal(stf.read_tensor(got.tensors[name], tmp_path / stf.SINGLE_NAME), t), name


def _is_tmpfs(path) -> bool:
    try:
        fd, direct = shard_writer._open_for_writing(path / ".probe", True)
    except OSError:
        return True
    os.close(fd)
    os.unlink(path / ".probe")
    return not direct
