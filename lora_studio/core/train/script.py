"""Export a training run as a standalone script plus ``accelerate`` configs, to run it on a cluster.

The script needs only torch, transformers, peft, trl and datasets (not LoRA Studio). It reads the same data
files, turns every shape into TRL's prompt/completion (or text) rows the way LoRA Studio does, trains with
the same settings through ``SFTTrainer`` and saves the adapter (OLoRA/PiSSA converted) on the main process.
``accelerate launch --config_file accelerate_ddp.yaml train_lora.py`` runs it data-parallel over the GPUs of
one machine; ``accelerate_fsdp.yaml`` shards a model that does not fit one GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir
from lora_studio.core.io.paths import check_output_apart
from lora_studio.core.train.records import TrainRequest

SCRIPT_NAME = "train_lora.py"


@dataclass(frozen=True)
class ExportedScript:
    folder: Path
    script: Path
    configs: tuple[Path, ...]

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "script": str(self.script), "configs": [str(c) for c in self.configs]}


_SCRIPT = '''#!/usr/bin/env python
"""Train a LoRA adapter with TRL's SFTTrainer: exported by LoRA Studio.

    accelerate launch --config_file accelerate_ddp.yaml train_lora.py     # every GPU of this machine
    accelerate launch --config_file accelerate_fsdp.yaml train_lora.py    # a model too large for one GPU
    accelerate launch --cpu --num_processes 2 train_lora.py               # a try-out on the CPU

Edit JOB below to change a setting; paths may be changed to where the files are on the cluster.
"""

import json
import os
import random

import datasets
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

JOB = json.loads(r"""__JOB__""")
OUTPUT_COLUMNS = ("output", "response", "answer")


def read(path):
    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        return loaded["train" if "train" in loaded else next(iter(loaded))] if isinstance(loaded, dict) else loaded
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[os.path.splitext(path)[1].lower()]
    return datasets.load_dataset(kind, data_files=path, split="train")


def as_trl_row(row, chat):
    """The row as TRL's prompt/completion (conversational when the tokenizer has a chat template) or text."""
    if "messages" in row:
        turns = row["messages"]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        return {"prompt": turns[:last], "completion": [turns[last]]}
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
    elif "instruction" in row:
        prompt = row["instruction"] + (f"\\n\\n{row['input']}" if row.get("input") else "")
        completion = next(row[c] for c in OUTPUT_COLUMNS if row.get(c) is not None)
    else:
        return {"text": row["text"]}
    if isinstance(prompt, list):
        return {"prompt": prompt, "completion": completion}
    if chat:
        user, assistant = {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}
        return {"prompt": [user], "completion": [assistant]}
    return {"prompt": prompt + "\\n\\n", "completion": completion}


def main():
    s = JOB["settings"]
    tokenizer = AutoTokenizer.from_pretrained(JOB["base"])
    chat = bool(tokenizer.chat_template)
    train = [as_trl_row(r, chat) for r in read(JOB["train_file"])]
    if JOB["val_file"]:
        val = [as_trl_row(r, chat) for r in read(JOB["val_file"])]
    elif s["val_fraction"] > 0 and len(train) >= 2:
        order = list(range(len(train)))
        random.Random(s["seed"]).shuffle(order)
        held = set(order[: max(1, round(len(train) * s["val_fraction"]))])
        val = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    else:
        val = []
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[s["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(JOB["base"], dtype=dtype)
    init = True if s["init"] == "default" else s["init"]
    peft_config = LoraConfig(
        r=s["r"],
        lora_alpha=s["alpha"],
        lora_dropout=s["dropout"],
        target_modules=JOB["target_modules"],
        init_lora_weights=init,
        use_rslora=s["rslora"],
        use_dora=s["dora"],
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=JOB["out"] + ".checkpoints",
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["learning_rate"],
        num_train_epochs=s["epochs"],
        max_steps=s["max_steps"] if s["max_steps"] > 0 else -1,
        lr_scheduler_type=s["scheduler"],
        warmup_steps=s["warmup_ratio"],
        seed=s["seed"],
        data_seed=s["seed"],
        max_length=s["max_length"],
        completion_only_loss=s["completion_only"],
        logging_steps=1,
        eval_strategy="steps" if val else "no",
        eval_steps=s["eval_steps"],
        save_steps=s["save_steps"],
        bf16=s["dtype"] == "bfloat16",
        fp16=s["dtype"] == "float16",
        report_to="none",
    )
    torch.manual_seed(s["seed"])
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train),
        eval_dataset=datasets.Dataset.from_list(val) if val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    initial = os.path.join(args.output_dir, "initial-adapter")
    converted = s["init"] in ("olora", "pissa")
    if converted and trainer.accelerator.is_main_process:
        # PEFT's recipe: the starting adapter, marked as a plain init, to convert the result to a plain LoRA
        trainer.model.peft_config["default"].init_lora_weights = True
        trainer.model.save_pretrained(initial)
        trainer.model.peft_config["default"].init_lora_weights = init
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=JOB.get("resume") or None)
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.peft_config["default"].base_model_name_or_path = JOB["base"]
        if converted:
            model.save_pretrained(JOB["out"], path_initial_model_for_weight_conversion=initial)
        else:
            model.save_pretrained(JOB["out"])
        print(json.dumps({"adapter": JOB["out"], "steps": trainer.state.global_step}))


if __name__ == "__main__":
    main()
'''

_DDP = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: {precision}
num_machines: 1
num_processes: {gpus}  # one per GPU
machine_rank: 0
main_training_function: main
use_cpu: false
"""

_FSDP = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: {precision}
num_machines: 1
num_processes: {gpus}  # one per GPU
machine_rank: 0
main_training_function: main
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
use_cpu: false
"""


def script_targets(request: TrainRequest) -> list[str] | str:
    """The target modules the run would use, resolved on the base's structure (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_studio.core.train.run import resolve_targets

    config = AutoConfig.from_pretrained(str(request.base.path), trust_remote_code=request.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=request.trust_remote_code)
    return resolve_targets(model, request.settings.targets)


MAX_PROCESSES = 1024  # processes over every machine of a job; more is a typo


def export_script(request: TrainRequest, folder: Path, *, gpus: int = 2, overwrite: bool = False) -> ExportedScript:
    """Write ``train_lora.py`` and two accelerate configs (DDP, FSDP) into ``folder`` (atomically)."""
    settings = request.settings
    settings.check()
    if request.base.gguf_file:
        raise UserError("a GGUF base cannot be trained by the exported script", "export from a Hugging Face folder")
    if settings.quantize:
        raise UserError(
            "the exported multi-GPU script trains the base in full precision, not QLoRA",
            "export it without --quantize, or train QLoRA in LoRA Studio (train --quantize)",
        )
    if not 1 <= gpus <= MAX_PROCESSES:
        raise UserError(f"{gpus} GPUs: the accelerate configs take 1 to {MAX_PROCESSES}", "one process per GPU")
    target_modules = script_targets(request)
    job = {
        "base": str(request.base.path),
        "train_file": str(Path(request.train_file).absolute()),
        "val_file": str(Path(request.val_file).absolute()) if request.val_file else None,
        "out": str(Path(request.out).absolute()),
        "target_modules": target_modules,
        "settings": settings.to_json(),
        "resume": str(request.resume) if request.resume else None,
    }
    precision = "bf16" if settings.dtype == "bfloat16" else "fp16" if settings.dtype == "float16" else "no"
    if not str(folder).strip():
        raise UserError("the script folder is empty", "name the folder to write the script into")
    check_output_apart(
        Path(folder),
        {
            "base model": request.base.file,
            "training data": Path(request.train_file),
            "validation data": Path(request.val_file) if request.val_file else None,
            "checkpoint to resume": Path(request.resume) if request.resume else None,
        },
    )
    folder = Path(folder).expanduser().absolute()
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        script = tmp / SCRIPT_NAME
        script.write_text(_SCRIPT.replace("__JOB__", json.dumps(job, indent=2)), "utf-8")
        script.chmod(0o755)
        (tmp / "accelerate_ddp.yaml").write_text(_DDP.format(precision=precision, gpus=gpus), "utf-8")
        (tmp / "accelerate_fsdp.yaml").write_text(_FSDP.format(precision=precision, gpus=gpus), "utf-8")
    return ExportedScript(
        folder, folder / SCRIPT_NAME, (folder / "accelerate_ddp.yaml", folder / "accelerate_fsdp.yaml")
    )
