"""``lora-studio train``: JSON out, exit codes, one clear line for bad input, the exported script."""

from __future__ import annotations

import json

from cli_helpers import run_in_process

WORDS = ["cat", "dog", "sun", "sea", "red", "blue"]


def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": f"{w} {w}"}) + "\n" for w in WORDS * 2))
    return path


def test_train_json(capsys, tmp_path, tiny_llama):
    code, out, err = run_in_process(
        capsys,
        [
            "train",
            tiny_llama,
            "--data",
            data_file(tmp_path),
            "--out",
            tmp_path / "a",
            "--max-steps",
            "4",
            "--eval-steps",
            "2",
            "--init",
            "pissa",
            "--json",
        ],
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["adapter"] == str(tmp_path / "a")
    assert result["best_val_loss"] is not None and result["settings"]["init"] == "pissa"
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_train_bad_input_is_one_line_exit_2(capsys, tmp_path, tiny_llama):
    data = data_file(tmp_path)
    cases = [
        (["--targets", "nope"], "target module(s) nope not found"),
        (["--lr", "0"], "trains nothing"),
        (["--resume", tmp_path / "data"], "is not a training checkpoint"),
        (["--resume", tmp_path], "inside the checkpoint to resume from"),
    ]
    (tmp_path / "data").mkdir()
    for extra, message in cases:
        code, _, err = run_in_process(capsys, ["train", tiny_llama, "--data", data, "--out", tmp_path / "x", *extra])
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("question,reply\na,b\n")
    code, _, err = run_in_process(capsys, ["train", tiny_llama, "--data", bad, "--out", tmp_path / "x"])
    assert code == 2 and "columns question, reply match no dataset shape" in err


def test_train_export_script(capsys, tmp_path, tiny_llama):
    code, out, err = run_in_process(
        capsys,
        [
            "train",
            tiny_llama,
            "--data",
            data_file(tmp_path),
            "--out",
            tmp_path / "a",
            "--export-script",
            tmp_path / "job",
            "--gpus",
            "4",
            "--json",
        ],
    )
    assert code == 0, err
    exported = json.loads(out)
    assert exported["script"].endswith("train_lora.py")
    assert "num_processes: 4" in (tmp_path / "job" / "accelerate_ddp.yaml").read_text()
    assert "distributed_type: FSDP" in (tmp_path / "job" / "accelerate_fsdp.yaml").read_text()
    assert not (tmp_path / "a").exists()  # exporting trains nothing


def test_train_refuses_an_output_over_its_inputs(capsys, tmp_path, tiny_llama):
    import shutil

    base = shutil.copytree(tiny_llama, tmp_path / "base")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    data = data_file(data_folder)
    for out, label in ((base, "base model"), (data_folder, "training data"), (tmp_path, "base model")):
        argv = ["train", base, "--data", data, "--out", out, "--overwrite", "--max-steps", "1"]
        code, _, err = run_in_process(capsys, argv)
        assert code == 2 and label in err and "would be replaced" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before and data.is_file()


def test_progress_without_a_terminal_is_plain_lines_after_a_quiet_start(capsys, monkeypatch):
    """A log file gets a line per stage and one per half minute within a stage; a quick command gets none."""
    from lora_studio.cli import common
    from lora_studio.core.tasks import Progress

    clock = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    progress = common.stderr_progress()
    progress(Progress(0, None, "loading the model"))
    assert capsys.readouterr().err == ""  # the first ten seconds: nothing
    for t, done in ((111, 1), (112, 2), (125, 3), (142, 4)):
        clock[0] = t
        progress(Progress(done, 10, "training", "steps"))
    clock[0] = 143
    progress(Progress(0, 3, "saving", "files"))  # a new stage, but 1 s after the last line: not yet
    clock[0] = 145
    progress(Progress(1, 3, "saving", "files"))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["training · 1/10 steps (10 %)", "training · 4/10 steps (40 %)", "saving · 1/3 files (33 %)"]
