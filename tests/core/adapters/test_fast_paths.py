"""Shortcuts taken for speed give exactly what the slow, general path gives."""

from __future__ import annotations

import dataclasses
import json
import os

import factories
import pytest
import torch

from lora_studio.core._compat import peft_config
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.io.safetensors_format import FileSlice, read_header, read_tensor
from lora_studio.core.io.shard_writer import ShardWriter
from lora_studio.core.model.loading import added_tokens_hint


def test_static_lora_field_list_matches_the_installed_peft():
    # The list lets read_adapter_config skip importing PEFT; it is only trusted for the version it was taken from.
    if peft_config.installed_peft_version() != peft_config.LOCKED_PEFT_VERSION:
        pytest.skip("another PEFT is installed: the static list is not used")
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)} | peft_config.EXTRA_CONFIG_KEYS
    assert fields == peft_config.LORA_FIELDS


def test_unknown_keys_still_checked_against_peft(monkeypatch):
    calls = []
    real = peft_config.peft_config_fields
    monkeypatch.setattr(peft_config, "peft_config_fields", lambda: calls.append(1) or real())
    assert peft_config.unknown_config_keys({"r": 8, "peft_type": "LORA"}) == []
    assert peft_config.unknown_config_keys({"r": 8, "quantum_rank": 3}) == ["quantum_rank"]
    assert calls  # a key outside the static list is looked up in the installed LoraConfig


def test_finite_check_finds_bad_and_absurd_values(tmp_path):
    good = {"a": torch.ones(4, 4), "b": torch.full((3,), -9e5, dtype=torch.bfloat16)}
    adapter_files.check_finite(good, tmp_path)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(5, dtype=torch.bfloat16)
        t[2] = bad
        with pytest.raises(Exception, match="NaN/Inf"):
            adapter_files.check_finite({"x": t}, tmp_path)
    # finite, but no trainer writes it, and B·A of it is Inf in any 16-bit merge
    with pytest.raises(Exception, match="values up to 3e\\+38"):
        adapter_files.check_finite({"lora_B": torch.full((3,), 3e38)}, tmp_path)


def test_added_tokens_hint_loads_the_same_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    factories.make_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)  # the transformers 5 save format
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("special_tokens_map.json", "added_tokens.json"):
        if (folder / name).exists():
            os.remove(folder / name)
    hint = added_tokens_hint(folder)
    assert hint and all(isinstance(k, int) for k in hint["added_tokens_decoder"])
    plain = AutoTokenizer.from_pretrained(str(folder))
    fast = AutoTokenizer.from_pretrained(str(folder), **hint)
    assert type(plain) is type(fast)
    assert plain.added_tokens_decoder == fast.added_tokens_decoder
    assert plain.special_tokens_map == fast.special_tokens_map
    text = "<|im_start|>user hello <|endoftext|> world<|im_end|>"
    assert plain(text)["input_ids"] == fast(text)["input_ids"]
    a, b = tmp_path / "a", tmp_path / "b"
    plain.save_pretrained(a)
    fast.save_pretrained(b)
    for f in sorted(os.listdir(a)):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_added_tokens_hint_steps_aside(tmp_path):
    folder = tmp_path / "tok"
    factories.make_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert added_tokens_hint(folder) == {}  # transformers reads the config's own entries
    assert added_tokens_hint(tmp_path / "missing") == {}


def test_file_slice_is_copied_byte_for_byte(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    tensors = {"a": torch.randn(7, 3), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(5).to(torch.bfloat16)}
    save_file(tensors, str(src))
    header = read_header(src)
    plan = {n: (header.tensors[n].dtype, header.tensors[n].shape) for n in ("a", "b", "c")}
    out = tmp_path / "out.safetensors"
    writer = ShardWriter(out, plan)
    writer.write("a", FileSlice(src, "F32", (7, 3), header.tensors["a"].begin, header.tensors["a"].nbytes))
    writer.write("b", tensors["b"])
    info = header.tensors["c"]
    writer.write("c", FileSlice(src, info.dtype, info.shape, info.begin, info.nbytes))
    writer.close()
    got = read_header(out)
    for name, t in tensors.items():
        assert torch.equal(read_tensor(got.tensors[name], out), t), name
