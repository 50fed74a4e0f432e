"""The streaming engine gives PEFT's merge_and_unload bits exactly, or refuses."""

from __future__ import annotations

import pytest
import torch

import factories
from lora_studio.core.errors import UserError
from lora_studio.core.merge_streaming import load_streaming_adapter, stream_merged_tensors, stream_plan, streaming_refusal


def streamed(base, adapter, dtype, tied=False, reuse=True):
    plan = stream_plan(base, dtype)
    loaded = load_streaming_adapter(adapter, plan.sources, tied)
    # reuse_buffers: what merge_and_save runs; each tensor is copied before the next overwrites it
    return {k: v.clone() for k, v in stream_merged_tensors(plan, loaded, dtype, reuse_buffers=reuse)}


def peft_merged(base, adapter, dtype):
    return factories.peft_model(base, {"x": adapter}, dtype=dtype).merge_and_unload().state_dict()


def assert_bit_identical(got, ref):
    missing = set(ref) - set(got)
    assert missing <= {"lm_head.weight"}  # tied: saved once, as the checkpoint does
    for name, tensor in got.items():
        assert tensor.dtype == ref[name].dtype, name
        assert torch.equal(tensor, ref[name]), name


@pytest.fixture(scope="module")
def rslora_bf16(models_dir, tiny_llama_bf16):
    return factories.make_adapter(tiny_llama_bf16, models_dir / "merge-rslora-bf16", r=8, lora_alpha=16, use_rslora=True, seed=21,
                                  dtype="bfloat16", target_modules=("q_proj", "k_proj", "gate_proj", "down_proj", "embed_tokens"))


@pytest.mark.parametrize("dtype, reuse", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_llama_bit_identical_to_peft(tiny_llama, llama_adapters, dtype, reuse):
    got = streamed(tiny_llama, llama_adapters["beta"], dtype, reuse=reuse)
    ref = peft_merged(tiny_llama, llama_adapters["beta"], dtype)
    assert_bit_identical(got, ref)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           streamed(tiny_llama, llama_adapters["alpha"], dtype)["model.layers.0.self_attn.q_proj.weight"])


def test_rslora_and_embedding_in_bf16_and_fp16(tiny_llama_bf16, rslora_bf16):
    for dtype in ("bfloat16", "float16"):
        assert_bit_identical(streamed(tiny_llama_bf16, rslora_bf16, dtype), peft_merged(tiny_llama_bf16, rslora_bf16, dtype))


def test_gpt2_conv1d_fan_in_fan_out(tiny_gpt2, gpt2_adapter):
    for dtype in ("bfloat16", "float32"):  # float32: the transposed update is copied out of the scratch buffer
        got = streamed(tiny_gpt2, gpt2_adapter, dtype)
        assert_bit_identical(got, peft_merged(tiny_gpt2, gpt2_adapter, dtype))
    assert "lm_head.weight" not in got  # GPT-2 ties its head to wte


def test_tied_embeddings_stay_tied(models_dir, tiny_llama_tied):
    adapter = factories.make_adapter(tiny_llama_tied, models_dir / "merge-tied", seed=22)
    got = streamed(tiny_llama_tied, adapter, "float32", tied=True)
    assert "lm_head.weight" not in got
    assert_bit_identical(got, peft_merged(tiny_llama_tied, adapter, "float32"))
    # adapting the tied embedding itself is left to the in-memory engine
    emb = factories.make_adapter(tiny_llama_tied, models_dir / "merge-tied-emb", seed=23, target_modules=("embed_tokens",))
    assert "tied embedding" in streaming_refusal(emb, stream_plan(tiny_llama_tied, "float32").sources, True)


def test_dora_and_lora_bias_are_refused(models_dir, tiny_llama):
    plan = stream_plan(tiny_llama, "float32")
    dora = factories.make_adapter(tiny_llama, models_dir / "merge-dora", seed=24, use_dora=True)
    assert "DoRA" in streaming_refusal(dora, plan.sources, False)
    with pytest.raises(UserError, match="in-memory"):
        load_streaming_adapter(dora, plan.sources)
    bias = factories.make_adapter(tiny_llama, models_dir / "merge-bias", seed=25, lora_bias=True)
    assert "lora_bias" in streaming_refusal(bias, plan.sources, False)
