"""GGUF export through llama.cpp's own converter: tiny Llama and Qwen2 models with real PEFT adapters, loaded back by
llama.cpp itself. The models carry the demo's SmolLM2 tokenizer: llama.cpp's converter knows its pre-tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from shlex import split as shlex_split

import arch_zoo
import factories
import pytest
from cli_helpers import llama_arguments

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.export import ExportRequest, export_gguf, plan_export
from lora_studio.core.export import merged as merged_mod
from lora_studio.core.export.converter import PINNED_VERSION
from lora_studio.core.export.runtime import GgufRunner
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.tasks import CancelToken

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_pair(root: Path, family: str, **config):
    """A tiny model (untied, with a tokenizer llama.cpp's converter knows) and an adapter on every linear layer,
    q/k included (the ones llama.cpp permutes)."""
    base = arch_zoo.make_family(root / "base", family, **{"tie_word_embeddings": False, **config})
    return base, factories.make_adapter(base, root / "adapter", target_modules=ALL_LINEAR, scale=3.0)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    # large random weights: clear greedy choices, so float16's rounding cannot flip one
    return model_pair(tmp_path_factory.mktemp("export-llama"), "llama", initializer_range=0.5)


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    return model_pair(tmp_path_factory.mktemp("export-qwen2"), "qwen2", initializer_range=0.5)


@pytest.fixture(scope="module")
def llama_quant_pair(tmp_path_factory):
    """256 wide, for the quantised types: rows of 32 are one quantisation block each (and K-quants need 256),
    harsher on quantisation than any real model."""
    return model_pair(tmp_path_factory.mktemp("export-llama-quant"), "llama", hidden_size=256, intermediate_size=512)


def export(base, out, fmt="gguf", type_name=None, adapter=None, **kw):
    return export_gguf(ExportRequest(resolve_source(base), out, fmt, type_name, adapter=adapter, **kw))


def greedy(model: Path, prompt_ids: list[int], n: int, lora: Path | None = None) -> list[int]:
    seq = list(prompt_ids)
    with GgufRunner(model, lora=lora, n_ctx=64) as runner:
        for _ in range(n):
            seq.append(int(runner.logits(seq)[-1].argmax()))
    return seq[len(prompt_ids) :]


def hf_greedy(base, adapter, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    model = factories.peft_model(base, {"a": adapter})
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt_ids) :]


@pytest.mark.parametrize("pair", ["llama_pair", "qwen2_pair"])
def test_f16_gguf_generates_the_adapter_models_tokens_in_llama_cpp(pair, request, tmp_path):
    base, adapter = request.getfixturevalue(pair)
    result = export(base, tmp_path / "m.f16.gguf", type_name="f16", adapter=adapter)
    v = result.verification
    assert v.status == "pass", v.summary()
    assert v.greedy_agreement == 1.0 and v.tokens_compared == 48
    assert v.sample is not None and v.sample["llama_cpp"] == v.sample["adapter"]  # llama.cpp's own greedy text
    assert v.template is not None and v.template.status == "pass" and v.template.same_prompt_tokens
    prompt = [5, 40, 41, 42, 43]
    assert greedy(result.out, prompt, 12) == hf_greedy(base, adapter, prompt, 12)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    modelfile = (result.bundle.folder / "Modelfile").read_text()
    assert (
        f"FROM {result.out}" in modelfile and "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    )
    assert "llama-server -m" in (result.bundle.folder / "README.md").read_text()


def test_q8_0_is_within_its_thresholds_and_the_planned_size(llama_quant_pair, tmp_path):
    base, adapter = llama_quant_pair
    request = ExportRequest(resolve_source(base), tmp_path / "m.gguf", "gguf", "q8_0", adapter=adapter)
    plan = plan_export(request)
    result = export_gguf(request)
    assert result.verification.status == "pass", result.verification.summary()
    assert result.verification.greedy_agreement >= 0.85
    assert result.bytes_written == pytest.approx(plan.output_bytes, rel=0.2)  # the header's strings on top


def test_the_k_quants_go_through_llama_cpps_quantiser(llama_quant_pair, tmp_path):
    base, adapter = llama_quant_pair
    result = export(base, tmp_path / "m.q4_k_m.gguf", type_name="q4_k_m", adapter=adapter)
    import gguf

    assert int(gguf.GGUFReader(str(result.out)).fields["general.file_type"].parts[-1][0]) == int(
        gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    # a random model's next-token distributions are nearly flat: its greedy choices flip at 4 bits, so the
    # distribution is what is checked here (the demo model's test checks the badge)
    v = result.verification
    assert v.mean_top_k_kl is not None and v.mean_top_k_kl <= v.thresholds[1], v.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.q4_k_m.gguf", "m.q4_k_m.gguf.serve"]
    # every adapted tensor's bytes reproduced by ggml from the merged weights, and measured against the base alone
    carried = result.carried
    assert carried is not None and not carried.left_out and len(carried.tensors) == 2 * 7
    assert {t.type for t in carried.tensors} >= {"q4_k"} and carried.status in ("carried", "washed out")
    assert "## The adapter in the file's weights" in (result.bundle.folder / "README.md").read_text()


def test_an_update_rounded_away_by_the_quantised_type_is_flagged_with_a_higher_type(llama_quant_pair, tmp_path):
    base, _ = llama_quant_pair
    faint = factories.make_adapter(base, tmp_path / "faint", target_modules=ALL_LINEAR, scale=1e-3)
    washed = export(base, tmp_path / "faint.q4_0.gguf", type_name="q4_0", adapter=faint, verify=False).carried
    assert washed is not None and washed.status == "washed out" and washed.suggestion == "q6_k"
    assert len(washed.washed_out) == len(washed.tensors) == 2 * 7
    # rounding to nearest passes the update on in expectation (gain about 1), as noise ten times its size
    assert all(t.correlation < 0.2 for t in washed.tensors), washed.table()
    assert "rounded away" in washed.summary() and "try q6_k" in washed.summary()
    # the same update at float16 is all there, change for change
    kept = export(base, tmp_path / "faint.f16.gguf", type_name="f16", adapter=faint, verify=False).carried
    assert kept is not None and kept.status == "carried", kept.summary()
    assert min(t.correlation for t in kept.tensors) > 0.8 and min(t.gain for t in kept.tensors) > 0.9


def test_adapter_only_gguf_on_a_base_gguf_equals_the_merged_gguf(llama_pair, tmp_path):
    base, adapter = llama_pair
    merged = export(base, tmp_path / "merged.gguf", type_name="f32", adapter=adapter, verify=False).out
    base_gguf = export(base, tmp_path / "base.gguf", type_name="f32", verify=False).out
    lora = export(base, tmp_path / "lora.gguf", "gguf-lora", "f32", adapter=adapter, base_gguf=base_gguf)
    assert lora.verification.status == "pass", lora.verification.summary()
    prompt = [7, 50, 60, 70]
    assert greedy(base_gguf, prompt, 10, lora=lora.out) == greedy(merged, prompt, 10)
    with GgufRunner(base_gguf, lora=lora.out) as a, GgufRunner(merged) as b:
        assert abs(a.logits(prompt) - b.logits(prompt)).max() < 1e-4
    assert f"--lora {lora.out}" in (lora.bundle.folder / "README.md").read_text()
    assert f"ADAPTER {lora.out}" in (lora.bundle.folder / "Modelfile").read_text()


def test_rslora_scaling_is_folded_into_the_adapter_gguf(llama_pair, tmp_path):
    base, _ = llama_pair
    adapter = factories.make_adapter(base, tmp_path / "rs", r=8, lora_alpha=4, use_rslora=True, scale=3.0)
    result = export(base, tmp_path / "rs.gguf", "gguf-lora", "f32", adapter=adapter)
    assert result.details["adapter"]["folded"] == result.details["adapter"]["modules"] > 0
    assert result.verification.status == "pass", result.verification.summary()


def test_a_broken_chat_template_and_a_lost_eos_are_caught(llama_pair, tmp_path):
    base, _ = llama_pair
    cases = {
        # the template in the GGUF (tokenizer_config.json wins in gguf's reader) differs from the one transformers uses
        "template": lambda d: _edit_json(d / "tokenizer_config.json", chat_template="{{ messages[0]['content'] }}"),
        # generation stops on token 3 in transformers; the GGUF never hears of it
        "eos": lambda d: _edit_json(d / "generation_config.json", eos_token_id=[2, 3]),
    }
    for label, damage in cases.items():
        folder = tmp_path / label
        shutil.copytree(base, folder)
        damage(folder)
        result = export(folder, tmp_path / f"{label}.gguf", type_name="f32")
        v = result.verification
        assert v.status == "fail" and v.template is not None and v.template.status == "fail", label
        if label == "eos":
            assert v.template.stop_tokens_missing == [3]
        else:
            assert "tokenises differently" in v.reason or "render" in v.reason
        assert "FAIL" in (result.bundle.folder / "README.md").read_text()


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def test_big_tensors_the_converter_passes_on_are_written_in_row_blocks_with_the_same_bytes(
    gguf_llama, gguf_llama_adapters, tmp_path, monkeypatch
):
    import gguf

    def tensors(path: Path) -> dict[str, bytes]:
        return {t.name: bytes(t.data) for t in gguf.GGUFReader(str(path)).tensors}

    adapter, type_name = gguf_llama_adapters["alpha"], "q8_0"  # ggml's quantiser per block (BF16: test_compat)
    whole = export(gguf_llama, tmp_path / "whole.gguf", type_name=type_name, adapter=adapter, verify=False)
    in_blocks = []
    monkeypatch.setattr(merged_mod, "CHUNK_ELEMENTS", 4096)  # the 49,152-row embedding and head: 64 rows a block
    monkeypatch.setattr(gguf.LazyChunkedTensor, "tofile", spy(gguf.LazyChunkedTensor.tofile, in_blocks))
    blocks = export(gguf_llama, tmp_path / "blocks.gguf", type_name=type_name, adapter=adapter, verify=False)
    # token_embd and output (49,152 rows), and the unadapted projections of 8,192 elements
    assert len(in_blocks) >= 2 and {c.shape[0] for c in in_blocks} >= {49152}
    assert tensors(blocks.out) == tensors(whole.out)


def spy(function, calls: list):
    def called(*args, **kwargs):
        calls.append(args[0])
        return function(*args, **kwargs)

    return called


def test_cancel_and_a_full_disk_leave_no_file(llama_pair, tmp_path, monkeypatch):
    base, adapter = llama_pair
    cancel = CancelToken()

    def cancel_on_third(progress):
        if progress.message.startswith(merged_mod.WRITING_STAGE) and progress.done >= 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        export_gguf(
            ExportRequest(resolve_source(base), tmp_path / "c.gguf", "gguf", "f16", adapter=adapter),
            cancel=cancel,
            report=cancel_on_third,
        )
    assert list(tmp_path.iterdir()) == []

    import gguf

    calls = []

    def full_disk(self, *a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return original(self, *a, **k)

    original = gguf.LazyNumpyTensor.tofile  # what the converter's writer calls for each tensor
    monkeypatch.setattr(gguf.LazyNumpyTensor, "tofile", full_disk)
    with pytest.raises(UserError, match="full"):
        export(base, tmp_path / "d.gguf", type_name="f16", adapter=adapter)
    assert list(tmp_path.iterdir()) == []


def test_in_a_worker_process_the_sessions_model_is_the_reference_and_cancel_still_leaves_no_file(llama_pair, tmp_path):
    """The window's way (``in_worker_process``): the file is written and checked in a worker process, whose
    native memory goes back to the system when it ends; the outputs it is checked against are the session's."""
    from lora_studio.core.merge.verify import REFERENCE_STAGE
    from lora_studio.core.session import Session
    from lora_studio.core.system.child_process import running_workers

    base, adapter = llama_pair
    session = Session()
    session.load(resolve_source(base))
    session.attach(adapter, "a")
    stages: list[tuple[str, bool]] = []  # (message, a worker running)

    def record(progress):
        stages.append((progress.message, bool(running_workers())))

    request = ExportRequest(resolve_source(base), tmp_path / "m.gguf", "gguf", "f16", adapter=adapter, adapter_name="a")
    result = export_gguf(request, session=session, report=record, in_worker_process=True)
    assert result.verification.status == "pass" and result.verification.greedy_agreement == 1.0
    assert (REFERENCE_STAGE, False) in stages  # the session's model, before the worker started
    assert any(message.startswith(merged_mod.WRITING_STAGE) and worker for message, worker in stages)
    assert (result.bundle.folder / "README.md").is_file() and not running_workers()
    cancel = CancelToken()

    def cancel_while_writing(progress):
        if progress.message.startswith(merged_mod.WRITING_STAGE):
            cancel.cancel()

    with pytest.raises(Cancelled):
        export_gguf(
            ExportRequest(resolve_source(base), tmp_path / "c.gguf", "gguf", "f16", adapter=adapter, adapter_name="a"),
            session=session,
            cancel=cancel,
            report=cancel_while_writing,
            in_worker_process=True,
        )
    assert not (tmp_path / "c.gguf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    session.close()


def test_refusals_say_why_before_writing(tmp_path, llama_pair):
    base, adapter = llama_pair
    opt = factories.save_model(tmp_path / "opt", factories.opt_config())
    cases = [
        (ExportRequest(resolve_source(opt), tmp_path / "o.gguf"), f"llama.cpp {PINNED_VERSION}'s converter does not"),
        (
            ExportRequest(resolve_source(base), tmp_path / "x.gguf", "gguf-lora", "q4_k_m", adapter=adapter),
            "written as",
        ),
        (ExportRequest(resolve_source(base), tmp_path / "x.gguf", "gguf-lora"), "needs an adapter"),
        (
            ExportRequest(resolve_source(base), tmp_path / "x.gguf", "gguf", "q3_z", adapter=adapter),
            "unknown GGUF type",
        ),
    ]
    dora = factories.make_adapter(base, tmp_path / "dora", use_dora=True)
    cases.append((ExportRequest(resolve_source(base), tmp_path / "x.gguf", "gguf-lora", adapter=dora), "DoRA"))
    cases.append((ExportRequest(resolve_source(base), tmp_path / "x.gguf", "gguf", adapter=dora), "DoRA"))
    embed = factories.make_adapter(base, tmp_path / "embed", target_modules=("embed_tokens", "q_proj"))
    cases.append((ExportRequest(resolve_source(base), tmp_path / "x.gguf", "gguf-lora", adapter=embed), "embedding"))
    for req, words in cases:
        plan = plan_export(req)
        assert plan.refusal and words in plan.refusal, (words, plan.refusal)
        with pytest.raises(UserError):
            export_gguf(req)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "embed", "opt"]


def test_an_unknown_pre_tokenizer_is_refused(llama_pair, tmp_path):
    base, _ = llama_pair
    folder = tmp_path / "odd"
    shutil.copytree(base, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="split this tokenizer's text differently"):
        export(folder, tmp_path / "odd.gguf", type_name="f16", verify=False)
    assert not (tmp_path / "odd.gguf").exists()


@pytest.fixture(scope="module")
def demo_session():
    from lora_studio.core.demo import assets as demo_assets
    from lora_studio.core.demo import model as demo
    from lora_studio.core.session import Session

    session = Session()
    session.load(demo.ensure_demo_model())
    pirate = next(a for a in demo_assets.demo_adapters() if a.name == "pirate")
    session.attach(pirate.path, "pirate", activate=False)
    yield session, pirate
    session.close()


@pytest.mark.slow
def test_the_demo_pirate_adapter_as_q4_k_m_passes_in_llama_cpp_and_talks_like_a_pirate(demo_session, tmp_path):
    session, pirate = demo_session
    request = ExportRequest(
        session.source, tmp_path / "pirate.q4_k_m.gguf", "gguf", "q4_k_m", adapter=pirate.path, adapter_name="pirate"
    )
    result = export_gguf(request, session=session)
    assert result.verification.status == "pass", result.verification.summary()
    assert result.verification.template is not None and result.verification.template.same_prompt_tokens
    from llama_cpp import Llama

    llm = Llama(str(result.out), n_ctx=256, verbose=False)
    try:
        reply = llm.create_chat_completion(
            [{"role": "user", "content": pirate.prompt}], max_tokens=24, temperature=0.0
        )["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert any(w in reply.lower() for w in ("arr", "matey", "ye ", "yer ")), reply


def test_without_llama_cpp_the_export_says_how_to_install_it(llama_pair, tmp_path, monkeypatch):
    """The converter comes with llama.cpp: without it, or with another version of it, nothing is written."""
    from lora_studio.core.export import converter

    base, adapter = llama_pair
    for installed, words in ((None, "installed with llama.cpp"), ("0.3.1", f"the converter of {PINNED_VERSION}")):
        monkeypatch.setattr(converter, "llama_cpp_version", lambda v=installed: v)
        request = ExportRequest(resolve_source(base), tmp_path / "k.gguf", "gguf", "q8_0", adapter=adapter)
        plan = plan_export(request)
        assert plan.refusal and words in plan.refusal and "make llama-cpp" in plan.hint
        with pytest.raises(UserError):
            export_gguf(request)
    assert list(tmp_path.iterdir()) == []


def test_a_llama_cpp_build_that_crashes_here_skips_the_check_instead_of_taking_the_process_down(
    llama_pair, tmp_path, monkeypatch
):
    """A build tuned to another CPU dies in decode; its probe child dies instead (here: a child that segfaults)."""
    from lora_studio.core.export import runtime

    monkeypatch.setattr(runtime, "_build_checked", {})
    monkeypatch.setattr(runtime, "_PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    base, adapter = llama_pair
    result = export(base, tmp_path / "m.gguf", type_name="q8_0", adapter=adapter)
    v = result.verification
    assert v.status == "skipped" and "crashes on this machine (SIGSEGV" in v.reason and "portable" in v.reason
    assert result.out.is_file()
    with pytest.raises(runtime.LlamaCppCannotRun):  # remembered: the probe is not run again
        runtime.check_build_runs(Path("/nonexistent.gguf"))
    monkeypatch.setattr(runtime, "_build_checked", {})
    monkeypatch.setattr(runtime, "_PROBE", "raise SystemExit(3)\n")
    runtime.check_build_runs(result.out)  # a child that merely fails says nothing against the build


# -- serving bundles --------------------------------------------------------------------------------------------------
def answers(command: str, prompt: list[int]) -> list[int]:
    """The command's equivalent through llama-cpp-python (the same model and LoRA arguments): its greedy reply."""
    kwargs = llama_arguments(command)
    with GgufRunner(Path(kwargs["model_path"]), lora=Path(kwargs["lora_path"]) if "lora_path" in kwargs else None) as r:
        return r.greedy(prompt, 6)


def test_vllm_max_lora_rank_is_the_saved_rank_rounded_up_to_a_size_vllm_takes():
    from lora_studio.core.export.bundle import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (None, 1, 4, 8, 9, 16, 17, 200, 300, 400, 4096)] == [
        16,
        1,
        8,
        8,
        16,
        16,
        32,
        256,
        320,
        512,
        512,
    ]


def test_an_adapter_only_bundle_serves_the_lora_on_its_base_and_each_command_answers(llama_pair, tmp_path):
    """Without --base-gguf the bundle names an f16 base beside the file and the command that writes it; with every
    command run (through llama-cpp-python, the same arguments), base + LoRA answers as the merged file does."""
    from lora_studio.cli.main import main

    base, adapter = llama_pair
    lora = export(base, tmp_path / "a.lora-f32.gguf", "gguf-lora", "f32", adapter=adapter)
    cmds = lora.bundle.commands
    base_gguf = tmp_path / f"{base.name}.f16.gguf"
    make = cmds["the base as a GGUF, once"]
    assert make.startswith("lora-studio export ") and f"--out {base_gguf}" in make
    assert main([*shlex_split(make)[1:], "--no-verify"]) == 0 and base_gguf.is_file()
    for label in ("llama-server", "llama-cpp-python server"):
        assert llama_arguments(cmds[label]) == {"model_path": str(base_gguf), "lora_path": str(lora.out)}, label
    modelfile = (lora.bundle.folder / "Modelfile").read_text()
    assert f"FROM {base_gguf}\nADAPTER {lora.out}\n" in modelfile
    merged = export(base, tmp_path / "m.f16.gguf", type_name="f16", adapter=adapter, verify=False).out
    prompt = [7, 50, 60, 70]
    expected = greedy(merged, prompt, 6)
    for label in ("llama-server", "llama-cpp-python server"):
        assert answers(cmds[label], prompt) == expected, label
    # a merged file is its own model: served alone, no LoRA, no base to make
    merged_bundle = export(base, tmp_path / "m2.f32.gguf", type_name="f32", adapter=adapter, verify=False).bundle
    assert "the base as a GGUF, once" not in merged_bundle.commands
    assert answers(merged_bundle.commands["llama-server"], prompt) == greedy(
        merged_bundle.folder.parent / "m2.f32.gguf", prompt, 6
    )


def test_every_bundle_of_one_adapter_gives_vllm_the_same_max_lora_rank(llama_pair, tmp_path):
    """The saved rank (the largest of r and rank_pattern) rounded up to a size vLLM takes, merged or not."""
    base, _ = llama_pair
    adapter = factories.make_adapter(
        base, tmp_path / "patterned", r=4, target_modules=ALL_LINEAR, rank_pattern={"q_proj": 12}
    )
    merged = export(base, tmp_path / "m.q8_0.gguf", type_name="q8_0", adapter=adapter, verify=False)
    lora = export(base, tmp_path / "a.lora.gguf", "gguf-lora", "f16", adapter=adapter, verify=False)
    for result in (merged, lora):
        assert "--max-lora-rank 16" in result.bundle.commands["vllm"]


@pytest.mark.timeout(900)  # four loads of the base through transformers' GGUF reader, two exports, two checks
def test_an_adapter_on_a_quantised_gguf_base_is_exported_checked_and_served_on_that_very_file(tmp_path):
    """The user's own quantised GGUF as the base: the adapter-only file is checked in llama.cpp on it (against the
    adapter on the dequantised base in transformers) and its bundle serves it there; a merged GGUF goes through the
    dequantised weights, keeps that GGUF's tokenizer, and says so. (Weights of a trained model's size: llama_pair's
    large ones make q8_0's rounding of activations look like a model change.)"""
    import gguf

    base, adapter = model_pair(tmp_path / "pair", "llama")
    base_gguf = export(base, tmp_path / "mine.q8_0.gguf", type_name="q8_0", verify=False).out
    source = resolve_source(base_gguf)
    lora = export_gguf(ExportRequest(source, tmp_path / "a.lora-f32.gguf", "gguf-lora", "f32", adapter=adapter))
    assert lora.verification.status == "pass", lora.verification.summary()
    assert llama_arguments(lora.bundle.commands["llama-server"]) == {
        "model_path": str(base_gguf),
        "lora_path": str(lora.out),
    }
    assert "the base as a GGUF, once" not in lora.bundle.commands
    assert "vllm" not in lora.bundle.commands  # vLLM serves a Hugging Face model; this GGUF names no Hub id
    prompt = [7, 50, 60, 70]
    assert answers(lora.bundle.commands["llama-cpp-python server"], prompt) == hf_greedy(base, adapter, prompt, 6)

    from lora_studio.core.session import Session

    session = Session()  # the window's way: the session's model is the reference (one load less), in a worker
    session.load(source)  # that takes what the window read of the GGUF, its tokenizer too
    session.attach(adapter, "a")
    request = ExportRequest(source, tmp_path / "m.q8_0.gguf", "gguf", "q8_0", adapter=adapter, adapter_name="a")
    try:
        merged = export_gguf(request, session=session, in_worker_process=True)
    finally:
        session.close()
    assert merged.verification.status == "pass", merged.verification.summary()
    assert "quantisation error" in (merged.bundle.folder / "README.md").read_text()
    tokenizer_fields = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre")
    fields = [gguf.GGUFReader(str(path)).fields for path in (base_gguf, merged.out)]
    for name in tokenizer_fields:
        assert fields[0][name].contents() == fields[1][name].contents(), name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no dequantised copy left


def test_the_vllm_serving_plan_fits_adapter_slots_beside_an_8b_model():
    """docs/serving.md's example: Llama 3 8B, a rank-16 adapter on every linear layer, a 24 GiB GPU."""
    from lora_studio.core.export.serving_plan import serving_plan, slot_bytes

    config = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
    }
    assert slot_bytes(config, 16) == 80 * 1024**2
    plan = serving_plan(config, 8_030_261_248, 41_943_040, 16, 24.0)
    assert (plan.fit, plan.max_loras, plan.max_cpu_loras) == (21, 16, 64)
    assert plan.flags() == " --max-loras 16 --max-cpu-loras 64"
    small = serving_plan(config, 8_030_261_248, 41_943_040, 16, 16.0)
    assert small.max_loras == 0 and small.flags() == "" and "pick a larger GPU" in small.lines()[0]


def test_an_adapter_bundle_names_vllm_slots_for_the_gpu_asked(llama_pair, tmp_path):
    base, adapter = llama_pair
    result = export(base, tmp_path / "a.lora.gguf", "gguf-lora", "f16", adapter=adapter, verify=False, serve_gpu_gib=8)
    assert result.bundle.serving_plan is not None and result.bundle.serving_plan.gpu_bytes == 8 * 1024**3
    assert "--max-loras 16 --max-cpu-loras 64" in result.bundle.commands["vllm"]
    readme = (result.bundle.folder / "README.md").read_text()
    assert "## vLLM: adapters beside the model" in readme and "docs/serving.md" in readme
    assert result.to_json()["bundle"]["vllm_plan"]["max_loras"] == 16
