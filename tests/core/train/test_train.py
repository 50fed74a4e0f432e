"""Training on tiny real models: TRL's SFTTrainer with PEFT, the saved folder, cancel and resume, bad input."""

from __future__ import annotations

import json
import math

import factories
import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_studio.core.adapters.files import read_adapter_config
from lora_studio.core.adapters.inspection import init_summary
from lora_studio.core.adapters.training_log import read_loss_log
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.tasks import CancelToken
from lora_studio.core.train import TrainRequest, TrainSettings, prepare, preview, train_adapter
from lora_studio.core.train.estimate import training_memory
from lora_studio.core.train.run import lora_config

WORDS = ["cat", "dog", "sun", "sea", "red", "blue", "one", "two"]
QUICK = TrainSettings(max_steps=12, eval_steps=4, save_steps=100, learning_rate=5e-3, batch_size=4)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="module")
def expressive_llama(models_dir):
    """A tiny Llama with larger random weights: the default init's small output head caps how far a LoRA can
    move its logits, so the default tiny model cannot show a loss that falls by much."""
    return factories.make_llama(models_dir / "tiny-llama-expressive", initializer_range=0.2)


@pytest.fixture
def pairs(tmp_path):
    rows = [{"instruction": f"say {w}", "output": f"{w} {w} {w}"} for w in WORDS] * 4
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def request(base, data, out, settings=QUICK, **kw) -> TrainRequest:
    return TrainRequest(resolve_source(base), data, out, settings, **kw)


def test_the_loss_falls_and_the_folder_is_a_peft_adapter(expressive_llama, pairs, tmp_path):
    tiny_llama = expressive_llama
    points = []
    settings = QUICK.with_changes(max_steps=40, learning_rate=1e-2, dropout=0.0, val_fraction=0.0)
    result = train_adapter(request(tiny_llama, pairs, tmp_path / "out", settings), on_metrics=points.append)
    train = [p.train_loss for p in points if p.train_loss is not None]
    assert len(train) == 40 and train[-1] < 0.6 * train[0]  # the tiny model memorises the pairs
    assert result.kept == "last" and result.lora.best_step is None  # no validation: the last weights
    out = result.adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.csv", "README.md", "lora_studio.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary sibling left
    log = read_loss_log(out)
    assert len(log.train) == 40 and log.train.values[-1] == pytest.approx(train[-1], rel=1e-4)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "pairs.jsonl" in card
    provenance = json.loads((out / "lora_studio.json").read_text())
    assert provenance["data"]["train_rows"] == 32 and len(provenance["data"]["train_sha256"]) == 64
    # loads on the base with PEFT and changes its outputs
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert not torch.allclose(plain, adapted)


def test_validation_curve_best_weights_and_overfitting_warning(tiny_llama, pairs, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "say moon", "output": "moon moon moon"}] * 3)
    points = []
    settings = QUICK.with_changes(max_steps=24, eval_steps=3, learning_rate=5e-2, patience=2)
    result = train_adapter(
        request(tiny_llama, pairs, tmp_path / "out", settings, val_file=val), on_metrics=points.append
    )
    vals = [(p.step, p.val_loss) for p in points if p.val_loss is not None]
    assert vals[0][0] == 0 and [s for s, _ in vals] == list(range(0, 25, 3))  # before any step, then every 3
    assert result.lora.best_val_loss == min(v for s, v in vals if s > 0)
    assert result.kept == "best" and result.kept_step == result.lora.best_step
    warnings = [p.warning for p in points if p.warning]
    if warnings:  # the memorised pairs teach nothing about "moon": the validation loss usually rises
        assert "overfitting" in warnings[0] and len(warnings) == 1

    # the last weights are saved too (best and last differ here), so the end of the run can still choose them
    assert result.lora.best_step < result.lora.steps
    other = result.alternative
    assert other is not None and other.kind == "last" and other.step == 24
    assert other.path == result.checkpoints / "last-adapter"
    best_weights = load_file(result.adapter / "adapter_model.safetensors")
    last_weights = load_file(other.path / "adapter_model.safetensors")
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)
    assert json.loads((other.path / "lora_studio.json").read_text())["result"]["kept"] == "last"
    assert result.to_json()["alternative"]["path"] == str(other.path)

    from lora_studio.core.train.save import swap_with_alternative

    swap_with_alternative(result.adapter, other.path)
    swapped = result.swapped()
    assert (swapped.kept, swapped.kept_step) == ("last", 24)
    assert (swapped.alternative.kind, swapped.alternative.step) == ("best", result.lora.best_step)
    assert swapped.alternative.val_loss == result.lora.best_val_loss
    now = load_file(result.adapter / "adapter_model.safetensors")
    assert all(torch.equal(now[k], last_weights[k]) for k in now)
    assert json.loads((result.adapter / "lora_studio.json").read_text())["result"]["kept"] == "last"
    assert json.loads((other.path / "lora_studio.json").read_text())["result"]["kept"] == "best"


def test_olora_and_pissa_apply_to_the_unmodified_base(tiny_llama, pairs, tmp_path):
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    for init in ("olora", "pissa"):
        settings = QUICK.with_changes(init=init, keep="last", save_steps=12, dropout=0.0)
        result = train_adapter(request(tiny_llama, pairs, tmp_path / init, settings))
        # the trained model: the same init rewrites a fresh base, then the last checkpoint's weights
        trained_base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        torch.manual_seed(settings.seed)
        trained = get_peft_model(trained_base, lora_config(trained_base, settings))
        set_peft_model_state_dict(
            trained, load_file(result.checkpoints / "checkpoint-12" / "adapter_model.safetensors")
        )
        saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(result.adapter))
        with torch.no_grad():
            expected, got = trained.eval()(ids).logits, saved.eval()(ids).logits
        assert torch.allclose(expected, got, atol=1e-4), init
        config = read_adapter_config(result.adapter)
        assert config.r == 2 * settings.r  # converted: a plain LoRA of twice the rank
        assert init_summary(config) == f"{'OLoRA' if init == 'olora' else 'PiSSA'}, converted"


def test_stop_then_resume_equals_an_uninterrupted_run(tiny_llama, pairs, tmp_path):
    settings = QUICK.with_changes(max_steps=16, keep="last")  # dropout on: its random state is restored too
    whole = train_adapter(request(tiny_llama, pairs, tmp_path / "whole", settings))
    token = CancelToken()

    def stop_at_7(p):
        if p.message == "training" and p.done == 7:
            token.cancel()

    with pytest.raises(Cancelled, match="after step 7"):
        train_adapter(request(tiny_llama, pairs, tmp_path / "parts", settings), cancel=token, report=stop_at_7)
    assert not (tmp_path / "parts").exists()  # nothing half-written
    checkpoint = tmp_path / "parts.checkpoints" / "checkpoint-7"
    resumed = train_adapter(request(tiny_llama, pairs, tmp_path / "parts", settings, resume=checkpoint))
    a = load_file(whole.adapter / "adapter_model.safetensors")
    b = load_file(resumed.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = read_loss_log(resumed.adapter)
    assert list(log.train.steps) == list(range(1, 17))  # the steps before the stop are in the log too
    # the validation points too, the one before the first step included
    whole_val = read_loss_log(whole.adapter).val
    assert list(log.val.steps) == list(whole_val.steps) and log.val.steps[0] == 0
    assert list(log.val.values) == pytest.approx(list(whole_val.values))


@pytest.mark.parametrize(
    "kind",
    ["messages", "prompt_completion", "instruction_input", "text", "csv", "parquet", "saved", "json_array"],
)
def test_every_shape_and_format(tiny_llama, tmp_path, kind):
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    if kind == "messages":
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    elif kind == "instruction_input":
        rows = [{"instruction": "add", "input": "1 2", "response": "3"}]
    elif kind == "text":
        rows = [{"text": "the sea is blue"}]
    else:
        rows = [{"prompt": "hi", "completion": "hello there"}]
    rows = rows * 4
    path = tmp_path / "data.jsonl"
    if kind in ("csv", "parquet", "saved"):
        table = datasets.Dataset.from_list(rows)
        path = tmp_path / {"csv": "d.csv", "parquet": "d.parquet", "saved": "saved"}[kind]
        {"csv": table.to_csv, "parquet": table.to_parquet, "saved": table.save_to_disk}[kind](str(path))
    elif kind == "json_array":
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(path, rows)
    data = prepare(path, tokenizer, val_fraction=0.25)
    assert len(data.train) == 3 and len(data.val) == 1
    example = data.train[0]
    if kind == "text":
        assert all(example.completion_mask)
    else:  # the loss on the answer only: the prompt (chat template included) is masked
        assert example.completion_mask[0] == 0 and example.completion_mask[-1] == 1
        rendered = preview(data.train, tokenizer, max_length=512)[0]
        answer = "".join(text for text, loss in rendered.pieces if loss)
        assert ("hello there" if kind != "instruction_input" else "3") in answer
    whole = prepare(path, tokenizer, val_fraction=0.0, completion_only=False)
    assert all(whole.train[0].completion_mask)


def test_the_chat_template_renders_as_at_generation(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "yo"}])
    ids = prepare(path, tokenizer, val_fraction=0).train[0].input_ids
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=True, return_dict=True
    )["input_ids"]
    assert ids == list(expected)


def bad(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "has no rows"),
        ("cols.jsonl", '{"question": "a", "reply": "b"}\n', "columns question, reply match no dataset shape"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "line 1: not UTF-8"),
        ("latin1.csv", b"text\ncaf\xe9\n", "line 2: not UTF-8"),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', "line 2: not valid JSON"),
        ("noanswer.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
        ("emptycell.jsonl", '{"prompt": "a", "completion": ""}\n', "'completion' is empty"),
        ("list.jsonl", "[1, 2]\n", "a int, not an object"),
        ("data.txt", "hello", "unknown data file type .txt"),
    ],
)
def test_bad_data_is_one_clear_line(tiny_llama, tmp_path, name, content, message):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        prepare(bad(tmp_path, name, content), tokenizer)
    assert "\n" not in str(info.value)


def test_overlap_and_long_rows_are_counted(tiny_llama, pairs, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "say cat", "output": "cat cat cat"}])
    data = prepare(pairs, tokenizer, val_file=val, max_length=30)
    text = " ".join(data.warnings)
    assert "1 validation row(s) also appear in the training data" in text
    longer = sum(len(e.input_ids) > 30 for e in data.train + data.val)
    assert 0 < longer < 33 and data.rows_too_long == longer and f"{longer} row(s) are longer than 30 tokens" in text
    with pytest.raises(UserError, match="no training row has an answer within the first 12 tokens"):
        prepare(pairs, tokenizer, max_length=12)  # the chat template's prompt alone is longer


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learning_rate": 0.0}, "trains nothing"),
        ({"learning_rate": float("nan")}, "not a number"),
        ({"r": 0}, "from 1 to 65536"),
        ({"targets": ("q_proj", "attn_nope")}, "attn_nope not found in this model.*choose from: .*k_proj"),
        ({"init": "olora", "dora": True}, "DoRA cannot be combined"),
    ],
)
def test_bad_settings_stop_before_anything_is_written(tiny_llama, pairs, tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        train_adapter(request(tiny_llama, pairs, tmp_path / "out", QUICK.with_changes(**changes)))
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_the_run_with_a_message(tiny_llama, pairs, tmp_path):
    settings = QUICK.with_changes(learning_rate=1e30, max_steps=30, warmup_ratio=0.0, val_fraction=0.0)
    with pytest.raises(UserError, match="became NaN at step"):
        train_adapter(request(tiny_llama, pairs, tmp_path / "out", settings))
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_unless_overwritten(tiny_llama, pairs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        train_adapter(request(tiny_llama, pairs, tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_full_fine_tuning_baseline_is_reported_beside_the_lora(tiny_llama, pairs, tmp_path):
    settings = QUICK.with_changes(baseline=True, max_steps=8)
    points = []
    result = train_adapter(request(tiny_llama, pairs, tmp_path / "out", settings), on_metrics=points.append)
    assert result.baseline is not None and {p.run for p in points} == {"lora", "full"}
    assert result.baseline.trainable_params == result.baseline.total_params > 10 * result.lora.trainable_params
    assert result.baseline.best_val_loss is not None and math.isfinite(result.baseline.best_val_loss)
    card = (result.adapter / "README.md").read_text()
    assert "## Full fine-tuning baseline" in card
    header = (result.adapter / "loss.csv").read_text().splitlines()[0]
    assert header.endswith("baseline_train_loss,baseline_val_loss")


def test_memory_estimate_parts(tiny_llama):
    source = resolve_source(tiny_llama)
    small = training_memory(source, TrainSettings(batch_size=1, max_length=64))
    big = training_memory(source, TrainSettings(batch_size=8, max_length=512))
    assert small.verdict == "fits" and big.activations == 64 * small.activations
    assert small.adapter_params > 0 and big.total > small.total
    tight = training_memory(source, TrainSettings(), free_ram_bytes=1)
    assert tight.verdict == "does_not_fit" and "lower the batch size" in tight.explanation
    # on the CPU everything is RAM; on a GPU the tensors are on the device, the libraries and loading pages in RAM
    assert small.host == small.on_device + small.runtime and small.total == small.host + small.loading
    on_gpu = training_memory(source, TrainSettings(batch_size=1, max_length=64, device="cuda:0"))
    assert on_gpu.on_device == small.on_device and on_gpu.host == on_gpu.runtime
    assert on_gpu.to_json()["on_device_bytes"] == on_gpu.on_device and "on cuda:0" in on_gpu.summary()


def test_exported_script_trains_with_accelerate_on_two_processes(tiny_llama, pairs, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lora_studio.core.train.script import export_script, script_targets

    req = request(tiny_llama, pairs, tmp_path / "cluster-out", QUICK.with_changes(max_steps=4, batch_size=2))
    exported = export_script(req, tmp_path / "job")
    assert script_targets(req) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(exported.script),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"steps": 4' in done.stdout
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "cluster-out"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_a_hostile_checkpoint_is_one_line_and_runs_nothing(tiny_llama, pairs, tmp_path):
    import os
    import pickle
    import shutil

    settings = QUICK.with_changes(max_steps=2, save_steps=1, keep="last", val_fraction=0.0)
    train_adapter(request(tiny_llama, pairs, tmp_path / "run", settings))
    good = tmp_path / "run.checkpoints" / "checkpoint-1"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def poisoned(name: str, change) -> object:
        folder = tmp_path / f"poisoned-{name}"
        shutil.copytree(good, folder)
        change(folder)
        with pytest.raises(UserError) as caught:
            train_adapter(request(tiny_llama, pairs, tmp_path / f"out-{name}", settings, resume=folder))
        assert "\n" not in str(caught.value) and not (tmp_path / f"out-{name}").exists()
        return caught.value

    for file in ("rng_state.pth", "optimizer.pt", "scheduler.pt"):
        if (good / file).exists():
            error = poisoned(file, lambda f, file=file: pickle.dump({"x": Evil()}, open(f / file, "wb")))  # noqa: SIM115
            assert "not plain tensors" in str(error), error
    state = json.loads((good / "trainer_state.json").read_text())
    listed = poisoned("state-list", lambda f: (f / "trainer_state.json").write_text("[1, 2]"))
    assert "not a Trainer's state" in str(listed)
    unknown = poisoned("state-keys", lambda f: (f / "trainer_state.json").write_text(json.dumps({**state, "evil": 1})))
    assert "not a Trainer's state" in str(unknown)
    piped = poisoned("fifo", lambda f: ((f / "scheduler.pt").unlink(missing_ok=True), os.mkfifo(f / "scheduler.pt")))
    assert "not a regular file" in str(piped)
    assert not marker.exists()
    other_rank = settings.with_changes(r=settings.r * 2)
    with pytest.raises(UserError, match=f"was saved by a run with r={settings.r}"):
        train_adapter(request(tiny_llama, pairs, tmp_path / "other-rank", other_rank, resume=good))


@pytest.fixture(scope="module")
def plain_llama(models_dir):
    """A tiny Llama whose tokenizer has no chat template (a base model, not an instruct one)."""
    return factories.save_model(
        models_dir / "plain-llama", factories.llama_config(), tokenizer=factories.make_tokenizer(chat_template=False)
    )


def test_a_base_without_a_chat_template_trains_prompt_and_answer_as_written_as_trl_does(plain_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lora_studio.core.evaluate import datasets as eval_datasets

    rows = [{"prompt": "The sea is", "completion": " blue and deep."}, {"prompt": "One, two,", "completion": " three"}]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(plain_llama)
    data = prepare(path, tokenizer, val_fraction=0.0)
    assert data.text_format == "plain"
    # TRL's own tokenisation of the same rows
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(plain_llama),
        args=SFTConfig(
            output_dir=str(tmp_path / "trl"), report_to=[], completion_only_loss=True, use_cpu=True, bf16=False
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # (TRL folds its completion mask into the labels: -100 where no loss is computed)
    trl_rows = {tuple(r["input_ids"]): [int(label != -100) for label in r["labels"]] for r in trainer.train_dataset}
    ours = {tuple(e.input_ids): e.completion_mask for e in data.train}
    assert ours == trl_rows
    # evaluation scores the same tokens: the prompt as written, then the answer
    examples = eval_datasets.load_eval_set(path, tokenizer).examples
    assert {tuple(e.prompt_ids) + tuple(e.answer_ids) for e in examples} == set(trl_rows)
    # the adapter says how it was trained, and so how to prompt it
    one_step = QUICK.with_changes(max_steps=1, val_fraction=0)
    result = train_adapter(request(plain_llama, path, tmp_path / "out", one_step))
    assert json.loads((result.adapter / "lora_studio.json").read_text())["data"]["text_format"] == "plain"
    assert "prompt it with the bare prompt" in (result.adapter / "README.md").read_text()


def test_the_start_of_a_run_counts_its_stages(tiny_llama, pairs, tmp_path):
    """Before step 0: the rows prepared, the weights loaded and the init's layers, each with its count."""
    reports = []
    settings = QUICK.with_changes(max_steps=1, init="olora")
    train_adapter(request(tiny_llama, pairs, tmp_path / "a", settings), report=reports.append)
    counted = {p.stage for p in reports if p.total}
    assert {"preparing data: row", "loading weights", "adding the adapter (olora init): layer"} <= counted, counted
