"""Rank reduction: the reduced adapter, loaded by PEFT, applies the truncated SVD of every module's ΔW."""

import json

import factories
import pytest
import torch

from lora_studio.core.errors import UserError
from lora_studio.core.reduce import read_plan, reduce_adapter, reduction_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def peft_deltas(base, adapter) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module as PEFT computes it (get_delta_weight), in float64."""
    from peft.tuners.lora import LoraLayer

    model = factories.peft_model(base, {"a": adapter}, active="a")
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("a").detach().to(torch.float64)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "a" in module.lora_A
    }


def truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture(scope="module")
def rank8(models_dir, tiny_llama):
    return factories.make_adapter(
        tiny_llama, models_dir / "reduce-r8", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj", "o_proj"), seed=41
    )


def test_reduced_to_its_own_rank_the_adapter_is_unchanged(tmp_path, tiny_llama, rank8):
    out = tmp_path / "same"
    result = reduce_adapter(rank8, out, rank=8)
    assert result.r_after == 8 and result.energy_kept == pytest.approx(1.0)
    before, after = peft_deltas(tiny_llama, rank8), peft_deltas(tiny_llama, out)
    assert before.keys() == after.keys() and len(before) == 6
    for name, delta in before.items():
        torch.testing.assert_close(after[name], delta, atol=1e-5, rtol=1e-4)


def test_reduced_to_rank_k_is_the_truncated_svd_of_each_delta(tmp_path, tiny_llama, rank8):
    out = tmp_path / "k3"
    result = reduce_adapter(rank8, out, rank=3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {} and not config["use_rslora"]
    before, after = peft_deltas(tiny_llama, rank8), peft_deltas(tiny_llama, out)
    kept = []
    for name, delta in before.items():
        torch.testing.assert_close(after[name], truncated(delta, 3), atol=1e-5, rtol=1e-4)
        kept.append(float(truncated(delta, 3).norm() ** 2 / delta.norm() ** 2))
    assert result.params_after == 3 * result.params_before // 8
    assert min(kept) == pytest.approx(result.worst_module[1], rel=1e-4)
    card = (out / "README.md").read_text()
    assert "rank 8 to rank 3" in card and "sha256" in card and "rank-reduced" in card


def test_an_energy_target_gives_per_module_ranks_in_rank_pattern(tmp_path, tiny_llama, models_dir):
    # B scaled per module: some updates are nearly rank 1, so an energy target cuts them harder
    adapter = factories.make_adapter(tiny_llama, models_dir / "reduce-skewed", r=6, lora_alpha=6, seed=42)
    tensors_path = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tensors_path))
    for key, value in tensors.items():
        if "layers.0.self_attn.q_proj.lora_A" in key:
            value[1:] *= 0.01  # rank-1 dominated
    save_file(tensors, str(tensors_path))
    plan = read_plan(adapter)
    ranks = plan.ranks(energy=0.95)
    assert ranks["model.layers.0.self_attn.q_proj"] == 1 and max(ranks.values()) > 1
    out = tmp_path / "e95"
    result = reduce_adapter(plan, out, energy=0.95)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 1
    before, after = peft_deltas(tiny_llama, adapter), peft_deltas(tiny_llama, out)
    for name, delta in before.items():
        torch.testing.assert_close(after[name], truncated(delta, ranks[name]), atol=1e-5, rtol=1e-4)
        assert plan.modules[[m.module for m in plan.modules].index(name)].energy_at(ranks[name]) >= 0.95 - 1e-9
    assert result.mode == "energy" and result.energy_kept >= 0.95


def test_rslora_and_patterns_of_the_original_are_honoured(tmp_path, tiny_llama, models_dir):
    adapter = factories.make_adapter(
        tiny_llama,
        models_dir / "reduce-rslora",
        r=6,
        lora_alpha=12,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 3},
        seed=43,
    )
    out = tmp_path / "k5"
    reduce_adapter(adapter, out, rank=5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 5 and set(config["rank_pattern"].values()) == {4}
    before, after = peft_deltas(tiny_llama, adapter), peft_deltas(tiny_llama, out)
    for name, delta in before.items():
        k = 4 if name.endswith("v_proj") else 5
        torch.testing.assert_close(after[name], truncated(delta, k), atol=1e-5, rtol=1e-4)


def test_suggestions_grow_with_the_energy_target(rank8):
    plan = read_plan(rank8)
    ks = [s.uniform_rank for s in plan.suggestions()]
    assert ks == sorted(ks) and ks[0] >= 1 and ks[-1] <= 8
    for s in plan.suggestions():
        assert plan.uniform_energy(s.uniform_rank) >= s.energy
        assert s.uniform_rank == 1 or plan.uniform_energy(s.uniform_rank - 1) < s.energy
    curve = plan.modules[0].cumulative()
    assert curve == sorted(curve) and curve[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "not a positive whole number"),
        ({"energy": 1.5}, "between 0 and 1"),
        ({"rank": 2, "energy": 0.9}, "not both"),
        ({}, "not both"),
    ],
)
def test_bad_targets_are_one_line_refusals(tmp_path, rank8, kwargs, message):
    with pytest.raises(UserError, match=message):
        reduce_adapter(rank8, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_dora_and_outputs_over_the_input_are_refused(tmp_path, tiny_llama, models_dir, rank8):
    dora = factories.make_adapter(tiny_llama, models_dir / "reduce-dora", use_dora=True, seed=44)
    with pytest.raises(UserError, match="DoRA"):
        read_plan(dora)
    before = (rank8 / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="it would be replaced"):
        reduce_adapter(rank8, rank8, rank=2, overwrite=True)
    with pytest.raises(UserError, match="does not belong"):
        broken = tmp_path / "broken"
        broken.mkdir()
        for f in rank8.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        factories.edit_adapter_config(broken, r=5)
        read_plan(broken)
    assert (rank8 / "adapter_model.safetensors").read_bytes() == before


def test_the_cost_of_a_cut_is_measured_against_the_original(tmp_path, tiny_llama, rank8):
    from lora_studio.core.evaluate.datasets import EvalExample, EvalSet
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.session import Session

    same, cut = tmp_path / "same", tmp_path / "cut"
    reduce_adapter(rank8, same, rank=8)
    reduce_adapter(rank8, cut, rank=1)
    session = Session()
    try:
        session.load(resolve_source(tiny_llama))
        session.attach(rank8, "original")
        session.attach(same, "same")
        session.attach(cut, "cut")
        ids = session.tokenizer("hello world, how are you", add_special_tokens=False)["input_ids"]
        examples = tuple(EvalExample(i, "t", i + 1, tuple(ids[:3]), tuple(ids[3:]), "", "") for i in range(2))
        sets = [EvalSet("t", tmp_path / "t.jsonl", None, "text", examples)]
        unchanged = reduction_cost(session, "original", "same", sets, bootstrap_samples=50)
        costly = reduction_cost(session, "original", "cut", sets, bootstrap_samples=50)
    finally:
        session.close()
    assert unchanged.reference == "original"
    assert unchanged.overall("same").kl == pytest.approx(0.0, abs=1e-6)
    assert costly.overall("cut").kl > 1e-4
