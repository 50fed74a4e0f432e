"""A GGUF's metadata is read once per file as it is, and what the window read goes with the work to a worker."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import pytest
from arch_zoo import SMOLLM2_DIR, SMOLLM2_GGUF

from lora_studio.core.model import config as model_config
from lora_studio.core.model import estimate
from lora_studio.core.model.file_reads import carried_reads, take_reads
from lora_studio.core.model.sources import resolve_source


def test_what_one_process_read_of_a_gguf_another_takes_and_a_rewritten_file_is_read_again(tmp_path, monkeypatch):
    spec = importlib.util.find_spec(SMOLLM2_DIR)
    assert spec is not None and spec.submodule_search_locations
    gguf = shutil.copy(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF, tmp_path / SMOLLM2_GGUF)
    source = resolve_source(Path(gguf))
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
    stat = os.stat(gguf)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file rewritten since the window read it
    with pytest.raises(AssertionError, match="read again"):
        model_config.gguf_config(source)


def test_a_gguf_base_load_reads_its_configuration_and_tensors_once(tmp_path, monkeypatch):
    """A load reads the GGUF four times in all (our configuration and tensors, transformers' weights and tokenizer),
    and a plan after it reads nothing: transformers takes the remembered configuration, the check of the load takes
    the embedding rows read with the tensors."""
    import gguf

    from lora_studio.core.session import Session

    spec = importlib.util.find_spec(SMOLLM2_DIR)
    assert spec is not None and spec.submodule_search_locations
    path = shutil.copy(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF, tmp_path / SMOLLM2_GGUF)
    source = resolve_source(Path(path))
    readers: list[str] = []
    build_fields = gguf.GGUFReader._build_fields  # once a read, after the file is mapped

    def counted(self, *args, **kwargs):
        readers.append(str(self.data.filename))
        return build_fields(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "_build_fields", counted)
    session = Session()
    session.load(source)
    assert len(readers) == 4 and set(readers) == {str(source.file)}
    config, footprint = model_config.gguf_config(source), estimate.read_footprint(source)
    assert len(readers) == 4 and footprint == session.footprint
    assert session.model is not None
    loaded = session.model.config.to_dict()
    assert {k: v for k, v in config.items() if k not in ("dtype", "_name_or_path")} == {
        k: v for k, v in loaded.items() if k not in ("dtype", "_name_or_path")
    }
    session.close()
