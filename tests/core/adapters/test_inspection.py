"""Adapter inspection numbers checked against what PEFT itself computes."""

import math

import factories
import pytest
import torch

from lora_studio.core.adapters.inspection import delta_spectrum, inspect_adapter


def _peft_deltas(base, adapter, name="a"):
    pm = factories.peft_model(base, {name: adapter})
    from peft.tuners.lora import LoraLayer

    out = {}
    for module_name, module in pm.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            out[module_name] = module.get_delta_weight(name).detach().double()
    return pm, out


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=8),
        dict(r=8, lora_alpha=16, use_rslora=True),
        dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}),
    ],
)
def test_norms_and_singular_values_match_peft(tiny_llama, tmp_path, kwargs):
    adapter = factories.make_adapter(tiny_llama, tmp_path / "ad", **kwargs)
    pm, deltas = _peft_deltas(tiny_llama, adapter)
    info = inspect_adapter(adapter)
    assert {m.module for m in info.modules} == set(deltas)
    for m in info.modules:
        ref = deltas[m.module]
        assert m.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(ref)), rel=1e-6)
        ref_sv = torch.linalg.svdvals(ref)[: m.r]
        assert m.singular_values == pytest.approx(ref_sv.tolist(), rel=1e-6, abs=1e-9)
        assert m.scaling == pytest.approx(pm.base_model.model.get_submodule(m.module).scaling["a"])


def test_scaling_rslora_and_percent(tiny_llama, tmp_path):
    adapter = factories.make_adapter(tiny_llama, tmp_path / "rs", r=16, lora_alpha=8, use_rslora=True)
    info = inspect_adapter(adapter, base_params=39072)
    assert info.use_rslora and info.scaling == pytest.approx(8 / math.sqrt(16))
    pm = factories.peft_model(tiny_llama, {"a": adapter})
    lora_params = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert info.params == lora_params
    assert info.percent_of_base == pytest.approx(100 * lora_params / 39072)


def test_modules_to_save_dora_and_embedding_counted(tiny_llama, tmp_path):
    adapter = factories.make_adapter(
        tiny_llama,
        tmp_path / "dora",
        use_dora=True,
        modules_to_save=["lm_head"],
        target_modules=("q_proj", "embed_tokens"),
    )
    info = inspect_adapter(adapter)
    assert info.use_dora and info.modules_to_save == ["lm_head"]
    kinds = {m.module: m.kind for m in info.modules}
    assert kinds["model.embed_tokens"] == "embedding"
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert info.params == sum(
            f.get_slice(k).get_shape()[0]
            * (f.get_slice(k).get_shape()[1] if len(f.get_slice(k).get_shape()) > 1 else 1)
            for k in f.keys()  # noqa: SIM118 - safe_open has keys() but is not iterable
        )


def test_spectrum_from_factors_matches_dense():
    torch.manual_seed(0)
    a, b = torch.randn(3, 50), torch.randn(40, 3)
    dense = torch.linalg.svdvals(0.5 * b.double() @ a.double())[:3]
    assert delta_spectrum(a, b, 0.5) == pytest.approx(dense.tolist(), rel=1e-9)


def test_gpt2_conv1d_adapter(tiny_gpt2, gpt2_adapter):
    _, deltas = _peft_deltas(tiny_gpt2, gpt2_adapter)
    info = inspect_adapter(gpt2_adapter)
    for m in info.modules:
        assert m.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(deltas[m.module])), rel=1e-6)


def test_init_method_of_the_demo_adapters():
    """The demo's bullets adapter was trained with OLoRA and converted to plain LoRA on save (its sidecar says so)."""
    from lora_studio.core.demo.assets import demo_dir

    adapters = demo_dir() / "adapters"
    bullets = inspect_adapter(adapters / "bullets")
    assert bullets.init_summary == "OLoRA, converted"
    assert bullets.init_lora_weights.startswith("olora (converted to plain LoRA")
    assert inspect_adapter(adapters / "pirate").init_summary == "default"
