"""`lora-studio reduce` as a user runs it: the plan, a cut with its measured cost, and one-line refusals."""

import json

import pytest
from cli_helpers import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "val.jsonl"
    rows = [{"prompt": "Say hello.", "completion": "Hello there."}, {"prompt": "Name a colour.", "completion": "Blue."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plan_prints_suggestions_and_writes_nothing(tmp_path, llama_adapters, capsys):
    code, out, err = run_in_process(capsys, ["reduce", llama_adapters["beta"], "--plan"])
    assert code == 0, err
    assert "energy kept" in out and "per-module ranks" in out
    code, out, _ = run_in_process(capsys, ["reduce", llama_adapters["beta"], "--plan", "--json"])
    doc = json.loads(out)
    assert doc["kind"] == "rank_plan" and doc["r"] == 8
    assert [s["energy"] for s in doc["suggestions"]] == [0.9, 0.95, 0.99]


def test_reduce_measures_the_cost_against_the_original(tmp_path, tiny_llama, llama_adapters, data, capsys):
    out_dir = tmp_path / "beta-r2"
    argv = ["reduce", llama_adapters["beta"], "--rank", "2", "--out", out_dir, "--base", tiny_llama, "--data", data]
    code, out, err = run_in_process(capsys, [*argv, "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "reduction" and doc["r_before"] == 8 and doc["r_after"] == 2
    assert doc["params_after"] * 4 == doc["params_before"]
    assert doc["cost"]["kl"] > 0 and doc["cost"]["tokens"] > 0 and doc["cost"]["loss_base"] is not None
    assert (out_dir / "adapter_model.safetensors").is_file() and (out_dir / "README.md").is_file()
    code, out, err = run_in_process(capsys, [*argv, "--overwrite"])
    assert code == 0, err
    assert "rank 8 → 2" in out and "KL from the original" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--rank K or --energy E"),
        (["--rank", "2"], "no --out folder"),
        (["--energy", "2", "--out", "x"], "between 0 and 1"),
        (["--rank", "0", "--out", "x"], "positive whole number"),
        (["--rank", "2", "--energy", "0.9"], "not allowed with"),
    ],
)
def test_bad_requests_are_one_line(tmp_path, llama_adapters, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_in_process(capsys, ["reduce", llama_adapters["beta"], *extra])
    assert code == 2 and message in err and err.count("\n") == 1 and not out
    assert not (tmp_path / "x").exists()


def test_an_output_over_the_adapter_is_refused(llama_adapters, capsys):
    before = (llama_adapters["alpha"] / "adapter_model.safetensors").read_bytes()
    argv = ["reduce", llama_adapters["alpha"], "--rank", "1", "--out", llama_adapters["alpha"], "--overwrite"]
    code, _, err = run_in_process(capsys, argv)
    assert code == 2 and "would be replaced" in err
    assert (llama_adapters["alpha"] / "adapter_model.safetensors").read_bytes() == before
