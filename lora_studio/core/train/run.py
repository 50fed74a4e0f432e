"""The training job: a LoRA (or OLoRA / PiSSA) adapter trained with TRL's SFTTrainer, saved like a merge.

``train_adapter(request, *, cancel, report, on_metrics) -> TrainResult`` loads its own copy of the base (OLoRA
and PiSSA rewrite the base weights while training, so the session's model is never used), prepares the data
(:mod:`.data`), trains, and writes the adapter into a temporary sibling of the output folder that is renamed
when complete. Checkpoints go beside it (``<out>.checkpoints/checkpoint-N``): Stop ends after the current step
and writes one, and a run resumed from any of them ends with the same weights as an uninterrupted run (same
seed, on the CPU). The saved adapter is a standard PEFT folder; OLoRA / PiSSA are converted on save (PEFT's
``path_initial_model_for_weight_conversion``) so it applies to the unmodified base.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lora_studio.core._compat import bnb_cpu_unpack
from lora_studio.core.errors import Cancelled, OutOfMemory, UserError, is_out_of_memory
from lora_studio.core.io.paths import check_output_apart, inside, regular_file
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report
from lora_studio.core.train.data import PreparedData, as_trainer_dataset, prepare_as_set
from lora_studio.core.train.records import INITIAL_ADAPTER, OnMetrics, RunRecord, TrainRequest, no_metrics
from lora_studio.core.train.settings import CONVERTED_INITS, MAX_TRAIN_STEPS, TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedWeights:
    """One set of trained weights saved as an adapter folder: the best (by validation loss) or the last."""

    kind: str  # "best" or "last"
    step: int
    val_loss: float | None
    path: Path

    def to_json(self) -> dict[str, Any]:
        return {"kept": self.kind, "step": self.step, "val_loss": self.val_loss, "path": str(self.path)}


@dataclass(frozen=True)
class TrainResult:
    adapter: Path
    checkpoints: Path
    kept: str  # "best" or "last": which weights the saved adapter holds
    kept_step: int
    lora: RunRecord
    baseline: RunRecord | None
    data_summary: str
    warnings: tuple[str, ...]
    settings: TrainSettings
    alternative: SavedWeights | None = None  # the weights not kept (best or last), when they differ

    @property
    def kept_val_loss(self) -> float | None:
        return self.lora.best_val_loss if self.kept == "best" else self.lora.last_val_loss

    def swapped(self) -> TrainResult:
        """This result once :func:`.save.swap_with_alternative` has exchanged the kept and the other weights."""
        if self.alternative is None:
            raise UserError("this run saved one set of weights", "nothing to swap")
        moved = SavedWeights(self.kept, self.kept_step, self.kept_val_loss, self.alternative.path)
        return replace(self, kept=self.alternative.kind, kept_step=self.alternative.step, alternative=moved)

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter),
            "checkpoints": str(self.checkpoints),
            "kept": self.kept,
            "kept_step": self.kept_step,
            **{k: v for k, v in self.lora.to_json().items() if k != "run"},
            "baseline": self.baseline.to_json() if self.baseline else None,
            "data": self.data_summary,
            "warnings": list(self.warnings),
            "settings": self.settings.to_json(),
            "alternative": self.alternative.to_json() if self.alternative else None,
        }


def train_adapter(
    request: TrainRequest,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    on_metrics: OnMetrics = no_metrics,
) -> TrainResult:
    """Train, save and describe one adapter; raises Cancelled (with the checkpoint to resume from) on Stop.

    However it ends, the run's copy of the model, its trainer and optimizer are freed and the heap trimmed, so
    the memory chart shows the memory come back."""
    try:
        return _train(request, cancel=cancel or CancelToken(), report=report, on_metrics=on_metrics)
    finally:
        from lora_studio.core.system.memory import trim_heap

        trim_heap()


def _train(request: TrainRequest, *, cancel: CancelToken, report: Report, on_metrics: OnMetrics) -> TrainResult:
    from lora_studio.core.model.loading import load_model, load_tokenizer
    from lora_studio.core.train import save

    settings = request.settings
    settings.check()
    check_output_apart(
        Path(request.out),
        {
            "base model": request.base.file,  # a GGUF base: the file (its folder may hold the output)
            "training data": Path(request.train_file),
            "validation data": Path(request.val_file) if request.val_file else None,
            "checkpoint to resume from": Path(request.resume) if request.resume else None,
        },
    )
    out = Path(request.out).expanduser().absolute()
    for folder in (out, Path(request.checkpoints)):  # found before training, not when saving after it
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} exists and is not a folder", "choose another output folder")
    if out.exists() and not request.overwrite:
        raise UserError(
            f"{out} already exists", "choose another output folder, or allow replacing it (--overwrite in the CLI)"
        )
    resume = _checked_checkpoint(request.resume, settings) if request.resume is not None else None
    if settings.baseline:
        _check_baseline_allowed(request.base)
    # the data first: a bad file is said before the weights are loaded
    report(Progress(0, None, "reading the tokenizer"))
    tokenizer = load_tokenizer(request.base, trust_remote_code=request.trust_remote_code)
    data = prepare_as_set(settings, request.train_file, tokenizer, request.val_file, cancel=cancel, report=report)
    steps = total_steps(settings, len(data.train))
    if steps > MAX_TRAIN_STEPS:
        raise UserError(
            f"{steps:,} optimiser steps ({settings.epochs:g} epochs of {len(data.train):,} rows): more than "
            f"{MAX_TRAIN_STEPS:,}",
            "lower the epochs or set max steps",
        )
    report(Progress(0, None, "loading the base model"))
    model = load_model(
        request.base,
        dtype=settings.dtype,
        device_map=settings.device,
        trust_remote_code=request.trust_remote_code,
        quantize=settings.quantize,
        cancel=cancel,
        report=report,  # each tensor counted, as a load in the window is
    )
    if settings.quantize:
        from peft import prepare_model_for_kbit_training

        # QLoRA's preparation: the unquantised parameters (norms, embeddings) in float32, inputs that carry
        # gradients into the checkpointed layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    cancel.raise_if_cancelled()
    for warning in data.warnings:
        log.warning("training data: %s", warning)
    init = f" ({settings.init} init)" if settings.init != "default" else ""
    report(Progress(0, None, f"adding the adapter{init}"))  # OLoRA's QR and PiSSA's SVD of every module take a while
    # a 4-bit base on the CPU: evaluations must not pack its layers for the inference kernel (it has no backward),
    # and a state dict (every checkpoint) must keep their block scales in order
    with bnb_cpu_unpack.packing_off(), bnb_cpu_unpack.block_scales_restored():
        peft_model = _with_new_adapter(model, settings, request.checkpoints, resume, cancel, report)
        record = _run_trainer(
            peft_model, tokenizer, data, settings, request.checkpoints, resume, "lora", cancel, report, on_metrics
        )
        kept, alternative = _save_kept_and_alternative(
            request, out, peft_model, tokenizer, data, record, cancel, report
        )
    baseline = None
    if settings.baseline:
        del peft_model, model  # the baseline needs the memory
        baseline = _run_baseline(request, tokenizer, data, cancel, report, on_metrics)
        save.add_baseline(kept.path, record, baseline)
        if alternative is not None:
            save.add_baseline(alternative.path, record, baseline)
    return TrainResult(
        kept.path,
        request.checkpoints,
        kept.kind,
        kept.step,
        record,
        baseline,
        data.summary(),
        tuple(data.warnings) + ((record.overfitting,) if record.overfitting else ()),
        settings,
        alternative,
    )


def _save_kept_and_alternative(
    request: TrainRequest,
    out: Path,
    peft_model: Any,
    tokenizer: Any,
    data: PreparedData,
    record: RunRecord,
    cancel: CancelToken,
    report: Report,
) -> tuple[SavedWeights, SavedWeights | None]:
    """The adapter the settings keep, in ``out``; and when the best and the last step differ, the other one
    beside the checkpoints, so the user can still choose it at the end (:func:`.save.swap_with_alternative`)."""
    from lora_studio.core.train import save

    has_best = record.best_state is not None and record.best_step is not None
    keep = request.settings.keep if has_best else "last"
    wanted = {keep}
    if has_best and record.best_step != record.steps:
        wanted.add("last" if keep == "best" else "best")
    saved: dict[str, SavedWeights] = {}
    for kind in ("last", "best"):  # the model holds the last weights now: they are saved before the best are loaded
        if kind not in wanted:
            continue
        path = out if kind == keep else request.checkpoints / f"{kind}-adapter"
        if kind == "best":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, record.best_state)
            weights = SavedWeights(kind, record.best_step or 0, record.best_val_loss, path)
        else:
            weights = SavedWeights(kind, record.steps, record.last_val_loss, path)
        report(Progress(0, None, f"saving the adapter ({kind} weights)"))
        save.save_trained_adapter(
            request,
            weights.path,
            peft_model,
            tokenizer,
            data,
            record,
            keep=kind,
            kept_step=weights.step,
            cancel=cancel,
            overwrite=request.overwrite or kind != keep,
        )
        saved[kind] = weights
    record.best_state = None  # saved; not carried further (nor pickled back from a worker process)
    other = next((w for k, w in saved.items() if k != keep), None)
    return saved[keep], other


def train_in_worker_process(
    request: TrainRequest,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
    on_metrics: OnMetrics = no_metrics,
) -> TrainResult:
    """:func:`train_adapter` in a worker process: the window's way, so its GUI thread never waits for the
    interpreter lock the run would hold, and a run killed for memory does not take the window with it."""
    from lora_studio.core.system.child_process import run_in_child_process

    return run_in_child_process(
        train_adapter,
        request,
        cancel=cancel,
        report=report,
        callbacks={"on_metrics": on_metrics},
        name="lora-studio-train",
    )


def _checked_checkpoint(path: Path, settings: TrainSettings) -> Path:
    """A checkpoint folder whose files are what the Trainer writes: its state an object of the Trainer's keys, and
    only regular files inside it (the pickles it holds are opened with weights_only, see _refused_pickle)."""
    path = Path(path).expanduser().absolute()
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise UserError(
            f"{path} is not a training checkpoint (no trainer_state.json)",
            "pick a checkpoint-N folder inside the run's .checkpoints folder",
        )
    for item in path.iterdir():
        regular_file(inside(path, item.name, "checkpoint file"), "checkpoint file")
    try:
        state = json.loads(state_file.read_text("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.name}/trainer_state.json is not valid JSON", "pick an intact checkpoint") from exc
    from transformers import TrainerState

    known = set(TrainerState.__dataclass_fields__)
    if not isinstance(state, dict) or not set(state) <= known or not isinstance(state.get("log_history", []), list):
        raise UserError(
            f"{path.name}/trainer_state.json is not a Trainer's state",
            "pick a checkpoint-N folder written by LoRA Studio's training",
        )
    if (path / "adapter_config.json").is_file():  # a checkpoint of another run: its tensors would not fit this one
        from lora_studio.core.adapters.files import read_adapter_config

        saved = read_adapter_config(path)
        if saved.r != settings.r or float(saved.lora_alpha) != float(settings.alpha):
            raise UserError(
                f"{path.name} was saved by a run with r={saved.r}, alpha={saved.lora_alpha:g}; this run has "
                f"r={settings.r}, alpha={settings.alpha:g}",
                "resume with the settings of the run that wrote the checkpoint",
            )
    return path


BASELINE_MAX_PARAMS = 500_000_000


def _check_baseline_allowed(source: ModelSource) -> None:
    from lora_studio.core.model.estimate import read_footprint

    params = read_footprint(source).params
    if params > BASELINE_MAX_PARAMS:
        raise UserError(
            f"a full fine-tuning baseline of {params / 1e6:.0f} M parameters is too large for a desktop run",
            f"the baseline is offered for models up to {BASELINE_MAX_PARAMS // 1_000_000} M parameters",
        )


# -- the adapter -----------------------------------------------------------------------------------------------------


def linear_module_names(model: Any) -> list[str]:
    """The leaf names of the model's linear layers that can carry a LoRA (the output head excluded)."""
    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full_name, module in model.named_modules():
        if isinstance(module, _linear_kinds()) and module is not output:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def _linear_kinds() -> tuple[type, ...]:
    """The layers a LoRA targets as linear ones: torch's Linear and transformers' Conv1D (GPT-2's attention and MLP,
    stored in × out: PEFT's fan_in_fan_out)."""
    import torch
    import transformers

    return (torch.nn.Linear, transformers.Conv1D)


ATTENTION_WORDS = ("attn", "attention")


def resolve_targets(model: Any, targets: tuple[str, ...]) -> list[str] | str:
    """Module names for LoraConfig from a preset or the user's names; unknown names list the valid ones."""
    valid = linear_module_names(model)
    if tuple(targets) == ("all-linear",):
        return "all-linear"
    if tuple(targets) == ("attention",):
        found = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, _linear_kinds()) and any(w in name.lower() for w in ATTENTION_WORDS)
            }
        )
        if not found:
            raise UserError(
                "this model has no linear layers inside attention blocks", f"choose from: {', '.join(valid)}"
            )
        return found
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise UserError(
            f"target module(s) {', '.join(unknown)} not found in this model",
            f"choose from: {', '.join(valid)} (or the presets attention, all-linear)",
        )
    return list(targets)


def lora_config(model: Any, settings: TrainSettings) -> Any:
    from peft import LoraConfig

    init: Any = True if settings.init == "default" else settings.init
    targets = resolve_targets(model, settings.targets)
    _check_rank_usable(model, settings.r, targets)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float alpha works
        lora_dropout=settings.dropout,
        target_modules=targets,
        init_lora_weights=init,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        task_type="CAUSAL_LM",
    )


def targeted_layers(model: Any, targets: list[str] | str) -> list[Any]:
    """The layers a LoraConfig of ``targets`` (names, or "all-linear") adapts."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, _linear_kinds())
        and module is not output
        and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)
    ]


def _check_rank_usable(model: Any, r: int, targets: list[str] | str) -> None:
    """A rank that some targeted layer can hold: above every layer's min(in, out), B·A only costs memory (a
    rank of 100 000 on a small model writes gigabytes and learns what a full-rank update would)."""
    ranks = [_full_rank(layer) for layer in targeted_layers(model, targets)]
    if ranks and r > max(ranks):
        raise UserError(
            f"rank r={r} is more than any targeted layer can hold (at most {max(ranks)}: the smaller of its sizes)",
            "4-8 is usually enough",
        )


def _full_rank(layer: Any) -> int:
    """min(in, out) from the layer's sizes, not its weight's shape (a 4-bit weight is packed into one column);
    transformers' Conv1D names them nx and nf."""
    return min(getattr(layer, "in_features", 0) or layer.nx, getattr(layer, "out_features", 0) or layer.nf)


def _with_new_adapter(
    model: Any,
    settings: TrainSettings,
    checkpoints: Path,
    resume: Path | None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> Any:
    import torch
    from peft import get_peft_model

    from lora_studio.core._compat.peft_init_progress import reporting_layers

    config = lora_config(model, settings)
    torch.manual_seed(settings.seed)  # the initial A (and the QR/SVD inits are deterministic)
    init = f" ({settings.init} init)" if settings.init != "default" else ""
    layers = len(targeted_layers(model, config.target_modules))
    with reporting_layers(layers, f"adding the adapter{init}", cancel or CancelToken(), report):
        peft_model = get_peft_model(model, config)
    if settings.init in CONVERTED_INITS:
        initial = checkpoints / INITIAL_ADAPTER
        if resume is None or not initial.is_dir():
            # PEFT's recipe: save the starting adapter marked as a plain init, so that loading it back for the
            # conversion does not decompose the (already rewritten) base a second time.
            peft_model.peft_config["default"].init_lora_weights = True
            checkpoints.mkdir(parents=True, exist_ok=True)
            peft_model.save_pretrained(str(initial))
            peft_model.peft_config["default"].init_lora_weights = settings.init
    return peft_model


# -- one trainer run -------------------------------------------------------------------------------------------------


def _sft_config(settings: TrainSettings, output_dir: Path, has_val: bool, run: str) -> Any:
    from trl import SFTConfig

    optimiser: dict[str, Any] = {}
    if settings.quantize and settings.device.startswith("cuda"):
        optimiser["optim"] = "paged_adamw_8bit"  # QLoRA's: AdamW's states in 8 bits, paged out under memory pressure
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate if run == "lora" else settings.learning_rate / 10,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps > 0 else -1,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_ratio,
        seed=settings.seed,
        data_seed=settings.seed,
        max_length=settings.max_length,
        completion_only_loss=settings.completion_only,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach the callback, which stops the run
        eval_strategy="steps" if has_val else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps" if run == "lora" else "no",
        save_steps=settings.save_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=settings.device == "cpu",
        bf16=settings.dtype == "bfloat16",
        fp16=settings.dtype == "float16",
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
        dataset_num_proc=None,
        **optimiser,
    )


def _run_trainer(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    settings: TrainSettings,
    output_dir: Path,
    resume: Path | None,
    run: str,
    cancel: CancelToken,
    report: Report,
    on_metrics: OnMetrics,
) -> RunRecord:
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from lora_studio.core.train.callbacks import StudioCallback

    record = RunRecord(run)
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's count: a packed 4-bit tensor holds two per byte
        record.trainable_params, record.total_params = model.get_nb_trainable_parameters()
    else:
        record.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record.total_params = sum(p.numel() for p in model.parameters())
    callback = StudioCallback(record, settings, cancel, report, on_metrics)
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(settings, output_dir, bool(data.val), run),
        train_dataset=as_trainer_dataset(data.train),
        eval_dataset=as_trainer_dataset(data.val) if data.val else None,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the callback above reports; nothing printed to stdout
    try:
        if resume is not None:
            callback.restore_history(resume)
        elif data.val:  # the validation loss before any step: the curve's starting point (on_evaluate records it)
            callback.total_steps = total_steps(settings, len(data.train))
            trainer.evaluate()
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except (Cancelled, UserError):
        raise
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused a file of the checkpoint
        raise UserError(
            f"{resume.name if resume else 'the checkpoint'}: a file of it is not plain tensors and was not opened "
            "(it could run code)",
            "resume only from checkpoints this training wrote",
        ) from exc
    except (RuntimeError, MemoryError) as exc:
        if is_out_of_memory(exc):
            raise _oom(settings) from exc
        raise
    finally:
        model.eval()
    if record.nan_at is not None:
        raise UserError(
            f"the training loss became NaN at step {record.nan_at}; the run was stopped",
            "lower the learning rate (e.g. 1e-4) or use float32",
        )
    if cancel.cancelled:
        checkpoint = output_dir / f"checkpoint-{record.steps}"
        raise Cancelled(
            f"training stopped after step {record.steps}; Resume continues from {checkpoint}"
            if run == "lora"
            else "training stopped"
        )
    return record


def total_steps(settings: TrainSettings, rows: int) -> int:
    """Optimiser steps the run will take (as the Trainer counts them, on one device)."""
    if settings.max_steps > 0:
        return settings.max_steps
    per_epoch = max(1, math.ceil(rows / settings.batch_size) // settings.grad_accum)
    return math.ceil(settings.epochs * per_epoch)


def _oom(settings: TrainSettings) -> OutOfMemory:
    return OutOfMemory(
        f"out of memory while training with batch size {settings.batch_size} x max length {settings.max_length}",
        "lower the batch size (raise gradient accumulation to keep the effective batch) or the max length",
    )


def _run_baseline(
    request: TrainRequest,
    tokenizer: Any,
    data: PreparedData,
    cancel: CancelToken,
    report: Report,
    on_metrics: OnMetrics,
) -> RunRecord:
    """Every weight trained on the same data and steps (at a tenth of the learning rate), nothing saved."""
    import tempfile

    from lora_studio.core.model.loading import load_model

    report(Progress(0, None, "loading the base model for the full fine-tuning baseline"))
    settings = request.settings
    model = load_model(
        request.base,
        dtype=settings.dtype,
        device_map=settings.device,
        trust_remote_code=request.trust_remote_code,
        cancel=cancel,
        report=report,
    )
    model.requires_grad_(True)
    with tempfile.TemporaryDirectory(prefix="lora-studio-baseline-") as scratch:
        record = _run_trainer(
            model, tokenizer, data, request.settings, Path(scratch), None, "full", cancel, report, on_metrics
        )
    del model
    return record
