"""`lora-studio evaluate` as a user runs it: JSON shape, the human tables, a scale sweep, exit 2 on bad input."""

import json

import pytest
from cli_helpers import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": "Say hello.", "completion": "Hello there."},
    {"prompt": "Count to three.", "completion": "One, two, three."},
    {"prompt": "Name a colour.", "completion": "Blue."},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def adapters(llama_adapters):
    return ["--adapter", f"alpha={llama_adapters['alpha']}", "--adapter", f"beta={llama_adapters['beta']}"]


def test_evaluate_json(tiny_llama, llama_adapters, data, capsys):
    argv = ["evaluate", tiny_llama, *adapters(llama_adapters), "--data", data, "--combine", "mix=alpha:0.5,beta:0.5"]
    code, out, err = run_in_process(capsys, [*argv, "--scale", "beta=0.5", "--json"])
    assert code == 0, err
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["kind"] == "evaluation" and doc["mixed_batch"] is True and doc["reference"] == "base"
    assert [v["name"] for v in doc["variants"]] == ["base", "alpha", "beta", "mix"]
    assert [v["kind"] for v in doc["variants"]] == ["base", "adapter", "adapter", "combination"]
    assert doc["variants"][2]["scale"] == 0.5 and len(doc["variants"][1]["sha256"]) == 64
    overall = {s["name"]: s for s in doc["summary"] if s["dataset"] is None}
    assert overall["base"]["delta_loss"] is None and overall["alpha"]["delta_ci"] is not None
    assert len(doc["examples"]) == len(ROWS) and set(doc["examples"][0]["scores"]) == set(overall)


def test_evaluate_human_with_a_sweep(tiny_llama, llama_adapters, data, capsys):
    argv = ["evaluate", tiny_llama, *adapters(llama_adapters), "--data", data, "--sweep", "alpha", "--scales", "0,1"]
    code, out, err = run_in_process(capsys, argv)
    assert code == 0, err
    assert "Δloss [95% CI]" in out and "scale sweep of alpha" in out and "one mixed-adapter batch" in out


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--reference", "gamma"], "not a variant"),
        (["--scale", "alpha=x"], "not a number"),
        (["--scale", "alpha=9"], "outside"),
        (["--sweep", "gamma"], "not a given --adapter"),
        (["--scales", "0:1:0", "--sweep", "alpha"], "positive"),
        (["--combine", "mix=gamma:1"], "not a given --adapter"),
        (["--limit", "0"], "at least 1"),
        (["--adapter", "alpha=/nonexistent"], "two adapters are named"),
        (["--merged", "m=/nonexistent"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_llama, llama_adapters, data, capsys, extra, needle):
    code, out, err = run_in_process(capsys, ["evaluate", tiny_llama, *adapters(llama_adapters), "--data", data, *extra])
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(needle, err), err


def test_a_data_file_of_the_wrong_shape(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    code, _out, err = run_in_process(capsys, ["evaluate", tiny_llama, "--data", bad])
    assert code == 2 and "match no dataset shape" in err


def test_a_gguf_of_the_base_is_scored_beside_it_in_llama_cpp(tmp_path, capsys, gguf_llama, tiny_llama):
    pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")
    from lora_studio.core.export import ExportRequest, export_gguf
    from lora_studio.core.model.sources import resolve_source

    gguf = export_gguf(ExportRequest(resolve_source(gguf_llama), tmp_path / "b.f32.gguf", "gguf", "f32", verify=False))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "The sea is", "completion": " blue."}\n{"prompt": "Hi", "completion": " there."}\n')
    argv = ["evaluate", gguf_llama, "--data", data, "--gguf", f"file={gguf.out}", "--json"]
    code, out, err = run_in_process(capsys, argv)
    assert code == 0, err
    summary = {s["name"]: s for s in json.loads(out)["summary"] if s["dataset"] is None}
    assert summary["file"]["loss"] == pytest.approx(summary["base"]["loss"], abs=1e-3)  # float32: the same model
    # the same file beside another base (320 tokens, not 49,152): its scores would not compare, so it is refused
    code, out, err = run_in_process(capsys, ["evaluate", tiny_llama, "--data", data, "--gguf", f"file={gguf.out}"])
    # (in a test, llama.cpp's Python logger writes to the captured sys.stderr, not to the descriptor it silences)
    assert code == 2 and "more than the base's 320" in err.strip().splitlines()[-1], err
