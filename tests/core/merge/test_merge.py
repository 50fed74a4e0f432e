"""merge_and_save: the saved folder, its model card and verification, atomicity, cancel, disk checks."""

from __future__ import annotations

import errno
import json

import factories
import pytest
import torch

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.io.shard_writer import ShardWriter
from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save, plan_merge
from lora_studio.core.merge import plan as merge_plan
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.tasks import CancelToken

QUICK = dict(verify_prompts=("The quick brown fox",), verify_tokens=4)


@pytest.fixture(scope="module")
def rslora(models_dir, tiny_llama_bf16):
    return factories.make_adapter(
        tiny_llama_bf16,
        models_dir / "save-rslora",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        seed=41,
        target_modules=("q_proj", "v_proj", "up_proj"),
    )


def siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name)


def test_streaming_save_is_a_deployable_verified_folder(tmp_path, tiny_llama_bf16, rslora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    progress = []
    result = merge_and_save(
        resolve_source(tiny_llama_bf16),
        [AdapterSpec("rs", rslora)],
        MergeOptions(out=out, **QUICK),
        report=progress.append,
    )
    assert result.engine == "streaming" and result.dtype == "bfloat16"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert "adapter_config.json" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    bytes_reports = [p for p in progress if p.unit == "bytes"]
    assert bytes_reports[-1].done == bytes_reports[-1].total == result.bytes_written
    assert result.verification.status == "pass"
    card = (out / "README.md").read_text()
    for needle in (
        str(tiny_llama_bf16),
        "config.json sha256",
        "| rs | 1 | 8 | 16 | yes |",
        "streaming",
        "bfloat16",
        "PASS",
        "0.1.0",
    ):
        assert needle in card
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and tokenizer.chat_template
    ref = factories.peft_model(tiny_llama_bf16, {"rs": rslora}, dtype="bfloat16").merge_and_unload().state_dict()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    assert siblings(out) == ["merged"]


def test_session_in_memory_combination_leaves_session_as_it_was(tmp_path, tiny_llama, llama_adapters):
    from lora_studio.core.session import Session

    session = Session()
    session.load(resolve_source(tiny_llama))
    for name, path in llama_adapters.items():
        session.attach(path, name)
    session.activate("alpha")
    before = session.state()
    adapters = [AdapterSpec("alpha", llama_adapters["alpha"], 0.6), AdapterSpec("beta", llama_adapters["beta"], 0.4)]
    result = merge_and_save(
        session.source, adapters, MergeOptions(out=tmp_path / "mix", combination="cat", **QUICK), session=session
    )
    assert result.engine == "in-memory" and result.verification.status == "pass"
    assert session.state() == before and set(session.model.peft_config) == {"alpha", "beta"}
    card = (tmp_path / "mix" / "README.md").read_text()
    assert "cat" in card and "| beta | 0.4 | 8 | 16 |" in card
    session.close()


def test_cancel_leaves_no_folder(tmp_path, tiny_llama, llama_adapters):
    out = tmp_path / "cancelled"
    token = CancelToken()

    def report(p):
        if p.unit == "bytes" and p.done > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        merge_and_save(
            resolve_source(tiny_llama),
            [AdapterSpec("a", llama_adapters["alpha"])],
            MergeOptions(out=out, verify=False),
            cancel=token,
            report=report,
        )
    assert not out.exists() and siblings(out) == []


def test_disk_full_is_a_clear_error_and_cleans_up(tmp_path, tiny_llama, llama_adapters, monkeypatch):
    out = tmp_path / "full"

    def fail(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", fail)
    with pytest.raises(UserError, match="full"):
        merge_and_save(
            resolve_source(tiny_llama), [AdapterSpec("a", llama_adapters["alpha"])], MergeOptions(out=out, verify=False)
        )
    assert not out.exists() and siblings(out) == []


def test_existing_folder_needs_overwrite(tmp_path, tiny_llama, llama_adapters):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = [AdapterSpec("a", llama_adapters["alpha"])]
    with pytest.raises(UserError, match="already exists"):
        merge_and_save(resolve_source(tiny_llama), spec, MergeOptions(out=out, verify=False))
    assert (out / "keep.txt").read_text() == "mine"
    merge_and_save(resolve_source(tiny_llama), spec, MergeOptions(out=out, verify=False, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_tied_embeddings_are_saved_once(tmp_path, tiny_llama_tied):
    from lora_studio.core.io.safetensors_format import read_headers

    adapter = factories.make_adapter(tiny_llama_tied, tmp_path / "ad", seed=42)
    out = tmp_path / "tied"
    merge_and_save(resolve_source(tiny_llama_tied), [AdapterSpec("a", adapter)], MergeOptions(out=out, verify=False))
    names = {n for h in read_headers(out) for n in h.tensors}
    assert "lm_head.weight" not in names and json.loads((out / "config.json").read_text())["tie_word_embeddings"]


def test_plan_predicts_and_refuses(tmp_path, tiny_llama, llama_adapters, monkeypatch):
    source = resolve_source(tiny_llama)
    spec = [AdapterSpec("a", llama_adapters["alpha"])]
    plan = plan_merge(source, spec, MergeOptions(out=tmp_path / "o"))
    assert plan.engine == "streaming" and plan.refusal is None
    s, m = plan.predictions["streaming"], plan.predictions["in-memory"]
    assert s.peak_ram_bytes < m.peak_ram_bytes and plan.output_bytes > 0
    dora = factories.make_adapter(tiny_llama, tmp_path / "dora", seed=43, use_dora=True)
    plan = plan_merge(source, [AdapterSpec("d", dora)], MergeOptions(out=tmp_path / "o"))
    assert plan.engine == "in-memory" and "DoRA" in plan.predictions["streaming"].reason
    with pytest.raises(UserError, match="streaming engine cannot"):
        merge_and_save(source, [AdapterSpec("d", dora)], MergeOptions(out=tmp_path / "o", engine="streaming"))
    monkeypatch.setattr(merge_plan.paths, "free_disk", lambda path: 1000)
    plan = plan_merge(source, spec, MergeOptions(out=tmp_path / "o"))
    assert plan.refusal and "free" in plan.refusal and plan.engine is None
    with pytest.raises(UserError, match="only"):
        merge_and_save(source, spec, MergeOptions(out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_streaming_with_a_session_verifies_against_it(tmp_path, tiny_llama, llama_adapters):
    from lora_studio.core.session import Session

    session = Session()
    session.load(resolve_source(tiny_llama))
    session.attach(llama_adapters["alpha"], "alpha")
    session.attach(llama_adapters["beta"], "beta", activate=False)
    session.disable_adapters()
    before = session.state()
    result = merge_and_save(
        session.source,
        [AdapterSpec("beta", llama_adapters["beta"])],
        MergeOptions(out=tmp_path / "b", dtype="float32", **QUICK),
        session=session,
    )
    assert result.engine == "streaming" and result.verification.status == "pass"
    assert session.state() == before
    session.close()
