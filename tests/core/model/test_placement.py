"""Your devices, your placement: --max-memory parsed, accelerate's plan per device, and a base spread over the CPU
and disk (a tiny real Llama, real PEFT adapters) answering exactly as the same base in memory."""

from __future__ import annotations

from pathlib import Path

import factories
import pytest
import torch

from lora_studio.core.errors import UserError
from lora_studio.core.model.placement import parse_max_memory, placed_layers, plan_placement
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session


def test_max_memory_is_read_as_accelerate_takes_it_and_a_wrong_part_is_named():
    assert parse_max_memory("cuda:0=20GiB, cuda:1=1.5GB,cpu=64GiB,disk=100MB") == {
        0: 20 * 1024**3,
        1: 1_500_000_000,
        "cpu": 64 * 1024**3,
        "disk": 100_000_000,
    }
    assert parse_max_memory("cuda:0=20GiB,cpu=512MiB") == {0: 20 * 1024**3, "cpu": 512 * 1024**2}
    for bad, named in (
        ("cpu", "'cpu' is not DEVICE=SIZE"),
        ("cpu=lots", "'lots' is not a size"),
        ("gpu0=1GiB", "'gpu0' is not a device"),
        ("cpu=1GiB,cpu=2GiB", "name cpu twice"),
        (" , ", "are empty"),
    ):
        with pytest.raises(UserError, match=named):
            parse_max_memory(bad)


def test_layers_are_named_by_device_with_runs_folded():
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    device_map |= {"model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk", "lm_head": 0}
    assert placed_layers(device_map) == {
        "cpu": "embed_tokens, layers 0–1",
        "disk": "layers 2–3, norm",
        "cuda:0": "lm_head",
    }


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    base = factories.make_llama(root / "base", num_hidden_layers=4)
    adapters = {
        f"a{seed}": factories.make_adapter(
            base, root / f"a{seed}", seed=seed, target_modules=("q_proj", "v_proj", "down_proj")
        )
        for seed in (1, 2)
    }
    return base, adapters


def test_a_base_spread_over_cpu_and_disk_answers_as_in_memory_with_every_adapter(spread, tmp_path, monkeypatch):
    base, adapters = spread
    monkeypatch.chdir(tmp_path)  # PEFT's copies of offloaded files must not land under the working directory
    source = resolve_source(base)
    whole, placed = Session(), Session()
    whole.load(source)
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    limits = {"cpu": size // 2}
    plan = plan_placement(source, "float32", limits)
    assert set(plan.bytes_per_device) == {"cpu", "disk"} and plan.bytes_per_device["cpu"] <= size // 2
    state = placed.load(source, max_memory=limits)
    assert {device for device, _ in state.placement} == {"cpu", "disk"}
    # the plan is the placement the load makes, and counts every weight once
    assert placed_layers(plan.device_map) == placed.placement()
    buffers = sum(b.numel() * b.element_size() for b in whole.model.buffers())  # rotary frequencies
    assert sum(plan.bytes_per_device.values()) == size + buffers
    offload = Path(placed._offload.name)  # the disk's layers are read from the checkpoint's safetensors
    ids = torch.tensor([[1, 5, 9, 13, 17]])

    def logits(session: Session) -> torch.Tensor:
        with torch.no_grad():
            return session.model(input_ids=ids).logits

    try:
        assert torch.equal(logits(whole), logits(placed))
        for name, path in adapters.items():
            whole.attach(path, name)
            placed.attach(path, name)
            assert torch.equal(logits(whole), logits(placed)), name
        assert any(offload.rglob("*.safetensors"))  # PEFT's copies, with the adapter's factors, are the session's
        # a generation in inference mode, then a switch: the offloaded layers' adapters switch too
        with placed.variant_selected("a1") as model, torch.inference_mode():
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        for name in adapters:
            whole.activate(name)
            placed.activate(name)
            assert torch.equal(logits(whole), logits(placed)), name
        whole.disable_adapters()
        placed.disable_adapters()
        assert torch.equal(logits(whole), logits(placed))
    finally:
        whole.close()
        placed.close()
    assert not offload.exists()  # the session's offload folder goes with the base
    assert not list(tmp_path.iterdir())


def test_the_plan_counts_a_tied_head_once_and_places_it_with_its_embedding(tmp_path):
    base = factories.make_llama(tmp_path / "tied", num_hidden_layers=4, tie_word_embeddings=True)
    source = resolve_source(base)
    session = Session()
    try:
        session.load(source)
        size = sum(p.numel() * p.element_size() for p in session.model.parameters())  # the tied tensor once
        limits = {"cpu": size // 2}
        plan = plan_placement(source, "float32", limits)
        session.load(source, max_memory=limits)
        buffers = sum(b.numel() * b.element_size() for b in session.model.buffers())
        assert placed_layers(plan.device_map) == session.placement()
        assert sum(plan.bytes_per_device.values()) == size + buffers
    finally:
        session.close()


def test_a_device_this_machine_lacks_is_one_line_before_loading(spread):
    base, _ = spread
    if torch.cuda.is_available():
        pytest.skip("a machine with CUDA has cuda:0")
    with pytest.raises(UserError, match=r"name cuda:0; this machine has no CUDA device"):
        Session().load(resolve_source(base), max_memory={0: 1024, "cpu": 1024})


def test_the_cli_plans_places_and_says_where(spread, capsys):
    import json

    from cli_helpers import run_in_process

    base, adapters = spread
    limits = "cpu=115KB"
    code, out, err = run_in_process(capsys, ["inspect", base, "--max-memory", limits, "--json"])
    assert code == 0, err
    planned = json.loads(out)["placement"]
    assert set(planned["bytes_per_device"]) == {"cpu", "disk"}
    argv = ["compare", base, "--adapter", f"a={adapters['a1']}", "--prompt", "hi", "--max-new-tokens", "2"]
    code, out, err = run_in_process(capsys, [*argv, "--max-memory", limits, "--json"])
    assert code == 0, err
    placed = next(line for line in err.splitlines() if line.startswith("lora-studio: placed "))
    assert all(f"{device}: {layers}" in placed for device, layers in planned["layers"].items())
    code, out, err = run_in_process(capsys, [*argv, "--max-memory", "gpu=1GB"])
    assert code == 2 and "is not a device" in err and len(err.strip().splitlines()) == 1
