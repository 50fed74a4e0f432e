"""The in-memory engine runs PEFT's own layer merge on copies: PEFT's bits, the model left as it was."""

from __future__ import annotations

import factories
import pytest
import torch

from lora_studio.core.adapters.combinations import add_combination, check_combination
from lora_studio.core.errors import UserError
from lora_studio.core.merge.in_memory import InMemoryPlan


def test_bit_identical_and_model_untouched(tiny_llama, llama_adapters):
    pm = factories.peft_model(tiny_llama, dict(llama_adapters), active="beta")
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    plan = InMemoryPlan(pm, "beta")
    got = dict(plan.tensors())
    assert list(plan.shapes()) == list(got)
    after = pm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.merged for m in pm.modules() if hasattr(m, "merged_adapters"))
    ref = pm.merge_and_unload(adapter_names=["beta"]).state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_dora_bf16(models_dir, tiny_llama_bf16):
    dora = factories.make_adapter(tiny_llama_bf16, models_dir / "mem-dora", seed=31, use_dora=True)
    pm = factories.peft_model(tiny_llama_bf16, {"d": dora}, dtype="bfloat16")
    got = dict(InMemoryPlan(pm, "d").tensors(safe_merge=True))
    ref = pm.merge_and_unload(safe_merge=True).state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def same_rank_adapters(models_dir, tiny_llama, llama_adapters):
    gamma = factories.make_adapter(tiny_llama, models_dir / "mem-gamma", seed=32, target_modules=("q_proj", "o_proj"))
    return {"alpha": llama_adapters["alpha"], "beta": gamma}


def test_weighted_combination_equals_peft(tiny_llama, llama_adapters, same_rank_adapters):
    for combination, density in (("cat", None), ("svd", None), ("linear", None), ("ties", 0.5)):
        adapters = same_rank_adapters if combination in ("linear", "ties") else llama_adapters
        pm = factories.peft_model(tiny_llama, dict(adapters))
        name = add_combination(pm, ["alpha", "beta"], [0.7, 0.3], combination, density, "mix")
        got = dict(InMemoryPlan(pm, name).tensors())
        ref_model = factories.peft_model(tiny_llama, dict(adapters))
        kwargs = {"density": density} if density else {}
        torch.manual_seed(0)
        ref_model.add_weighted_adapter(["alpha", "beta"], [0.7, 0.3], "mix", combination_type=combination, **kwargs)
        ref_model.set_adapter("mix")
        ref = ref_model.merge_and_unload(adapter_names=["mix"]).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), combination


def test_unequal_ranks_refused_for_linear(tiny_llama, llama_adapters):
    pm = factories.peft_model(tiny_llama, dict(llama_adapters))
    with pytest.raises(UserError, match="same rank"):
        add_combination(pm, ["alpha", "beta"], [0.5, 0.5], "ties", 0.5)


def test_combination_requests_are_checked():
    with pytest.raises(UserError, match="combination"):
        check_combination(["a", "b"], [1, 1], None, None)
    with pytest.raises(UserError, match="density"):
        check_combination(["a", "b"], [1, 1], "ties", None)
    with pytest.raises(UserError, match="2 weights for 3"):
        check_combination(["a", "b", "c"], [1, 1], "linear", None)
    with pytest.raises(UserError, match="unknown combination"):
        check_combination(["a", "b"], [1, 1], "average", None)
    with pytest.raises(UserError, match="outside"):
        check_combination(["a", "b"], [1, 1], "dare_linear", 1.5)
