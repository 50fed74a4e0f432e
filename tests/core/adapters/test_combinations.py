"""Combinations that cannot fail late: each type's needs are checked from the configs, a working type is picked,
and a combination is saved as a standard PEFT adapter folder (real PEFT, tiny models)."""

from __future__ import annotations

import json

import factories
import pytest
import torch

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.combinations import (
    CombinationMember,
    add_combination,
    combination_refusal,
    fitting_combination,
    member_from_config,
)
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.merge import AdapterSpec, MergeOptions, plan_merge, save_combination
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.tasks import CancelToken

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[1, 5, 7, 9, 3, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def members(llama_adapters) -> list[CombinationMember]:
    return [member_from_config(n, adapter_files.read_adapter_config(p)) for n, p in llama_adapters.items()]


def test_plan_refuses_linear_with_unequal_ranks_before_loading(tiny_llama, llama_adapters, tmp_path):
    """alpha r=4 + beta r=8: one clear line from the plan (headers and configs only), naming a type that works."""
    specs = [AdapterSpec("alpha", llama_adapters["alpha"], 0.5), AdapterSpec("beta", llama_adapters["beta"], 0.5)]
    for combination, density in (("linear", None), ("ties", 0.5), ("dare_linear", 0.5), ("magnitude_prune", 0.5)):
        options = MergeOptions(out=tmp_path / "o", combination=combination, density=density)
        with pytest.raises(UserError) as info:
            plan_merge(resolve_source(tiny_llama), specs, options)
        text = str(info.value)
        assert f"with {combination}: it needs adapters of the same rank (alpha r=4, beta r=8)" in text
        assert "\n" not in info.value.message and "cat (exact, rank 12)" in info.value.hint
        assert "svd (keeps rank 8)" in info.value.hint
    for combination in ("cat", "svd"):  # these take any ranks
        plan = plan_merge(resolve_source(tiny_llama), specs, MergeOptions(out=tmp_path / "o", combination=combination))
        assert plan.refusal is None and plan.engine == "in-memory"
    assert not (tmp_path / "o").exists()


def test_default_type_fits_the_adapters(llama_adapters):
    unequal = members(llama_adapters)
    assert fitting_combination(unequal) == "cat"  # nothing chosen: the exact one
    assert fitting_combination(unequal, "linear") == "svd"  # a rank-keeping choice: the rank-keeping type that fits
    assert fitting_combination(unequal, "ties") == "svd"
    assert fitting_combination(unequal, "cat") == "cat"
    equal = [CombinationMember("a", 8), CombinationMember("b", 8)]
    assert fitting_combination(equal, "linear") == "linear"
    assert combination_refusal(equal, "linear") is None
    # per-layer ranks differ although r agrees
    patterned = [CombinationMember("a", 8), CombinationMember("b", 8, rank_pattern=(("q_proj", 4),))]
    assert "b r=8 with per-layer ranks" in combination_refusal(patterned, "linear")[0]


def test_parts_a_combination_would_lose_are_refused():
    plain = CombinationMember("plain", 4)
    cases = {
        "DoRA adapter": CombinationMember("d", 4, use_dora=True),
        "trains lm_head in full": CombinationMember("m", 4, full_modules=("lm_head",)),
        "target_parameters": CombinationMember("p", 4, target_parameters=True),
        "by a regex": CombinationMember("x", 4, regex_targets=True),
    }
    for words, member in cases.items():
        for combination in ("cat", "svd", "linear"):
            refusal = combination_refusal([plain, member], combination)
            assert refusal is not None and words in refusal[0], (words, combination)
    assert combination_refusal([cases["DoRA adapter"]], "cat") is None  # one adapter: a plain merge


def test_rslora_combination_is_the_weighted_sum(models_dir, tiny_llama):
    """PEFT copies use_rslora into the combination and would scale its (already scaled) update by sqrt(r)."""
    rs = {
        "rs4": factories.make_adapter(tiny_llama, models_dir / "comb-rs4", seed=51, use_rslora=True),
        "rs8": factories.make_adapter(tiny_llama, models_dir / "comb-rs8", seed=52, r=8, use_rslora=True),
    }
    pm = factories.peft_model(tiny_llama, rs)
    name = add_combination(pm, ["rs4", "rs8"], [1.0, 0.5], "cat", new_name="mix")
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.get_delta_weight("rs4") + 0.5 * layer.get_delta_weight("rs8")
    assert torch.allclose(layer.get_delta_weight(name), want, atol=1e-6)


@pytest.fixture
def session(tiny_llama, llama_adapters):
    s = factories.alpha_beta_session(tiny_llama, llama_adapters)
    yield s
    s.close()


def test_saved_combination_loads_in_peft_and_equals_the_session(session, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = session.state()
    out = tmp_path / "mix-adapter"
    saved = save_combination(session, ["alpha", "beta"], [0.7, 0.3], "cat", out)
    assert saved.out == out and saved.rank == 12 and "adapter_model.safetensors" in saved.files
    assert session.state() == before and "lora_studio_combined" not in session.model.peft_config
    with (
        session.temporary_combination("ref", [("alpha", 0.7), ("beta", 0.3)], "cat"),
        session.variant_selected("ref") as model,
    ):
        in_session = logits(model)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["peft_type"] == "LORA"
    assert not list(tmp_path.glob(".mix-adapter.partial-*"))  # written atomically: no temporary left

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out)).eval()
    assert torch.allclose(logits(loaded), in_session, atol=1e-5)
    assert adapter_files.read_adapter_config(out).r == 12  # our own reader accepts it too

    with pytest.raises(UserError, match="already exists"):
        save_combination(session, ["alpha", "beta"], [0.7, 0.3], "cat", out)
    with pytest.raises(UserError, match="same rank"):
        save_combination(session, ["alpha", "beta"], [0.5, 0.5], "linear", tmp_path / "lin")
    assert not (tmp_path / "lin").exists()
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        save_combination(session, ["alpha", "beta"], [0.5, 0.5], "svd", tmp_path / "cancelled", cancel=token)
    assert not (tmp_path / "cancelled").exists() and session.state() == before


def test_saved_combination_from_folders(tiny_llama, llama_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    specs = [AdapterSpec("alpha", llama_adapters["alpha"]), AdapterSpec("beta", llama_adapters["beta"])]
    out = tmp_path / "svd-adapter"
    saved = save_combination(resolve_source(tiny_llama), specs, [1.0, -0.5], "svd", out)
    assert saved.rank == 8 and saved.combination == "svd"
    ref = factories.peft_model(tiny_llama, dict(llama_adapters))
    add_combination(ref, ["alpha", "beta"], [1.0, -0.5], "svd", new_name="mix")
    ref.set_adapter("mix")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out)).eval()
    assert torch.allclose(logits(loaded), logits(ref), atol=1e-5)
