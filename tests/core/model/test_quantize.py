"""Quantize on load: the base's linear weights in 4 or 8 bits through bitsandbytes (its CPU kernels), adapters on it
exactly as PEFT puts them on the same quantised model, and what cannot be quantised refused in one line."""

from __future__ import annotations

import json
import re

import factories
import pytest
import torch
from cli_helpers import run_in_process

from lora_studio.core.errors import UserError
from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
from lora_studio.core.model.estimate import estimate
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency")

IDS = torch.tensor([[5, 17, 42, 99, 120, 7]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_on_quantized(base, adapters: dict, kind: str):
    """The reference: PEFT's own PeftModel on the same model quantised by transformers + bitsandbytes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_studio.core.model.quantize import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=quantization_config(kind, "float32"), device_map={"": "cpu"}
    )
    items = list(adapters.items())
    pm = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        pm.load_adapter(str(path), adapter_name=name)
    return pm.eval()


def nf4_session_with(base, adapters: dict) -> Session:
    """A session with ``base`` quantised to nf4 on load and ``adapters`` attached (closing it is the caller's)."""
    session = Session()
    try:
        session.load(resolve_source(base), quantize="nf4")
        for name, path in adapters.items():
            session.attach(path, name)
    except BaseException:
        session.close()
        raise
    return session


@pytest.mark.parametrize(("kind", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_a_base_quantized_on_load_takes_adapters_as_peft_does(kind, layer, gguf_llama, gguf_llama_adapters):
    session = Session()
    try:
        state = session.load(resolve_source(gguf_llama), quantize=kind)
        assert type(session.model.model.layers[0].self_attn.q_proj).__name__ == layer
        assert state.quantization and f"bitsandbytes {kind}" in state.quantization
        base = logits(session.model)
        for name, path in gguf_llama_adapters.items():
            session.attach(path, name)
        ref = peft_on_quantized(gguf_llama, gguf_llama_adapters, kind)
        for name in gguf_llama_adapters:
            session.activate(name)
            ref.set_adapter(name)
            assert torch.allclose(logits(session.model), logits(ref), atol=1e-5), name
            assert not torch.allclose(logits(session.model), base, atol=1e-3), name
        session.disable_adapters()
        assert torch.allclose(logits(session.model), base, atol=1e-6)
    finally:
        session.close()


def test_evaluate_and_chat_on_a_quantized_base_equal_peft_on_the_same_model(gguf_llama, gguf_llama_adapters, tmp_path):
    from lora_studio.core.compare import Variant
    from lora_studio.core.compare.chat import Conversation, chat_prompt_ids, chat_turn
    from lora_studio.core.evaluate import datasets
    from lora_studio.core.evaluate.run import evaluate
    from lora_studio.core.generation.generate import GenerationSettings

    rows = [{"instruction": "Say hello.", "answer": "Hello there."}, {"instruction": "Count.", "answer": "One, two."}]
    data = tmp_path / "tiny.val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    session = nf4_session_with(gguf_llama, gguf_llama_adapters)
    try:
        ref = peft_on_quantized(gguf_llama, gguf_llama_adapters, "nf4")
        eval_set = datasets.load_eval_set(data, session.tokenizer)
        variants = [Variant.base(), *(Variant.of_adapter(name) for name in gguf_llama_adapters)]
        result = evaluate(session, variants, [eval_set], mixed=False)
        for variant in variants:
            for example, got in zip(eval_set.examples, result.scores[variant.name], strict=True):
                ids = torch.tensor([list(example.prompt_ids) + list(example.answer_ids)])
                with torch.inference_mode():
                    if variant.name == "base":
                        with ref.disable_adapter():
                            out = ref(input_ids=ids).logits[0]
                    else:
                        ref.set_adapter(variant.name)
                        out = ref(input_ids=ids).logits[0]
                start = len(example.prompt_ids)
                nll = float(torch.nn.functional.cross_entropy(out[start - 1 : -1], ids[0, start:], reduction="sum"))
                assert got.nll == pytest.approx(nll, abs=1e-4), variant.name

        settings = GenerationSettings(max_new_tokens=6)
        turn = chat_turn(session, [Variant.of_adapter("alpha")], Conversation(), "Hello!", settings, mixed=False)
        prompt = chat_prompt_ids(session.tokenizer, [{"role": "user", "content": "Hello!"}])
        ref.set_adapter("alpha")
        with torch.inference_mode():
            generated = ref.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0
            )[0, len(prompt) :]
        expected = [t for t in generated.tolist() if t not in (session.tokenizer.eos_token_id,)]
        assert list(turn.replies["alpha"].token_ids)[: len(expected)] == expected and expected
    finally:
        session.close()


def test_what_cannot_be_quantized_on_load_is_one_line(gguf_llama, tmp_path):
    from lora_studio.core.export import ExportRequest, export_gguf

    gguf = export_gguf(
        ExportRequest(resolve_source(gguf_llama), tmp_path / "b.f16.gguf", "gguf", "f16", verify=False)
    ).out
    saved = tmp_path / "saved-quantized"
    factories.save_model(saved, factories.llama_config(hidden_size=64))
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (saved / "config.json").write_text(json.dumps(config))
    for source, kind, words in (
        (gguf, "nf4", "already quantised"),
        (saved, "nf4", "saved quantised (bitsandbytes)"),
        (gguf_llama, "q3", "unknown quantisation"),
    ):
        with pytest.raises(UserError, match=re.escape(words)) as caught:
            Session().load(resolve_source(source), quantize=kind)
        assert "\n" not in str(caught.value)


def test_the_estimate_counts_four_bit_weights(gguf_llama):
    source = resolve_source(gguf_llama)
    full = estimate(source, "float32", free_ram_bytes=10**12, gpus=[])
    nf4 = estimate(source, "float32", free_ram_bytes=10**12, gpus=[], quantize="nf4")
    int8 = estimate(source, "float32", free_ram_bytes=10**12, gpus=[], quantize="int8")
    assert nf4.weights_bytes < int8.weights_bytes < full.weights_bytes


def test_cli_compare_and_inspect_take_quantize(gguf_llama, gguf_llama_adapters, capsys):
    adapter = f"alpha={gguf_llama_adapters['alpha']}"
    compare = ["compare", gguf_llama, "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "3"]
    code, out, err = run_in_process(capsys, [*compare, "--quantize", "nf4", "--json"])
    assert code == 0, err
    assert json.loads(out)["variants"]
    code, out, err = run_in_process(capsys, ["inspect", gguf_llama, "--quantize", "nf4", "--json"])
    plain = json.loads(run_in_process(capsys, ["inspect", gguf_llama, "--json"])[1])
    assert code == 0 and json.loads(out)["base"]["quantize"] == "nf4"
    assert json.loads(out)["base"]["weights_bytes"] < plain["base"]["weights_bytes"]


# -- QLoRA -------------------------------------------------------------------------------------------------------------


# torch's warning when a backward runs through bitsandbytes' CPU inference kernel (it has none): wrong gradients
@pytest.mark.filterwarnings("error:.*autograd kernel was not registered:UserWarning")
def test_qlora_trains_on_a_four_bit_base_and_the_adapter_records_it(gguf_llama, tmp_path):
    from safetensors.torch import load_file

    from lora_studio.core.train import TrainRequest, TrainSettings, train_adapter
    from lora_studio.core.train.estimate import training_memory

    def rows(path, words):
        path.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"{w} {w}"}) + "\n" for w in words))
        return path

    data = rows(tmp_path / "train.jsonl", ["cat", "dog", "sun", "sea"] * 4)
    val = rows(tmp_path / "val.jsonl", ["red", "blue"])
    # no dropout, nothing held out: with and without the validation file, the same rows and random draws
    settings = TrainSettings(max_steps=6, eval_steps=2, save_steps=2, learning_rate=1e-2, batch_size=4, keep="last")
    settings = settings.with_changes(dropout=0.0, val_fraction=0.0, quantize="nf4")
    source = resolve_source(gguf_llama)
    full = training_memory(source, settings.with_changes(quantize=None))
    assert training_memory(source, settings).weights < full.weights
    points: list = []
    # evaluations (forwards outside training mode) and checkpoints (state dicts) between the steps ...
    result = train_adapter(TrainRequest(source, data, tmp_path / "qlora", settings, val), on_metrics=points.append)
    assert any(p.val_loss is not None for p in points) and (tmp_path / "qlora.checkpoints" / "checkpoint-2").is_dir()
    # ... change nothing: the same steps without them end with the same adapter
    plain = train_adapter(TrainRequest(source, data, tmp_path / "plain", settings))
    trained, reference = (load_file(str(a / "adapter_model.safetensors")) for a in (result.adapter, plain.adapter))
    assert all(torch.allclose(trained[k], reference[k], atol=1e-6) for k in reference)
    meta = json.loads((result.adapter / "lora_studio.json").read_text())
    assert meta["base"]["quantization"] == {
        "method": "bitsandbytes",
        "type": "nf4",
        "bits": 4,
        "block_size": 64,
        "compute_dtype": "float32",
    }
    assert meta["settings"]["quantize"] == "nf4" and "QLoRA" in (result.adapter / "README.md").read_text()
    # merged, its record names the base's quantisation: no flag needed
    merged = merge_and_save(source, [AdapterSpec("qlora", result.adapter)], MergeOptions(tmp_path / "m", verify=False))
    assert merged.quantized_base is not None and merged.quantized_base.quantize == "nf4"
    # attached to the same nf4 base, it answers as PEFT's own PeftModel on that base
    session = Session()
    try:
        session.load(source, quantize="nf4")
        session.attach(result.adapter, "qlora")
        ref = peft_on_quantized(gguf_llama, {"qlora": result.adapter}, "nf4")
        assert torch.allclose(logits(session.model), logits(ref), atol=1e-5)
    finally:
        session.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"init": "pissa"}, "pissa rewrites the base weights"), ({"baseline": True}, "baseline cannot train nf4")],
)
def test_qlora_refuses_what_a_four_bit_base_cannot_hold(gguf_llama, tmp_path, changes, message):
    from lora_studio.core.train import TrainRequest, TrainSettings, train_adapter

    settings = TrainSettings(quantize="nf4").with_changes(**changes)
    with pytest.raises(UserError, match=message):
        train_adapter(TrainRequest(resolve_source(gguf_llama), tmp_path / "none.jsonl", tmp_path / "out", settings))
    assert not (tmp_path / "out").exists()


def test_cli_train_takes_quantize(gguf_llama, tmp_path, capsys):
    argv = ["train", gguf_llama, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o", "--quantize", "nf4"]
    code, _out, err = run_in_process(capsys, [*argv, "--init", "olora"])
    assert code == 2 and "olora rewrites the base weights" in err and len(err.strip().splitlines()) == 1


def test_merge_onto_a_quantised_base_measures_both_candidates_and_keeps_the_closer(
    gguf_llama, gguf_llama_adapters, tmp_path
):
    from safetensors.torch import load_file

    source, adapter = resolve_source(gguf_llama), gguf_llama_adapters["alpha"]
    result = merge_and_save(source, [AdapterSpec("alpha", adapter)], MergeOptions(tmp_path / "auto", quantize="nf4"))
    target = result.quantized_base
    assert target is not None and target.asked == "auto" and set(target.kl) == {"original", "dequantized"}
    # what the adapter learned on is what the nf4 base computes: that candidate is (nearly) exact
    assert target.chosen == "dequantized" and target.kl["dequantized"] < 1e-6 < target.kl["original"]
    assert target.layers and all(layer.update > 0 and layer.gap > 0 for layer in target.layers)
    assert result.verification is not None and result.verification.status == "pass"  # the folder is that candidate
    card = (tmp_path / "auto" / "README.md").read_text()
    assert "Quantised base (QLoRA)" in card and "**dequantized**" in card and "‖W16 − dequant(Wq)‖" in card
    assert result.to_json()["quantized_base"]["chosen"] == "dequantized"

    # asked for the original weights: W16 + ΔW, a plain merge's tensors
    original = merge_and_save(
        source,
        [AdapterSpec("alpha", adapter)],
        MergeOptions(tmp_path / "original", quantize="nf4", merge_into="original", verify=False),
    )
    plain = merge_and_save(source, [AdapterSpec("alpha", adapter)], MergeOptions(tmp_path / "plain", verify=False))
    assert original.quantized_base is not None and original.quantized_base.chosen == "original"
    assert original.quantized_base.kl == {}  # not measured: asked
    ours, reference = (load_file(str(r.out / "model.safetensors")) for r in (original, plain))
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in reference)


def test_a_base_saved_in_four_bits_merges_with_the_folder_it_was_quantised_from(
    gguf_llama, gguf_llama_adapters, tmp_path, capsys
):
    saved = factories.save_quantised(gguf_llama, tmp_path / "saved-nf4")
    capsys.readouterr()  # transformers' own progress bars
    argv = ["merge", saved, "--adapter", gguf_llama_adapters["alpha"], "--json"]
    code, _out, err = run_in_process(capsys, [*argv, "--out", tmp_path / "refused"])
    assert code == 2 and "--full-precision" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_in_process(capsys, [*argv, "--out", tmp_path / "m", "--full-precision", gguf_llama])
    assert code == 0, err
    target = json.loads(out)["quantized_base"]
    assert target["quantize"] == "nf4" and target["saved_quantised"] == str(saved)
    # the saved 4-bit weights are what the adapter ran on: merged into them, the folder is that model
    assert target["chosen"] == "dequantized" and target["kl"]["dequantized"] < 1e-6 < target["kl"]["original"]
    assert json.loads(out)["verification"]["status"] == "pass"
    assert "The quantised weights are those saved in" in (tmp_path / "m" / "README.md").read_text()
    wrong = ["--full-precision", saved, "--out", tmp_path / "w"]
    code, _out, err = run_in_process(capsys, [*argv, *wrong])
    assert code == 2 and "not a 16/32-bit checkpoint" in err


def test_merge_into_without_a_quantised_base_is_one_line(gguf_llama, gguf_llama_adapters, tmp_path, capsys):
    argv = ["merge", gguf_llama, "--adapter", gguf_llama_adapters["alpha"], "--out", tmp_path / "m"]
    code, _out, err = run_in_process(capsys, [*argv, "--merge-into", "dequantized"])
    assert code == 2 and "trained on a quantised base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_a_folder_saved_in_four_bits_opens_as_it_is_and_takes_an_adapter(gguf_llama, gguf_llama_adapters, tmp_path):
    saved = factories.save_quantised(gguf_llama, tmp_path / "saved-nf4")
    session = Session()
    try:
        state = session.load(resolve_source(saved))
        assert state.quantization and "nf4" in state.quantization and "as saved" in state.quantization
        session.attach(gguf_llama_adapters["alpha"], "alpha")
        ref = peft_on_quantized(saved, {"alpha": gguf_llama_adapters["alpha"]}, "nf4")
        assert torch.allclose(logits(session.model), logits(ref), atol=1e-5)
    finally:
        session.close()


def test_a_qlora_merge_leaves_the_windows_session_as_it_was(gguf_llama, gguf_llama_adapters, tmp_path):
    import shutil

    from lora_studio.core.adapters.files import SIDECAR_NAME

    adapter = tmp_path / "qlora-alpha"  # an adapter whose record says it learned on the base in nf4
    shutil.copytree(gguf_llama_adapters["alpha"], adapter)
    record = {"method": "bitsandbytes", "type": "nf4", "bits": 4, "block_size": 64, "compute_dtype": "float32"}
    (adapter / SIDECAR_NAME).write_text(json.dumps({"base": {"quantization": record}}))
    source = resolve_source(gguf_llama)
    session = Session()  # the window's: the base in full precision, the adapter attached
    try:
        session.load(source)
        session.attach(adapter, "qlora")
        before = {name: p.detach().clone() for name, p in session.model.named_parameters()}
        result = merge_and_save(
            source, [AdapterSpec("qlora", adapter)], MergeOptions(tmp_path / "m", verify=False), session=session
        )
        assert result.quantized_base is not None and result.quantized_base.chosen == "dequantized"
        after = dict(session.model.named_parameters())
        assert all(torch.equal(before[name], after[name]) for name in before)
    finally:
        session.close()


def test_the_merge_plan_takes_a_session_loaded_quantised_and_a_recorded_qlora_adapter(
    gguf_llama, gguf_llama_adapters, tmp_path
):
    from lora_studio.core.merge import plan_merge

    source, adapter = resolve_source(gguf_llama), gguf_llama_adapters["alpha"]
    session = Session()
    try:
        session.load(source, quantize="nf4")
        session.attach(adapter, "alpha")
        for merge_into in (None, "original", "dequantized"):  # the session names the quantisation
            options = MergeOptions(tmp_path / "m", merge_into=merge_into)
            plan = plan_merge(source, [AdapterSpec("alpha", adapter)], options, session=session.state())
            assert plan.refusal is None and plan.engine == "in-memory", plan.refusal
    finally:
        session.close()


def test_compare_and_scale_on_a_four_bit_base_equal_peft_on_it(gguf_llama, gguf_llama_adapters):
    from lora_studio.core.compare import compare, session_variants
    from lora_studio.core.generation.generate import GenerationSettings

    session = nf4_session_with(gguf_llama, gguf_llama_adapters)
    try:
        ref = peft_on_quantized(gguf_llama, gguf_llama_adapters, "nf4")
        # a comparison in one mixed batch gives each variant's tokens as the variants run one at a time
        settings = GenerationSettings(max_new_tokens=8)
        prompts = ["hello world", "Paris is"]
        mixed = compare(session, session_variants(session), prompts, settings, score=False)
        alone = compare(session, session_variants(session), prompts, settings, mixed=False, score=False)
        assert mixed.mixed_batch, mixed.fallback_reason
        for a, b in zip(mixed.prompts, alone.prompts, strict=True):
            assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        # an adapter at a scale: PEFT's set_scale on the same quantised model
        session.activate("alpha")
        full_scale = logits(session.model)
        session.set_scale("alpha", 0.5)
        assert not torch.allclose(logits(session.model), full_scale, atol=1e-4)
        ref.set_adapter("alpha")
        from peft.tuners.lora import LoraLayer

        for module in ref.modules():  # PEFT's own per-layer scale
            if isinstance(module, LoraLayer):
                module.set_scale("alpha", 0.5)
        assert torch.allclose(logits(session.model), logits(ref), atol=1e-5)
    finally:
        session.close()


def test_a_merged_gguf_of_a_qlora_adapter_holds_the_chosen_weights_and_carries_the_adapter(
    gguf_llama, gguf_llama_adapters, tmp_path, capsys
):
    import shutil

    import gguf

    from lora_studio.core.adapters.files import SIDECAR_NAME
    from lora_studio.core.export import ExportRequest, export_gguf

    pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")
    adapter = tmp_path / "qlora-alpha"
    shutil.copytree(gguf_llama_adapters["alpha"], adapter)
    (adapter / SIDECAR_NAME).write_text(json.dumps({"base": {"quantization": {"type": "nf4"}}}))
    argv = ["export", gguf_llama, "--adapter", adapter, "--format", "gguf", "--type", "q8_0", "--json"]
    # the measured choice is the merge's own (tested with it); asked here, it is what the file is written from
    code, out, err = run_in_process(capsys, [*argv, "--merge-into", "dequantized", "--out", tmp_path / "m.q8_0.gguf"])
    assert code == 0, err
    result = json.loads(out)
    target = result["quantized_base"]
    assert target["asked"] == "dequantized" and target["chosen"] == "dequantized" and target["layers"]
    assert result["verification"]["status"] == "pass"
    # measured against the base the adapter learned on (dequantised), every tensor reproduced
    assert result["carried"]["status"] == "carried" and not result["carried"]["left_out"]
    readme = (tmp_path / "m.q8_0.gguf.serve" / "README.md").read_text()
    assert "Quantised base (QLoRA)" in readme and "**dequantized**" in readme
    assert "--quantization bitsandbytes" in result["bundle"]["commands"]["vllm"]  # served on the NF4 it learned on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.q8_0.gguf", "m.q8_0.gguf.serve", "qlora-alpha"]

    # the same tensors as the GGUF of the folder the measured merge writes
    merge_and_save(
        resolve_source(gguf_llama),
        [AdapterSpec("alpha", adapter)],
        MergeOptions(tmp_path / "folder", verify=False, merge_into="dequantized"),
    )
    export_gguf(ExportRequest(resolve_source(tmp_path / "folder"), tmp_path / "f.gguf", "gguf", "q8_0", verify=False))

    def tensors(path) -> dict[str, bytes]:
        return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(str(path)).tensors}

    assert tensors(tmp_path / "m.q8_0.gguf") == tensors(tmp_path / "f.gguf")

    code, _out, err = run_in_process(capsys, [*argv[:-1], "--merge-into", "sideways", "--out", tmp_path / "x.gguf"])
    assert code == 2 and len(err.strip().splitlines()) == 1
