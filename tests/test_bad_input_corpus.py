"""Every broken input in the corpus gives one clear line: in the core, and on the CLI with exit 2."""

import re

import bad_inputs
import pytest
from cli_helpers import run_in_process

from lora_studio.cli.main import main
from lora_studio.core.errors import UserError, describe
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.report.inspect_report import inspect_base_and_adapters
from lora_studio.core.session import Session

CASES = bad_inputs.CASES


@pytest.fixture(scope="module")
def fixtures(tiny_llama, llama_adapters, wide_adapter, gpt2_adapter):
    return {
        "base": tiny_llama,
        "adapter": llama_adapters["alpha"],
        "wide_adapter": wide_adapter,
        "gpt2_adapter": gpt2_adapter,
    }


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def _check_no_side_effects(work):
    assert not (work / "PWNED").exists(), "untrusted code ran"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_core_session(case, fixtures, tmp_path):
    """Load the base and attach the adapter the way the window does."""
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    session = Session()

    def run():
        session.load(resolve_source(inputs["base"]))
        if inputs["adapter"] is not None:
            session.attach(inputs["adapter"], "candidate")

    if "attach" in case.ok_for:
        run()
        assert session.active_adapter == "candidate"
    else:
        with pytest.raises(UserError) as err:
            run()
        desc = describe(err.value)
        assert desc.kind == "user" and "\n" not in desc.message
        assert re.search(case.message, desc.message), desc.message
        if session.loaded and inputs["adapter"] is not None:
            assert "candidate" not in session.adapters  # a refused adapter leaves the session as it was
    _check_no_side_effects(tmp_path / "w")
    session.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_inspect(case, fixtures, tmp_path, capsys):
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    args = ["inspect", str(inputs["base"])]
    if inputs["adapter"] is not None:
        args += ["--adapter", f"candidate={inputs['adapter']}"]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    if "inspect" in case.ok_for:
        assert code == 0, captured.err
    else:
        assert code == 2, captured.err
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
        assert re.search(case.message, captured.err), captured.err
        assert captured.out == ""
    _check_no_side_effects(tmp_path / "w")


def test_core_inspect_matches_session_messages(fixtures, tmp_path):
    """inspect (headers only) and attach (real load) refuse a wrong adapter with the same words."""
    case = next(c for c in CASES if c.id == "adapter-shape-mismatch")
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    with pytest.raises(UserError) as err:
        inspect_base_and_adapters(resolve_source(inputs["base"]), [("x", inputs["adapter"])])
    assert re.search(case.message, str(err.value))


# -- the same corpus through `compare` and `merge` ----------------------------------------------------------------


def assert_one_line_refusal(code, out, err, pattern=None, exit_code=2):
    assert code == exit_code, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert out == "", out  # with --json: nothing on stdout
    if pattern:
        assert re.search(pattern, err), err


def leftovers(out):
    """The output folder and any hidden temporary sibling of it."""
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name) if out.parent.is_dir() else []


# Adapter cases refused after the (tiny) base is loaded all go through Session.attach, covered case by case above;
# compare runs the ones refused before loading plus a representative set of those refused by attach.
COMPARE_ADAPTER_CASES = {
    "adapter-config-invalid-json",
    "adapter-future-peft-keys",
    "adapter-shape-mismatch",
    "adapter-weights-truncated",
    "adapter-weights-malicious-pickle",
    "adapter-weights-nan",
    "adapter-does-not-exist",
}
COMPARE_CASES = [c for c in CASES if c.id.startswith("base-") or c.id in COMPARE_ADAPTER_CASES]


@pytest.mark.parametrize("case", COMPARE_CASES, ids=lambda c: c.id)
def test_cli_compare(case, fixtures, tmp_path, capsys, one_thread):
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    adapter = inputs["adapter"] or fixtures["adapter"]
    code, out, err = run_in_process(
        capsys,
        [
            "compare",
            inputs["base"],
            "--adapter",
            f"candidate={adapter}",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "2",
            "--json",
        ],
    )
    assert_one_line_refusal(code, out, err, case.message)
    _check_no_side_effects(tmp_path / "w")


def test_cli_compare_awkward_paths_work(fixtures, tmp_path, capsys, one_thread):
    import json

    case = next(c for c in CASES if c.id == "paths-with-spaces-and-non-utf8")
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    code, out, err = run_in_process(
        capsys,
        [
            "compare",
            inputs["base"],
            "--adapter",
            f"candidate={inputs['adapter']}",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "2",
            "--no-base-variant",
            "--json",
        ],
    )
    assert code == 0, err
    assert [v["name"] for v in json.loads(out)["variants"]] == ["candidate"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], r"prompt is empty|empty prompt"),
        (["--prompt", "   "], r"prompt is empty|empty prompt"),
        (["--prompt", "hi", "--max-new-tokens", "0"], r"max.new.tokens|new tokens"),
        (["--prompt", "hi", "--max-new-tokens", "1000000"], r"max.new.tokens|new tokens"),
        (["--prompt", "hi", "--max-new-tokens", "-3"], r"max.new.tokens|new tokens"),
        (["--prompt", "hi", "--max-new-tokens", "many"], r"invalid int value"),
    ],
    ids=["empty-prompt", "blank-prompt", "zero-tokens", "million-tokens", "negative-tokens", "tokens-not-a-number"],
)
def test_cli_compare_bad_settings(extra, message, fixtures, capsys):
    code, out, err = run_in_process(
        capsys, ["compare", fixtures["base"], "--adapter", f"a={fixtures['adapter']}", "--json", *extra]
    )
    assert_one_line_refusal(code, out, err, message)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_merge(case, fixtures, tmp_path, capsys):
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    out_dir = tmp_path / "w" / "merged"
    adapter = inputs["adapter"] or fixtures["adapter"]
    code, out, err = run_in_process(
        capsys, ["merge", inputs["base"], "--adapter", adapter, "--out", out_dir, "--no-verify", "--json"]
    )
    if "merge" in case.ok_for:
        assert code == 0, err
        assert (out_dir / "config.json").is_file() and leftovers(out_dir) == ["merged"]
    else:
        assert_one_line_refusal(code, out, err, case.message)
        assert leftovers(out_dir) == [], "a refused merge left output behind"
    _check_no_side_effects(tmp_path / "w")


# -- merge: what can go wrong on the output side -------------------------------------------------------------------


def merge_argv(fixtures, out_dir, *extra):
    return [
        "merge",
        fixtures["base"],
        "--adapter",
        fixtures["adapter"],
        "--out",
        out_dir,
        "--no-verify",
        "--json",
        *extra,
    ]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_into_read_only_folder(fixtures, tmp_path, capsys, monkeypatch):
    import errno
    import os
    import pathlib

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: refuse the way the kernel refuses everyone else
        real_mkdir = pathlib.Path.mkdir

        def mkdir(self, *a, **kw):
            if ro in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *a, **kw)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    try:
        code, out, err = run_in_process(capsys, merge_argv(fixtures, ro / "merged"))
        assert_one_line_refusal(code, out, err, r"cannot (write|create).*Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_merge_onto_existing_folder_without_overwrite(fixtures, tmp_path, capsys):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("my work")
    (out_dir / "config.json").write_text("{}")
    before = snapshot(out_dir)
    code, out, err = run_in_process(capsys, merge_argv(fixtures, out_dir))
    assert_one_line_refusal(code, out, err, r"already exists.*--overwrite")
    assert snapshot(out_dir) == before and leftovers(out_dir) == ["mine"]


@pytest.mark.parametrize("budget", [0, 4096, 60_000], ids=["full-at-once", "full-in-header", "full-mid-shard"])
def test_merge_when_the_disk_fills_up(budget, fixtures, tmp_path, capsys, monkeypatch):
    """A size-limited writer: the shard writer's writes fail with ENOSPC once ``budget`` bytes are written."""
    import errno

    from lora_studio.core.io import shard_writer

    used = [0]
    real_write_all, real_copy_range, real_pwrite_all = (
        shard_writer._write_all,
        shard_writer._copy_range,
        shard_writer._pwrite_all,
    )

    def spend(n):
        used[0] += n
        if used[0] > budget:
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_all(fd, data):
        spend(memoryview(data).nbytes)
        return real_write_all(fd, data)

    def copy_range(src_fd, dst_fd, offset, nbytes, *rest):
        spend(nbytes)
        return real_copy_range(src_fd, dst_fd, offset, nbytes, *rest)

    def pwrite_all(fd, data, offset):  # direct I/O (Linux): every byte of a shard goes through here
        spend(memoryview(data).nbytes)
        return real_pwrite_all(fd, data, offset)

    monkeypatch.setattr(shard_writer, "_write_all", write_all)
    monkeypatch.setattr(shard_writer, "_copy_range", copy_range)
    monkeypatch.setattr(shard_writer, "_pwrite_all", pwrite_all)
    out_dir = tmp_path / "merged"
    code, out, err = run_in_process(capsys, merge_argv(fixtures, out_dir))
    assert_one_line_refusal(code, out, err, r"disk .* is full")
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("stage", ["merging tensor", "verifying: running", "verifying: loading"])
def test_merge_interrupted_leaves_nothing(stage, fixtures, tmp_path, capsys, monkeypatch):
    """Ctrl-C (the CLI's cancel) at each stage of a merge: exit 130, one line, no output folder."""
    from lora_studio.cli import merge_cmd

    class Interrupting:
        def __call__(self, p):
            if p.message.startswith(stage) and (p.unit != "bytes" or p.done > 0):
                raise KeyboardInterrupt

        def done(self):
            pass

    monkeypatch.setattr(merge_cmd, "stderr_progress", Interrupting)
    out_dir = tmp_path / "merged"
    argv = [a for a in merge_argv(fixtures, out_dir) if a != "--no-verify"]
    code, out, err = run_in_process(capsys, argv)
    assert_one_line_refusal(code, out, err, r"interrupted", exit_code=130)
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("stage", ["merging tensor", "verifying: running", "verifying: loading"])
@pytest.mark.parametrize("engine", ["streaming", "in-memory"])
def test_merge_cancelled_from_report_leaves_nothing(stage, engine, fixtures, tmp_path):
    """What the window's Cancel does: the token fires from a progress report; the job ends in Cancelled."""
    from lora_studio.core.errors import Cancelled
    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
    from lora_studio.core.tasks import CancelToken

    token = CancelToken()

    def report(p):
        if p.message.startswith(stage) and (p.unit != "bytes" or p.done > 0):
            token.cancel()

    out_dir = tmp_path / "merged"
    with pytest.raises(Cancelled):
        merge_and_save(
            resolve_source(fixtures["base"]),
            [AdapterSpec("a", fixtures["adapter"])],
            MergeOptions(out=out_dir, engine=engine, verify_prompts=("hello",), verify_tokens=2),
            cancel=token,
            report=report,
        )
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("engine", ["streaming", "in-memory"])
def test_merge_refuses_non_finite_adapter_weights(value, engine, fixtures, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(fixtures["adapter"], tmp_path / "broken")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_A" in k)[-1]
    tensors[key][1, 2] = float(value)
    save_file(tensors, adapter / "adapter_model.safetensors")
    out_dir = tmp_path / "merged"
    code, out, err = run_in_process(
        capsys,
        [
            "merge",
            fixtures["base"],
            "--adapter",
            adapter,
            "--out",
            out_dir,
            "--engine",
            engine,
            "--no-verify",
            "--json",
        ],
    )
    assert_one_line_refusal(code, out, err, r"has 1 NaN/Inf values")
    assert leftovers(out_dir) == []


# -- a few real processes: what a user's terminal sees ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["merge"])  # compare takes the same load path; one process start is enough
def test_subprocess_one_line_and_empty_stdout(command, fixtures, tmp_path):
    """Warnings from torch/transformers must not add lines: a malicious base .bin (torch warns about its pickle)."""
    import os
    import subprocess
    import sys

    case = next(c for c in CASES if c.id == "base-malicious-pickle")
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    out_dir = tmp_path / "w" / "merged"
    argv = (
        ["merge", inputs["base"], "--adapter", fixtures["adapter"], "--out", out_dir]
        if command == "merge"
        else ["compare", inputs["base"], "--adapter", f"a={fixtures['adapter']}", "--prompt", "hi"]
    )
    env = {k: v for k, v in os.environ.items() if k != "LORA_STUDIO_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_studio", *map(str, argv), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_one_line_refusal(proc.returncode, proc.stdout, proc.stderr, case.message)
    assert not out_dir.exists()
    _check_no_side_effects(tmp_path / "w")


# -- outputs never overlap inputs; an output that appears meanwhile is never replaced -------------------------------


@pytest.fixture
def own_inputs(fixtures, tmp_path):
    """Copies of the base and the adapter that a test may see destroyed (the shared fixtures must not be)."""
    import shutil

    root = tmp_path / "inputs"
    base = shutil.copytree(fixtures["base"], root / "base")
    adapter = shutil.copytree(fixtures["adapter"], root / "adapter")
    return {"base": base, "adapter": adapter, "root": root}


@pytest.mark.parametrize("where", ["base", "adapter", "parent-of-both", "empty", "current-folder"])
def test_merge_refuses_an_output_that_overlaps_an_input(where, own_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(own_inputs["root"])
    out = {
        "base": str(own_inputs["base"]),
        "adapter": str(own_inputs["adapter"]),
        "parent-of-both": str(own_inputs["root"]),
        "empty": "",
        "current-folder": ".",
    }[where]
    before = snapshot(own_inputs["root"])
    argv = ["merge", own_inputs["base"], "--adapter", own_inputs["adapter"], "--out", out, "--overwrite", "--json"]
    code, stdout, err = run_in_process(capsys, argv)
    refusals = {"empty": r"--out is empty", "current-folder": r"is or contains|current folder"}
    words = refusals.get(where, "is or contains")
    assert_one_line_refusal(code, stdout, err, words)
    assert snapshot(own_inputs["root"]) == before  # the inputs are byte-identical


def test_export_and_adapter_only_refuse_overlapping_outputs(own_inputs, capsys):
    cases = [
        ["export", own_inputs["base"], "--adapter", own_inputs["adapter"], "--out", own_inputs["adapter"] / "x.gguf"],
        [
            "merge",
            own_inputs["base"],
            "--adapter",
            f"a={own_inputs['adapter']}",
            "--adapter",
            f"b={own_inputs['adapter']}",
            "--combination",
            "cat",
            "--adapter-only",
            "--out",
            own_inputs["adapter"],
            "--overwrite",
        ],
    ]
    (own_inputs["adapter"] / "x.gguf").write_bytes(b"mine")
    before = snapshot(own_inputs["root"])
    for argv in cases:
        code, stdout, err = run_in_process(capsys, argv)
        assert_one_line_refusal(code, stdout, err, r"inside the adapter|is or contains the adapter")
    assert snapshot(own_inputs["root"]) == before


def test_an_output_that_appears_during_the_merge_is_not_replaced(fixtures, tmp_path, capsys, monkeypatch):
    from lora_studio.core.merge import outputs

    out_dir = tmp_path / "merged"
    real = outputs.write_model_card

    def someone_else_writes_there(*args, **kwargs):
        out_dir.mkdir()
        (out_dir / "theirs.txt").write_text("keep me")
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "write_model_card", someone_else_writes_there)
    code, out, err = run_in_process(capsys, merge_argv(fixtures, out_dir))
    assert_one_line_refusal(code, out, err, r"appeared while this job was running; it was not replaced")
    assert [p.name for p in out_dir.iterdir()] == ["theirs.txt"] and leftovers(out_dir) == ["merged"]


def test_sigterm_during_a_merge_cleans_up_like_ctrl_c(fixtures, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from lora_studio.core.merge import outputs

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a closing terminal sends

    monkeypatch.setattr(outputs, "write_model_card", terminated)
    out_dir = tmp_path / "merged"
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_in_process(capsys, merge_argv(fixtures, out_dir))
    assert code == 130 and "interrupted" in err and leftovers(out_dir) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI put the previous handler back


def test_verification_fails_non_finite_logits_and_json_stays_valid(tiny_llama, capsys):
    import json as json_mod

    import torch

    from lora_studio.cli.common import print_json
    from lora_studio.core.merge import verify

    model = factories_model(tiny_llama)
    reference = verify.reference_outputs(model, tokenizer_of(tiny_llama), new_tokens=2)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    result = verify.compare(model, reference, "float32")
    assert result.status == "fail" and result.max_abs_logit_diff == float("inf")
    print_json(result.to_json())
    doc = json_mod.loads(capsys.readouterr().out)  # strict JSON: no bare NaN or Infinity
    assert doc["status"] == "fail" and doc["max_abs_logit_diff"] is None


def factories_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# -- a prompt that is not text, a device this machine lacks ---------------------------------------------------------


@pytest.mark.parametrize("prompt", ["half a surrogate \ud800 here", "bytes from argv \udcff\udcfe"])
def test_a_prompt_that_is_not_valid_text_is_one_line(prompt, fixtures, capsys, one_thread):
    code, out, err = run_in_process(
        capsys,
        ["compare", fixtures["base"], "--adapter", f"a={fixtures['adapter']}", "--prompt", prompt, "--json"],
    )
    assert_one_line_refusal(code, out, err, r"the prompt is not valid text: character \d+")


def test_a_cuda_device_this_machine_lacks_is_one_line(fixtures, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["compare", fixtures["base"], "--adapter", f"a={fixtures['adapter']}", "--prompt", "hi"]
    code, out, err = run_in_process(capsys, [*argv, "--device-map", "cuda:0", "--json"])
    assert_one_line_refusal(code, out, err, r"no CUDA device is available .* the only device here is cpu")


def _renamed_keys(fixtures, tmp_path, rename):
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(fixtures["adapter"], tmp_path / "renamed")
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    return adapter


def test_an_adapter_saved_without_the_peft_prefix_is_applied_by_every_path(fixtures, tmp_path, capsys, one_thread):
    import factories
    import torch
    from safetensors.torch import load_file

    from lora_studio.core.compare import Variant, compare
    from lora_studio.core.generation.generate import GenerationSettings

    adapter = _renamed_keys(fixtures, tmp_path, lambda k: k.removeprefix("base_model.model."))
    reference = factories.peft_model(fixtures["base"], {"a": fixtures["adapter"]}, active="a")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    session = Session()
    try:
        session.load(resolve_source(fixtures["base"]))
        session.attach(adapter, "a")
        with torch.inference_mode():
            torch.testing.assert_close(session.model(input_ids=ids).logits, reference(input_ids=ids).logits)
        result = compare(session, [Variant.base(), Variant.of_adapter("a")], "hello", GenerationSettings(8))
        outputs = {o.name: o.token_ids for o in result.prompts[0].outputs}
        assert outputs["a"] != outputs["base"]
    finally:
        session.close()
    merged = {}
    for engine in ("streaming", "in-memory"):
        out = tmp_path / engine
        code, _, err = run_in_process(
            capsys, ["merge", fixtures["base"], "--adapter", adapter, "--out", out, "--engine", engine]
        )
        assert code == 0, err
        merged[engine] = load_file(str(out / "model.safetensors"))
    expected = reference.merge_and_unload().state_dict()
    for name, tensor in merged["streaming"].items():
        assert torch.equal(tensor, merged["in-memory"][name]), name
        assert torch.equal(tensor, expected[name]), name


def test_an_adapter_whose_tensors_peft_does_not_place_is_refused(fixtures, tmp_path, capsys):
    import factories

    adapter = _renamed_keys(fixtures, tmp_path, lambda k: k)
    factories.edit_adapter_config(adapter, target_modules=["k_proj"])  # its tensors are for q_proj and v_proj
    session = Session()
    try:
        session.load(resolve_source(fixtures["base"]))
        with pytest.raises(UserError, match="of its tensors were not placed by PEFT"):
            session.attach(adapter, "a")
        assert session.adapters == {} and not session.is_peft
    finally:
        session.close()


@pytest.mark.parametrize("engine", ["in-memory", None])
def test_lora_bias_on_layers_without_a_bias_is_refused_before_merging(engine, fixtures, tmp_path, capsys):
    import factories

    adapter = factories.make_adapter(fixtures["base"], tmp_path / "biased", seed=25, lora_bias=True)
    capsys.readouterr()  # transformers' loading bar while the adapter was made
    out_dir = tmp_path / "merged"
    argv = ["merge", fixtures["base"], "--adapter", adapter, "--out", out_dir]
    argv += ["--engine", engine] if engine else []
    code, out, err = run_in_process(capsys, argv)
    assert_one_line_refusal(code, out, err, r"trains LoRA biases \(lora_bias\) for model\.layers\.0\.self_attn")
    assert leftovers(out_dir) == []


def test_the_in_memory_engine_says_a_lora_bias_merge_is_impossible(fixtures, tmp_path):
    import factories
    from peft.tuners.lora import LoraLayer

    from lora_studio.core.merge.in_memory import merge_layer_copy

    adapter = factories.make_adapter(fixtures["base"], tmp_path / "biased", seed=25, lora_bias=True)
    session = Session()
    try:
        session.load(resolve_source(fixtures["base"]))
        session.attach(adapter, "b")
        layer = next(m for m in session.model.modules() if isinstance(m, LoraLayer))
        with pytest.raises(UserError, match="PEFT cannot merge it"):
            merge_layer_copy(layer, "b", safe_merge=False)
    finally:
        session.close()


HOSTILE_TEMPLATES = {
    "sandbox": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"the sandbox forbids"),
    "raise-exception": ("{{ raise_exception('no system role allowed') }}", r"failed: no system role allowed"),
    "unknown-filter": ("{{ messages | nosuchfilter }}", r"failed: .*nosuchfilter"),
    "endless": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
        r"ran for more than 5 s and was stopped",
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE_TEMPLATES))
def test_a_broken_or_endless_chat_template_is_one_line(kind, fixtures, tmp_path, capsys, one_thread):
    import shutil
    import time

    template, message = HOSTILE_TEMPLATES[kind]
    base = shutil.copytree(fixtures["base"], tmp_path / "base")
    (base / "chat_template.jinja").write_text(template)
    started = time.monotonic()
    code, out, err = run_in_process(capsys, ["compare", base, "--prompt", "hello", "--max-new-tokens", "2", "--json"])
    assert_one_line_refusal(code, out, err, message)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "PWNED").exists()


def test_a_verified_merge_refuses_a_base_that_lacks_a_weight(fixtures, tmp_path, capsys):
    case = next(c for c in CASES if c.id == "base-checkpoint-lacks-a-weight")
    inputs = bad_inputs.build(case, tmp_path / "w", fixtures)
    out_dir = tmp_path / "w" / "merged"
    code, out, err = run_in_process(
        capsys, ["merge", inputs["base"], "--adapter", fixtures["adapter"], "--out", out_dir, "--json"]
    )
    assert_one_line_refusal(code, out, err, case.message)
    assert leftovers(out_dir) == []


def test_opt_adapters_on_its_mlp_fall_back_to_sequential_runs(tmp_path, capsys, one_thread):
    """OPT flattens the batch before fc1/fc2, which PEFT's mixed batches refuse: the run says so and goes on one
    variant at a time, with the outputs of --sequential (and PEFT's stray hooks from the refused batch gone)."""
    import json

    import factories

    base = factories.save_model(tmp_path / "opt", factories.opt_config())
    mlp = factories.make_adapter(base, tmp_path / "mlp", target_modules=("q_proj", "fc1", "out_proj"), seed=3)
    attn = factories.make_adapter(base, tmp_path / "attn", target_modules=("k_proj", "fc2"), seed=4)
    capsys.readouterr()
    argv = ["compare", base, "--adapter", f"mlp={mlp}", "--adapter", f"attn={attn}", "--prompt", "hello"]
    argv += ["--max-new-tokens", "4", "--json"]
    code, out, err = run_in_process(capsys, argv)
    assert code == 0, err
    mixed = json.loads(out)
    assert mixed["mixed_batch"] is False and "PEFT cannot mix adapters in one batch on OPT" in mixed["fallback_reason"]
    code, out, err = run_in_process(capsys, [*argv, "--sequential"])
    assert code == 0, err
    assert [v["token_ids"] for v in json.loads(out)["variants"]] == [v["token_ids"] for v in mixed["variants"]]
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    code, out, err = run_in_process(capsys, ["evaluate", base, "--adapter", f"mlp={mlp}", "--data", data, "--json"])
    assert code == 0, err
    assert json.loads(out)["mixed_batch"] is False
