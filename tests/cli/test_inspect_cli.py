"""`lora-studio inspect` as a user runs it: JSON shape, human table, exit codes."""

import json
import subprocess
import sys

import pytest

from lora_studio.cli.main import main


def run_cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "lora_studio", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_inspect_json(tiny_llama, llama_adapters, capsys):
    code = main(
        [
            "inspect",
            str(tiny_llama),
            "--adapter",
            f"a={llama_adapters['alpha']}",
            "--adapter",
            str(llama_adapters["beta"]),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["base"]) >= {"path", "architecture", "params", "dtype", "estimated_bytes"}
    assert out["base"]["params"] == 39072 and out["base"]["architecture"] == "LlamaForCausalLM"
    a, b = out["adapters"]
    assert (a["name"], b["name"]) == ("a", "adapter-beta")
    assert set(a) >= {
        "name",
        "peft_type",
        "r",
        "lora_alpha",
        "scaling",
        "use_dora",
        "target_modules",
        "params",
        "percent_of_base",
        "modules",
    }
    assert a["modules"][0].keys() >= {"module", "delta_norm", "singular_values"}
    assert b["r"] == 8 and b["scaling"] == 2.0


def test_inspect_human_table(tiny_llama, llama_adapters, capsys):
    assert main(["inspect", str(tiny_llama), "--adapter", str(llama_adapters["alpha"])]) == 0
    out = capsys.readouterr().out
    assert "Params     39,072" in out and "model.layers.1.self_attn.v_proj" in out and "|ΔW|_F" in out


def test_mismatched_adapter_exit_2_one_line(tiny_llama, wide_adapter):
    code, out, err = run_cli("inspect", tiny_llama, "--adapter", wide_adapter)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "model.layers.0.self_attn.q_proj: adapter expects in=64,out=64, base has in=32,out=32" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["inspect"], "no base model given"),
        (["inspect", "/nonexistent/model"], "does not exist"),
        (["inspect", "--bogus-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exit_2(args, needle, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.slow
def test_demo_json_params():
    code, out, err = run_cli("inspect", "--demo", "--json")
    assert code == 0, err
    assert json.loads(out)["base"]["params"] == 134_515_008
