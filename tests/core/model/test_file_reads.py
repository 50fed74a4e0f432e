"""A GGUF's metadata is read once per file as it is, and what the window read goes with the work to a worker."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from lora_studio.core.demo.model import demo_gguf_path
from lora_studio.core.model import config as model_config
from lora_studio.core.model import estimate
from lora_studio.core.model.file_reads import carried_reads, take_reads
from lora_studio.core.model.sources import resolve_source


@pytest.fixture
def demo_gguf(tmp_path) -> Path:
    """A copy of the demo's GGUF: a file of this test's own, remembered reads and all."""
    path = demo_gguf_path()
    assert path is not None, "the demo model is not installed (make install)"
    return Path(shutil.copy(path, tmp_path / path.name))


def test_what_one_process_read_of_a_gguf_another_takes_and_a_rewritten_file_is_read_again(
    demo_gguf, tmp_path, monkeypatch
):
    source = resolve_source(demo_gguf)
    config, footprint = model_config.gguf_config(source), estimate.read_footprint(source)
    carried = pickle.loads(pickle.dumps(carried_reads(source.file)))  # as it crosses to the worker process
    assert sorted(kind for kind, _, _ in carried.values) == ["gguf config", "gguf tensors"]
    assert carried_reads(tmp_path / "other.gguf").values == ()

    # the worker: nothing read yet, and no reading allowed
    model_config._GGUF_CONFIGS.clear()
    estimate._GGUF_TENSORS.clear()

    def read_again(source):
        raise AssertionError(f"{source.label} read again")

    monkeypatch.setattr(model_config, "_read_gguf_config", read_again)
    monkeypatch.setattr(estimate, "_read_gguf_tensors", read_again)
    take_reads(carried)
    assert model_config.gguf_config(source) == config and estimate.read_footprint(source) == footprint
    stat = os.stat(demo_gguf)
    os.utime(demo_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file rewritten since the window read it
    with pytest.raises(AssertionError, match="read again"):
        model_config.gguf_config(source)


def test_a_gguf_base_load_reads_its_configuration_and_tensors_once(demo_gguf, gguf_reads):
    """A load reads the GGUF four times in all (our configuration and tensors, transformers' weights and tokenizer),
    and a plan after it reads nothing: transformers takes the remembered configuration, the check of the load takes
    the embedding rows read with the tensors."""
    from lora_studio.core.session import Session

    source = resolve_source(demo_gguf)
    session = Session()
    session.load(source)
    assert gguf_reads == [demo_gguf.name] * 4
    config, footprint = model_config.gguf_config(source), estimate.read_footprint(source)
    assert gguf_reads == [demo_gguf.name] * 4 and footprint == session.footprint
    assert session.model is not None
    loaded = session.model.config.to_dict()
    assert {k: v for k, v in config.items() if k not in ("dtype", "_name_or_path")} == {
        k: v for k, v in loaded.items() if k not in ("dtype", "_name_or_path")
    }
    session.close()
