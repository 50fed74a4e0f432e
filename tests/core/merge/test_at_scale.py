"""Merging one adapter at a scale: the saved weights equal PEFT's merge after ``set_scale``, in both engines."""

import factories
import pytest
import torch
from safetensors.torch import load_file

from lora_studio.core.errors import UserError
from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
from lora_studio.core.model.sources import resolve_source

pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = 0.6


def peft_merged_at(base, adapter, scale: float) -> dict:
    from peft.tuners.lora import LoraLayer

    model = factories.peft_model(base, {"a": adapter}, active="a")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("a", scale)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("engine", ["streaming", "in-memory"])
def test_merged_at_a_scale_equals_peft(tmp_path, tiny_llama, llama_adapters, engine):
    out = tmp_path / engine
    result = merge_and_save(
        resolve_source(tiny_llama),
        [AdapterSpec("a", llama_adapters["beta"], SCALE)],
        MergeOptions(out=out, engine=engine, verify_tokens=4, verify_prompts=("hello",)),
    )
    assert result.verification is not None and result.verification.status == "pass"
    ours = load_file(str(out / "model.safetensors"))
    theirs = peft_merged_at(tiny_llama, llama_adapters["beta"], SCALE)
    changed = 0
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name].to(tensor.dtype)), name
        changed += not torch.equal(tensor, load_file(str(tiny_llama / "model.safetensors"))[name])
    assert changed > 0
    assert f"scale {SCALE:g}" in (out / "README.md").read_text()


def test_a_session_merge_uses_the_requested_scale_and_keeps_the_session_s(tmp_path, tiny_llama, llama_adapters):
    session = factories.alpha_beta_session(tiny_llama, llama_adapters)
    try:
        session.set_scale("beta", 1.3)
        out = tmp_path / "session"
        merge_and_save(
            session.source,
            [AdapterSpec("beta", llama_adapters["beta"], SCALE)],
            MergeOptions(out=out, engine="in-memory", verify=False),
            session=session,
        )
        theirs = peft_merged_at(tiny_llama, llama_adapters["beta"], SCALE)
        for name, tensor in load_file(str(out / "model.safetensors")).items():
            assert torch.equal(tensor, theirs[name]), name
        assert session.scales == {"beta": 1.3}
    finally:
        session.close()


@pytest.mark.parametrize("scale", [float("nan"), -0.5, 9.0])
def test_a_bad_scale_is_refused_before_any_work(tmp_path, tiny_llama, llama_adapters, scale):
    with pytest.raises(UserError, match="scale"):
        merge_and_save(
            resolve_source(tiny_llama),
            [AdapterSpec("a", llama_adapters["alpha"], scale)],
            MergeOptions(out=tmp_path / "x", verify=False),
        )
    assert not (tmp_path / "x").exists()
