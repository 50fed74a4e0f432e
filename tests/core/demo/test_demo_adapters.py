"""The shipped demo adapters: discovery, their loss logs, their init label, and that they visibly work.

Only ``test_demo_adapters_change_greedy_answers`` loads the real demo model (one
load for the module, ``slow``); everything else reads files.
"""

from __future__ import annotations

import json
import shutil

import pytest

from lora_studio.core.adapters.files import read_adapter_config
from lora_studio.core.adapters.training_log import find_loss_csv, read_loss_csv
from lora_studio.core.demo import assets as demo_assets
from lora_studio.core.errors import UserError

DEMO_NAMES = {"pirate", "bullets", "sql"}


# -- training_log -------------------------------------------------------------


def _write(tmp_path, text, name="loss.csv"):
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def test_loss_csv_with_validation_on_some_steps(tmp_path):
    path = _write(tmp_path, "step,train_loss,val_loss,lr\n0,,4.5,0\n1,4.0,,0.002\n2,3.5,3.6,0.002\n3,3.1,,0.001\n")
    log = read_loss_csv(path)
    assert log.train.steps == (1, 2, 3) and log.train.values == (4.0, 3.5, 3.1)
    assert log.val.steps == (0, 2) and log.val.values == (4.5, 3.6)
    assert log.has_validation and log.val.best == 3.6 and log.train.last == 3.1
    assert log.warnings == ()


def test_loss_csv_trainer_style_columns_and_order(tmp_path):
    # Trainer logs: global_step / loss / eval_loss, rows not necessarily sorted.
    log = read_loss_csv(_write(tmp_path, "global_step,loss,eval_loss\n20,1.5,\n10,2.0,2.2\n"))
    assert log.train.steps == (10, 20) and log.train_column == "loss" and log.val_column == "eval_loss"


def test_loss_csv_train_only(tmp_path):
    log = read_loss_csv(_write(tmp_path, "step,train_loss\n1,2.0\n2,1.0\n"))
    assert len(log.train) == 2 and not log.has_validation


def test_loss_csv_non_finite_values_are_skipped_and_reported(tmp_path):
    log = read_loss_csv(_write(tmp_path, "step,train_loss\n1,2.0\n2,nan\n3,inf\n"))
    assert log.train.values == (2.0,) and "2 non-finite" in log.warnings[0]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "is empty"),
        ("step,train_loss\n1,abc\n", "line 2: train_loss is 'abc'"),
        ("epoch,accuracy\n1,0.5\n", "no step column"),
        ("step,accuracy\n1,0.5\n", "no loss column"),
        ("step,train_loss\n1,2.0,9\n", "line 2 has 3 fields"),
        ("step,train_loss\n,2.0\n", "the step is missing"),
        ("step,train_loss,val_loss\n1,,\n", "no loss values"),
    ],
)
def test_malformed_loss_csv_is_a_clear_error(tmp_path, text, words):
    with pytest.raises(UserError) as info:
        read_loss_csv(_write(tmp_path, text))
    assert words in info.value.message


def test_loss_csv_not_utf8_and_missing(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_bytes(b"step,train_loss\n1,\xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_loss_csv(path)
    with pytest.raises(UserError, match="no loss log"):
        read_loss_csv(tmp_path / "missing.csv")
    assert find_loss_csv(tmp_path / "nowhere") is None


# -- demo_assets ---------------------------------------------------------------


def test_demo_assets_found_in_the_source_checkout():
    adapters = demo_assets.demo_adapters()
    assert {a.name for a in adapters} == DEMO_NAMES
    prompts = demo_assets.demo_prompts()
    assert set(prompts) == DEMO_NAMES and all(p.strip() for p in prompts.values())
    for adapter in adapters:
        assert (adapter.path / "adapter_model.safetensors").is_file()
        assert adapter.prompt == prompts[adapter.name] and adapter.title and adapter.kind
        assert (adapter.path / "adapter_model.safetensors").stat().st_size < 8 * 1024 * 1024
        log = read_loss_csv(adapter.loss_csv)  # every shipped adapter has a plottable log
        assert log.has_validation and log.val.values[-1] < log.val.values[0]
    assert demo_assets.icon_path("svg") is not None and demo_assets.icon_path("png") is not None


def test_demo_assets_override_and_installed_layouts(tmp_path, monkeypatch):
    copy = tmp_path / "share" / "lora-studio" / "resources"
    shutil.copytree(demo_assets.resources_dir() / "demo", copy / "demo", ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.setenv(demo_assets.RESOURCES_ENV, str(copy))
    assert demo_assets.resources_dir() == copy
    # An explicit override that is not a resources folder says so instead of guessing.
    monkeypatch.setenv(demo_assets.RESOURCES_ENV, str(tmp_path / "elsewhere"))
    assert demo_assets.candidate_dirs()[0] == tmp_path / "elsewhere"
    monkeypatch.delenv(demo_assets.RESOURCES_ENV)
    # A wheel install puts resources under <prefix>/share/lora-studio/resources.
    monkeypatch.setattr(demo_assets.sys, "prefix", str(tmp_path))
    assert copy in demo_assets.candidate_dirs()


def test_missing_resources_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_assets, "candidate_dirs", lambda: [tmp_path])
    with pytest.raises(UserError, match="demo resources are not installed"):
        demo_assets.resources_dir()
    assert demo_assets.icon_path() is None
    monkeypatch.setenv(demo_assets.RESOURCES_ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"has no demo/prompts.json"):
        demo_assets.resources_dir()


def test_damaged_prompts_file(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "prompts.json").write_text('{"prompts": [{"adapter": "x"}]}', "utf-8")
    monkeypatch.setenv(demo_assets.RESOURCES_ENV, str(tmp_path))
    with pytest.raises(UserError, match="is damaged"):
        demo_assets.demo_prompts()


def test_olora_adapter_says_which_init_it_used():
    folder = next(a.path for a in demo_assets.demo_adapters() if a.name == "bullets")
    config = read_adapter_config(folder)
    # PEFT's conversion to plain LoRA rewrites the config (init true, rank doubled) ...
    assert (
        config.init_lora_weights is True
        and config.r == 2 * json.loads((folder / "lora_studio.json").read_text())["trained_rank"]
    )
    # ... so the inspector reads the init from lora_studio.json.
    assert config.init_method.startswith("olora (converted to plain LoRA")
    plain = next(a.path for a in demo_assets.demo_adapters() if a.name == "pirate")
    assert read_adapter_config(plain).init_method == "default (kaiming A, zero B)"


def test_quality_numbers_recorded():
    quality = json.loads((demo_assets.demo_dir() / "adapters" / "quality.json").read_text("utf-8"))
    assert set(quality["adapters"]) == DEMO_NAMES
    for name, numbers in quality["adapters"].items():
        assert numbers["adapter_val_loss"] < numbers["base_val_loss"], name
    assert quality["adapters"]["bullets"]["reload_max_abs_logit_diff"] < 1e-2


# -- the real demo model (slow: one load for the module) ------------------------


@pytest.fixture(scope="module")
def demo_session():
    from lora_studio.core.demo import model as demo
    from lora_studio.core.session import Session

    session = Session()
    session.load(demo.ensure_demo_model())
    for adapter in demo_assets.demo_adapters():
        session.attach(adapter.path, adapter.name, activate=False)
    yield session
    session.close()


# What each adapter's answer must visibly show (and the base's answer does not).
SIGNATURES = {
    "pirate": lambda text: any(w in text.lower() for w in ("arr", "matey", "ye ", "yer ")),
    "bullets": lambda text: text.lstrip().startswith("- ") and text.count("\n- ") >= 1,
    "sql": lambda text: text.lstrip().upper().startswith("SELECT"),
}


@pytest.mark.slow
def test_demo_adapters_change_greedy_answers(demo_session):
    from lora_studio.core.generation.generate import GenerationSettings, generate

    # Eight tokens show each signature (and keep six CPU generations within seconds).
    settings = GenerationSettings(max_new_tokens=8, do_sample=False)
    for adapter in demo_assets.demo_adapters():
        demo_session.disable_adapters()
        base = generate(demo_session.model, demo_session.tokenizer, adapter.prompt, settings).text
        demo_session.activate(adapter.name)
        tuned = generate(demo_session.model, demo_session.tokenizer, adapter.prompt, settings).text
        assert tuned.strip() and tuned != base, adapter.name
        assert SIGNATURES[adapter.name](tuned), (adapter.name, tuned)
        assert not SIGNATURES[adapter.name](base), (adapter.name, base)
