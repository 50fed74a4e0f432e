"""The streaming engine gives PEFT's merge_and_unload bits exactly, or refuses."""

from __future__ import annotations

import factories
import pytest
import torch

from lora_studio.core.errors import UserError
from lora_studio.core.merge.streaming import (
    load_streaming_adapter,
    stream_merged_tensors,
    stream_plan,
    streaming_refusal,
)


def streamed(base, adapter, dtype, tied=False, reuse=True):
    import json

    plan = stream_plan(base, dtype)
    model_type = json.loads((base / "config.json").read_text()).get("model_type")
    loaded = load_streaming_adapter(adapter, plan.sources, tied, model_type)
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
    return factories.make_adapter(
        tiny_llama_bf16,
        models_dir / "merge-rslora-bf16",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        seed=21,
        dtype="bfloat16",
        target_modules=("q_proj", "k_proj", "gate_proj", "down_proj", "embed_tokens"),
    )


@pytest.mark.parametrize("dtype, reuse", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
def test_llama_bit_identical_to_peft(tiny_llama, llama_adapters, dtype, reuse):
    got = streamed(tiny_llama, llama_adapters["beta"], dtype, reuse=reuse)
    ref = peft_merged(tiny_llama, llama_adapters["beta"], dtype)
    assert_bit_identical(got, ref)
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"],
        streamed(tiny_llama, llama_adapters["alpha"], dtype)["model.layers.0.self_attn.q_proj.weight"],
    )


def test_rslora_and_embedding_in_bf16_and_fp16(tiny_llama_bf16, rslora_bf16):
    for dtype in ("bfloat16", "float16"):
        assert_bit_identical(
            streamed(tiny_llama_bf16, rslora_bf16, dtype), peft_merged(tiny_llama_bf16, rslora_bf16, dtype)
        )


def test_gpt2_conv1d_fan_in_fan_out(tiny_gpt2, gpt2_adapter):
    for dtype in ("bfloat16", "float32"):  # float32: the transposed update is copied out of the scratch buffer
        got = streamed(tiny_gpt2, gpt2_adapter, dtype)
        assert_bit_identical(got, peft_merged(tiny_gpt2, gpt2_adapter, dtype))
    assert "lm_head.weight" not in got  # GPT-2 ties its head to wte


def test_row_blocks_never_leave_a_short_block():
    from lora_studio.core.merge import streaming as merge_streaming

    rows = merge_streaming._BLOCK_ELEMENTS // 2048  # 256 rows of a 2048-wide weight
    assert merge_streaming._row_blocks(5632, 2048)[:2] == [(0, rows), (rows, 2 * rows)]
    blocks = merge_streaming._row_blocks(2 * rows + 10, 2048)
    assert blocks == [(0, rows), (rows, 2 * rows + 10)]  # the 10-row remainder joins the last block
    assert merge_streaming._row_blocks(rows, 2048) is None  # too small to be worth blocking
    assert merge_streaming._row_blocks(4096, 1 << 20) is None  # rows too wide for a block of 64 rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_row_blocked_merge_is_bit_identical_to_peft(models_dir, monkeypatch, dtype):
    """Small blocks, so a tiny model goes through the blocked path (q: 2 blocks; gate/up: 3, the last with 72 rows)."""
    from lora_studio.core.merge import streaming as merge_streaming

    monkeypatch.setattr(merge_streaming, "_BLOCK_ELEMENTS", 64 * 128)
    monkeypatch.setattr(merge_streaming, "_BLOCKING_EXACT", {})
    base = models_dir / "blocked-llama"
    if not base.exists():
        factories.make_llama(base, hidden_size=128, intermediate_size=200, seed=9)
    adapter = models_dir / "blocked-adapter"
    if not adapter.exists():  # scaling 12/8 = 1.5: not a power of two, so no rounding step can hide
        factories.make_adapter(
            base, adapter, r=8, lora_alpha=12, seed=23, target_modules=("q_proj", "gate_proj", "up_proj", "down_proj")
        )
    assert_bit_identical(streamed(base, adapter, dtype), peft_merged(base, adapter, dtype))
    assert merge_streaming._BLOCKING_EXACT and all(merge_streaming._BLOCKING_EXACT.values())


def test_a_shape_whose_blocks_differ_is_merged_whole(models_dir, tiny_llama_bf16, monkeypatch):
    from lora_studio.core.merge import streaming as merge_streaming

    monkeypatch.setattr(merge_streaming, "_BLOCK_ELEMENTS", 16 * 32)  # 16-row blocks of the 64x32 gate/up weights
    monkeypatch.setattr(merge_streaming, "_BLOCK_ROWS_MULTIPLE", 16)
    monkeypatch.setattr(merge_streaming, "_BLOCKING_EXACT", {})
    real_equal, compared = torch.equal, []

    def never_equal(x, y):  # as if this BLAS rounded a 16-row product differently from the whole
        compared.append(x.shape)
        return False

    monkeypatch.setattr(torch, "equal", never_equal)
    adapter = factories.make_adapter(
        tiny_llama_bf16,
        models_dir / "merge-whole-fallback",
        seed=24,
        dtype="bfloat16",
        target_modules=("gate_proj", "up_proj"),
    )
    got = streamed(tiny_llama_bf16, adapter, "bfloat16")
    monkeypatch.setattr(torch, "equal", real_equal)
    assert compared and merge_streaming._BLOCKING_EXACT and not any(merge_streaming._BLOCKING_EXACT.values())
    assert_bit_identical(got, peft_merged(tiny_llama_bf16, adapter, "bfloat16"))


def test_tied_embeddings_stay_tied(models_dir, tiny_llama_tied):
    adapter = factories.make_adapter(tiny_llama_tied, models_dir / "merge-tied", seed=22)
    got = streamed(tiny_llama_tied, adapter, "float32", tied=True)
    assert "lm_head.weight" not in got
    assert_bit_identical(got, peft_merged(tiny_llama_tied, adapter, "float32"))
    # adapting the tied embedding itself is left to the in-memory engine
    emb = factories.make_adapter(
        tiny_llama_tied, models_dir / "merge-tied-emb", seed=23, target_modules=("embed_tokens",)
    )
    assert "tied embedding" in streaming_refusal(emb, stream_plan(tiny_llama_tied, "float32").sources, True)


def test_dora_and_lora_bias_are_refused(models_dir, tiny_llama):
    plan = stream_plan(tiny_llama, "float32")
    dora = factories.make_adapter(tiny_llama, models_dir / "merge-dora", seed=24, use_dora=True)
    assert "DoRA" in streaming_refusal(dora, plan.sources, False)
    with pytest.raises(UserError, match="in-memory"):
        load_streaming_adapter(dora, plan.sources)
    bias = factories.make_adapter(tiny_llama, models_dir / "merge-bias", seed=25, lora_bias=True)
    assert "lora_bias" in streaming_refusal(bias, plan.sources, False)


@pytest.mark.parametrize("wrong", ["linear-says-conv1d", "conv1d-says-linear"])
def test_fan_in_fan_out_follows_the_layer_as_peft_does(wrong, tmp_path, tiny_llama, tiny_gpt2):
    """PEFT corrects a fan_in_fan_out that contradicts the layer type (with a warning); so does the streaming engine,
    for square and non-square weights alike."""
    import shutil

    from lora_studio.core.adapters import compatibility

    if wrong == "linear-says-conv1d":
        base, kwargs, flag = tiny_llama, {"target_modules": ("q_proj", "v_proj", "o_proj")}, True
    else:
        base, kwargs, flag = tiny_gpt2, {"target_modules": ("c_attn", "c_proj", "c_fc"), "fan_in_fan_out": True}, False
    made = factories.make_adapter(base, tmp_path / "made", seed=51, **kwargs)
    adapter = shutil.copytree(made, tmp_path / "wrong")
    factories.edit_adapter_config(adapter, fan_in_fan_out=flag)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        reference = peft_merged(base, adapter, "float32")
    assert_bit_identical(streamed(base, adapter, "float32"), reference)
    shapes = compatibility.weight_shapes_from_headers(base)
    model_type = "gpt2" if base == tiny_gpt2 else "llama"
    warnings = compatibility.check(adapter, shapes, model_type=model_type).warnings
    assert any("applied per layer as PEFT does" in w for w in warnings)
