"""Every broken input in the corpus gives one clear line: in the core, and on the CLI with exit 2."""

import re

import pytest

import bad_inputs
from lora_studio.cli.main import main
from lora_studio.core.errors import UserError, describe
from lora_studio.core.inspect_model import inspect_base_and_adapters
from lora_studio.core.session import Session
from lora_studio.core.sources import resolve_source

CASES = bad_inputs.CASES


@pytest.fixture(scope="module")
def fixtures(tiny_llama, llama_adapters, wide_adapter, gpt2_adapter):
    return {"base": tiny_llama, "adapter": llama_adapters["alpha"], "wide_adapter": wide_adapter, "gpt2_adapter": gpt2_adapter}


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
