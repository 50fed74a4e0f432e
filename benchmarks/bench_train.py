#!/usr/bin/env python
"""Training speed and memory: LoRA Studio's training job against a plain TRL SFTTrainer script.

On the demo model (SmolLM2-135M-Instruct, float32, CPU) and the demo pirate dataset, the same LoRA run
(rank 8 on the attention projections, the same seed, batch, length and steps) is done two ways, each in a
fresh process, in interleaved rounds (the order alternates):

* ``studio``: ``lora_studio.core.train.train_adapter`` (its data preparation, progress, Stop and metrics
  hooks, checkpoints and the saved folder with card and loss CSV);
* ``plain``: a bare TRL script: the rows as conversational prompt/completion, ``SFTTrainer`` with a
  ``peft_config``, ``trainer.train()``.

Both report tokens/s as the Trainer measures them (non-padding tokens seen / train_runtime) and their
per-step training losses; the studio process also reports its pre-start memory estimate, compared with
that process's measured peak RSS (on a GPU: the estimate's on-device part against torch's peak allocation).

Last line (JSON): {"tokens_per_s_ratio" (median of studio/plain per round; target >= 0.95),
"max_loss_difference" (largest per-step difference over all rounds; "float noise": < 1e-4),
"estimate_vs_peak" (median estimate / measured peak; target within 0.8-1.2), the per-round values, ...}.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps 8] [--device cuda:0 --dtype bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "resources" / "demo" / "data" / "pirate.train.jsonl"
SEED, R, ALPHA, BATCH, MAX_LENGTH, LR = 42, 8, 16.0, 4, 512, 2e-4


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: str) -> int:
    """The peak the estimate is compared with: torch's allocations on a GPU, the process's RSS on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def run_studio(base: str, out: Path, steps: int, device: str, dtype: str) -> dict:
    from lora_studio.core.model.sources import resolve_source
    from lora_studio.core.train import TrainRequest, TrainSettings, train_adapter
    from lora_studio.core.train.estimate import training_memory

    settings = TrainSettings(
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        max_steps=steps,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        learning_rate=LR,
        seed=SEED,
        val_fraction=0.0,
        save_steps=10_000,
        warmup_ratio=0.0,
        device=device,
        dtype=dtype,
    )
    source = resolve_source(base)
    result = train_adapter(TrainRequest(source, DATA, out / "studio", settings))
    from transformers import AutoTokenizer

    from lora_studio.core.train import prepare

    longest = max(len(e.input_ids) for e in prepare(DATA, AutoTokenizer.from_pretrained(base), val_fraction=0).train)
    estimate = training_memory(source, settings, longest_row=longest)
    record = result.lora
    # on a GPU the peak is torch's allocations: the estimate's device part (its host part is RAM)
    estimated = estimate.on_device if device.startswith("cuda") else estimate.total
    return {
        "tokens_per_s": record.tokens / record.seconds,
        "tokens": record.tokens,
        "seconds": record.seconds,
        "losses": [r["train_loss"] for r in record.rows if r.get("train_loss") is not None],
        "estimate_bytes": estimated,
        "peak_bytes": peak_bytes(device),
    }


def run_plain(base: str, out: Path, steps: int, device: str, dtype: str) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    train = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["instruction"]}],
                "completion": [{"role": "assistant", "content": r["answer"]}],
            }
            for r in rows
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), device_map=device)
    args = SFTConfig(
        output_dir=str(out / "plain"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        seed=SEED,
        data_seed=SEED,
        max_length=MAX_LENGTH,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",  # TRL's SFTConfig defaults to bf16 autocast; the studio job trains as asked
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
        completion_only_loss=True,
        lr_scheduler_type="linear",
        warmup_steps=0.0,
    )
    peft_config = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["k_proj", "o_proj", "q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(SEED)  # the initial A matrices, as the studio job draws them
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    metrics = trainer.train().metrics
    return {
        "tokens_per_s": trainer.state.num_input_tokens_seen / metrics["train_runtime"],
        "tokens": trainer.state.num_input_tokens_seen,
        "seconds": metrics["train_runtime"],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "peak_bytes": peak_bytes(device),
    }


def child(kind: str, base: str, steps: int, device: str, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--base", base, "--steps", str(steps)]
    done = subprocess.run(
        [*command, "--device", device, "--dtype", dtype],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--child", choices=("studio", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        with tempfile.TemporaryDirectory() as tmp:
            run = run_studio if args.child == "studio" else run_plain
            print(json.dumps(run(args.base, Path(tmp), args.steps, args.device, args.dtype)))
        return 0

    from lora_studio.core.demo.model import ensure_demo_model

    base = str(ensure_demo_model().path)
    rounds = []
    for n in range(args.rounds):
        order = ("studio", "plain") if n % 2 == 0 else ("plain", "studio")
        got = {kind: child(kind, base, args.steps, args.device, args.dtype) for kind in order}
        ratio = got["studio"]["tokens_per_s"] / got["plain"]["tokens_per_s"]
        diff = max(abs(a - b) for a, b in zip(got["studio"]["losses"], got["plain"]["losses"], strict=True))
        est = got["studio"]["estimate_bytes"] / got["studio"]["peak_bytes"]
        log(
            f"round {n + 1}/{args.rounds}: tokens/s ratio {ratio:.3f}, max loss difference {diff:.2e}, "
            f"estimate/peak {est:.2f}"
        )
        rounds.append(
            {
                "ratio": ratio,
                "loss_diff": diff,
                "estimate_vs_peak": est,
                **{f"{k}_tokens_per_s": round(v["tokens_per_s"], 1) for k, v in got.items()},
                **{f"{k}_peak_mib": round(v["peak_bytes"] / 2**20) for k, v in got.items()},
                "estimate_mib": round(got["studio"]["estimate_bytes"] / 2**20),
            }
        )
    ratios = [r["ratio"] for r in rounds]
    estimates = [r["estimate_vs_peak"] for r in rounds]
    summary = {
        "benchmark": "train",
        "model": f"SmolLM2-135M-Instruct (demo), {args.dtype}, {args.device}",
        "peak": "torch's peak allocation" if args.device.startswith("cuda") else "peak RSS",
        "steps": args.steps,
        "rounds": len(rounds),
        "tokens_per_s_ratio": round(statistics.median(ratios), 3),
        "tokens_per_s_ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "max_loss_difference": max(r["loss_diff"] for r in rounds),
        "estimate_vs_peak": round(statistics.median(estimates), 3),
        "estimate_vs_peak_spread": [round(min(estimates), 3), round(max(estimates), 3)],
        "targets": {"tokens_per_s_ratio": ">= 0.95", "max_loss_difference": "< 1e-4", "estimate_vs_peak": "0.8-1.2"},
        "per_round": rounds,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
