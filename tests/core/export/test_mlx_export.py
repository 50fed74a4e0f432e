"""Adapters to mlx-lm and back, checked by mlx-lm itself (mlx's CPU build runs on Linux).

The conversions are exact (ΔW equal); mlx-lm's logits with an exported adapter equal PEFT's within float32 noise on
tiny Llama and Qwen2 bases; an adapter that mlx-lm's own LoRA layers hold, attached here, gives mlx-lm's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import factories
import pytest
import torch
from cli_helpers import run_in_process

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.mlx_format import is_mlx_adapter, mlx_origin, mlx_refusal, mlx_to_peft, peft_to_mlx
from lora_studio.core.errors import UserError
from lora_studio.core.export import ExportRequest, export_gguf, plan_export
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session

IDS = [1, 5, 17, 30, 42, 7, 11]


def like_a_hub_checkpoint(folder: Path) -> Path:
    """Hub configs name rope_theta at the top (transformers 5 saves it only inside rope_parameters, which mlx-lm
    0.32 does not read)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-bases")
    return {
        "llama": like_a_hub_checkpoint(factories.make_llama(root / "llama")),
        "qwen2": like_a_hub_checkpoint(factories.make_qwen2(root / "qwen2")),
    }


def delta_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's ΔW = scaling · B · A, as PEFT applies it."""
    config = adapter_files.read_adapter_config(folder)
    tensors = adapter_files.load_tensors(folder)
    out = {}
    for module, entry in adapter_files.layout(tensors).lora.items():
        out[module] = config.scaling_for(module) * tensors[entry.b].double() @ tensors[entry.a].double()
    return out


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor([IDS])).logits[0]


def test_peft_to_mlx_and_back_gives_the_same_update(tmp_path, bases):
    """rsLoRA, rank_pattern and alpha_pattern are folded and padded into mlx-lm's one rank and scale; the way back
    trims the padding: every module's ΔW comes back, and the modules mlx-lm adapts beyond the adapter are zero."""
    adapter = factories.make_adapter(
        bases["llama"],
        tmp_path / "peft",
        r=4,
        target_modules=("q_proj", "v_proj", "down_proj"),
        use_rslora=True,
        rank_pattern={"v_proj": 8},
        alpha_pattern={"down_proj": 3},
        layers_to_transform=[1],
    )
    (mlx := tmp_path / "mlx").mkdir()
    summary = peft_to_mlx(adapter, mlx, num_hidden_layers=2)
    assert (summary.rank, summary.num_layers, summary.modules, summary.zero_filled) == (8, 1, 3, 0)
    assert summary.padded == 2 and summary.folded >= 1
    assert is_mlx_adapter(mlx) and not is_mlx_adapter(adapter)
    (back := tmp_path / "back").mkdir()
    mlx_to_peft(mlx, back)
    before, after = delta_weights(adapter), delta_weights(back)
    assert sorted(before) == sorted(after)
    for module in before:
        torch.testing.assert_close(after[module], before[module], rtol=1e-5, atol=1e-7)  # float32 folding
    ranks = {m: e for m, e in adapter_files.layout(adapter_files.load_tensors(back)).lora.items()}
    assert adapter_files.read_adapter_config(back).rank_for(next(m for m in ranks if m.endswith("v_proj"))) == 8


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mlx_lm_runs_the_exported_adapter_as_peft_does(tmp_path, bases, family):
    base = bases[family]
    adapter = factories.make_adapter(
        base, tmp_path / "peft", r=4, target_modules=("q_proj", "v_proj", "up_proj"), rank_pattern={"q_proj": 8}
    )
    out = tmp_path / "pirate-mlx"
    result = export_gguf(ExportRequest(resolve_source(str(base)), out, "mlx", adapter=adapter))
    v = result.verification
    assert v.status == "pass", v.summary()
    assert v.greedy_agreement == 1.0 and v.max_abs_logit_diff is not None and v.max_abs_logit_diff < 1e-4
    assert v.runtime.startswith("mlx-lm")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapters.safetensors"]
    assert "Verification: PASS" in (out / "README.md").read_text()
    commands = result.bundle.commands
    assert commands["mlx-lm"].startswith(f"mlx_lm.generate --model {base} --adapter-path {out}")
    assert "mlx_lm.server" in commands["mlx-lm server"]


def make_mlx_lm_adapter(base: Path, folder: Path, *, dora: bool = False) -> Path:
    """An adapter as mlx-lm's trainer saves one: its own LoRA (or DoRA) layers on the loaded model, trained (here:
    random B), ``adapters.safetensors`` of the trainable parameters and the run's config."""
    script = f"""
import json, mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.tuner.utils import linear_to_lora_layers
model, _ = load({str(base)!r})
model.freeze()
params = {{"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}}
linear_to_lora_layers(model, 2, params, use_dora={dora})
mx.random.seed(3)
for name, value in tree_flatten(model.trainable_parameters()):
    if name.endswith("lora_b"):
        model.update(tree_unflatten([(name, mx.random.normal(value.shape) * 0.05)]))
    if name.endswith(".m"):
        model.update(tree_unflatten([(name, value * 1.1)]))
mx.save_safetensors({str(folder / "adapters.safetensors")!r}, dict(tree_flatten(model.trainable_parameters())))
json.dump({{"model": {str(base)!r}, "fine_tune_type": {"dora" if dora else "lora"!r}, "num_layers": 2,
           "lora_parameters": params}}, open({str(folder / "adapter_config.json")!r}, "w"))
"""
    folder.mkdir()
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return folder


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_mlx_lm_adapter_attached_here_gives_mlx_lm_logits(tmp_path, bases, data_dir, dora):
    """Attached as it is, it becomes a PEFT adapter (converted once, into LoRA Studio's data folder); saved as PEFT
    (export --format peft), mlx-lm checks it against the folder it came from."""
    base = bases["llama"]
    mlx = make_mlx_lm_adapter(base, tmp_path / "trained-in-mlx", dora=dora)
    session = Session()
    session.load(resolve_source(str(base)), dtype="float32")
    attached = session.attach(mlx)
    assert attached.name == "trained-in-mlx"
    assert any("converted from mlx-lm" in n for n in attached.notes) and not attached.warnings
    assert attached.path.is_relative_to(data_dir) and mlx_origin(attached.path) == mlx
    with torch.no_grad():
        ours = session.model(torch.tensor([IDS])).logits[0]
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model = load(str(base), adapter_path=str(mlx))[0]
    theirs = torch.from_numpy(np.array(model(mx.array([IDS]))[0].astype(mx.float32)))
    assert float((ours - theirs).abs().max()) < 1e-4
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)(torch.tensor([IDS])).logits[0]
    assert float((ours - plain).abs().max()) > 1e-3  # the adapter changes the outputs
    out = tmp_path / "as-peft"
    result = export_gguf(ExportRequest(resolve_source(str(base)), out, "peft", adapter=mlx))
    assert result.verification.status == "pass", result.verification.summary()
    assert adapter_files.read_adapter_config(out).use_dora is dora
    torch.testing.assert_close(peft_logits(base, out), ours, rtol=0, atol=1e-5)
    session.close()


def test_what_mlx_lm_cannot_hold_is_refused_before_writing(tmp_path, bases, gguf_llama, capsys):
    base = bases["llama"]
    saved_head = factories.make_adapter(base, tmp_path / "head", modules_to_save=["lm_head"])
    assert "modules_to_save" in mlx_refusal(saved_head)
    on_head = factories.make_adapter(base, tmp_path / "on-head", target_modules=("q_proj", "lm_head"))
    assert "lm_head" in mlx_refusal(on_head)
    biased = factories.make_adapter(base, tmp_path / "biased", lora_bias=True)
    assert "biases" in mlx_refusal(biased)
    base_gguf = export_gguf(
        ExportRequest(resolve_source(str(gguf_llama)), tmp_path / "b.gguf", "gguf", "f16", verify=False)
    ).out
    adapter = factories.make_adapter(gguf_llama, tmp_path / "for-gguf")
    plan = plan_export(ExportRequest(resolve_source(str(base_gguf)), tmp_path / "o", "mlx", adapter=adapter))
    assert plan.refusal == "mlx-lm loads Hugging Face folders; this base is a GGUF file"
    full = tmp_path / "full"
    full.mkdir()
    (full / "adapters.safetensors").write_bytes(b"")
    (full / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 2}))
    with pytest.raises(UserError, match="full fine-tune"):
        mlx_to_peft(full, tmp_path / "x")
    argv = ["export", base, "--adapter", saved_head, "--format", "mlx", "--out", tmp_path / "o"]
    code, _, err = run_in_process(capsys, argv)
    assert code == 2 and "modules_to_save" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_merged_folder_loads_in_mlx_lm_with_the_adapter_s_outputs(tmp_path, bases):
    """The merged Hugging Face folder for mlx_lm.load: its config names rope_theta where mlx-lm reads it, even when
    the base (saved by transformers 5) keeps it only in rope_parameters."""
    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save

    base = factories.make_qwen2(tmp_path / "qwen2-t5")  # rope_theta only inside rope_parameters
    adapter = factories.make_adapter(base, tmp_path / "peft", target_modules=("q_proj", "v_proj"))
    merged = tmp_path / "merged"
    merge_and_save(resolve_source(str(base)), [AdapterSpec("a", adapter)], MergeOptions(merged))
    assert json.loads((merged / "config.json").read_text())["rope_theta"] == 10000.0
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    model = load(str(merged))[0]
    theirs = torch.from_numpy(np.array(model(mx.array([IDS]))[0].astype(mx.float32)))
    assert float((peft_logits(base, adapter) - theirs).abs().max()) < 1e-4


def test_a_dora_adapter_on_some_layers_runs_in_mlx_lm_and_comes_back(tmp_path, bases):
    """DoRA's magnitudes go over as mlx-lm's ``m``; a layer mlx-lm adapts beyond the adapter keeps the base's own
    norms (no ``m`` written), so it is the base's layer, and the way back leaves it out."""
    base = bases["llama"]
    adapter = factories.make_adapter(base, tmp_path / "dora", use_dora=True, layers_to_transform=[0], scale=3.0)
    out = tmp_path / "dora-mlx"
    result = export_gguf(ExportRequest(resolve_source(str(base)), out, "mlx", adapter=adapter))
    assert result.details["mlx"]["fine_tune_type"] == "dora" and result.details["mlx"]["zero_filled"] == 2
    assert result.verification.status == "pass", result.verification.summary()
    (back := tmp_path / "back").mkdir()
    mlx_to_peft(out, back)
    torch.testing.assert_close(peft_logits(base, back), peft_logits(base, adapter), rtol=0, atol=1e-5)


def test_the_cli_takes_an_mlx_lm_adapter_wherever_it_takes_an_adapter(tmp_path, bases, data_dir, capsys):
    """inspect, compare, merge, export…: the folder goes in as its PEFT conversion, which stderr names."""
    base = bases["llama"]
    mlx = make_mlx_lm_adapter(base, tmp_path / "trained-in-mlx")
    code, out, err = run_in_process(capsys, ["inspect", base, "--adapter", mlx, "--json"])
    assert code == 0, err
    assert "converted from mlx-lm's format" in err
    assert json.loads(out)["adapters"][0]["r"] == 4
    merged = tmp_path / "merged"
    code, _, err = run_in_process(capsys, ["merge", base, "--adapter", mlx, "--out", merged, "--no-verify"])
    assert code == 0, err
    assert (merged / "config.json").is_file()
