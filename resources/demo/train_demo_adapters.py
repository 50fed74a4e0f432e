#!/usr/bin/env python
"""Train the demo LoRA adapters shipped in resources/demo/adapters/.

Reproducible and CPU-only: fixed seeds, a plain torch loop, the demo base model
(SmolLM2-135M-Instruct, converted once by ``lora_studio.core.demo.model``). For each
adapter in ``RECIPES`` it

1. measures the UNMODIFIED base's loss on the adapter's validation split,
2. trains a small LoRA (rank 8 on the attention projections of the top decoder
   layers) with the loss on the answer tokens only, prompts rendered through the
   model's chat template exactly as the app renders them at generation time,
3. logs train and validation loss per step to ``loss.csv`` beside the adapter,
4. saves the adapter atomically (safetensors), and
5. reloads the saved folder onto a FRESH base to measure the shipped adapter's
   validation loss (the quality check) and a greedy answer to its demo prompt.

The OLoRA adapter (``bullets``) trains with ``init_lora_weights="olora"``, which
rewrites the base weights (W_res = W - scale * B0 A0). It is saved with PEFT's
``path_initial_model_for_weight_conversion``, which turns it into a plain LoRA of
twice the rank (dW = BA - B0A0) that applies to the unmodified base; step 5
checks that this reproduces the trained model's logits. PEFT writes
``init_lora_weights: true`` into the converted config, so the init that was used
is recorded in ``lora_studio.json`` beside it (LoRA Studio's inspector reads it).

Usage (from the repository root):
    .venv/bin/python resources/demo/train_demo_adapters.py            # all three
    .venv/bin/python resources/demo/train_demo_adapters.py --only pirate --steps 10

Everything lands in ``--out`` (default resources/demo/adapters/), plus
``quality.json`` with base vs adapter validation losses.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

BASE_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIDECAR = "lora_studio.json"


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # style / format / task
    description: str
    init: object  # PEFT init_lora_weights
    lr: float
    steps: int


RECIPES = {
    "pirate": Recipe("pirate", "style", "Answers in pirate speak.", True, 3e-3, 30),
    "bullets": Recipe("bullets", "format", "Answers as terse bullet lists.", "olora", 3e-3, 20),
    "sql": Recipe("sql", "task", "Turns a request about data into one SQL statement.", True, 3e-3, 30),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these adapters")
    p.add_argument("--steps", type=int, help="optimizer steps per adapter (default: the recipe's, 20-30)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--top-layers",
        type=int,
        default=12,
        help="put LoRA on the attention of the top N decoder layers only (0 = all); "
        "the backward pass then stops there, which is what keeps CPU training short",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=2,
        help="validation loss every N steps (default 2; 1 = every step, about 1.5x the time)",
    )
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every recipe's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--base", type=Path, help="base model folder (default: the demo model)")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--prompts", type=Path, default=HERE / "prompts.json")
    p.add_argument("--out", type=Path, default=HERE / "adapters")
    p.add_argument("--no-samples", action="store_true", help="skip the greedy demo-prompt answers")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def read_pairs(path: Path) -> list[dict]:
    pairs = []
    for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("instruction") or not row.get("answer"):
            raise SystemExit(f"{path}:{n}: every line needs 'instruction' and 'answer'")
        pairs.append(row)
    return pairs


def encode(tokenizer, pair: dict) -> tuple[list[int], list[int]]:
    """Chat-templated ids and labels; labels are -100 except on the answer (and its end token)."""
    from lora_studio.core.generation.generate import prompt_ids

    prompt = prompt_ids(tokenizer, pair["instruction"], use_chat_template=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = tokenizer(pair["answer"], add_special_tokens=False)["input_ids"] + [end]
    return prompt + answer, [-100] * len(prompt) + answer


def collate(examples, pad_id):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def loss_sum(model, ids, labels, mask):
    """Summed token cross-entropy over the labelled (answer) tokens, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((target != -100).sum())


def eval_loss(model, examples, pad_id, batch_size=6) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            s, n = loss_sum(model, *collate(examples[i : i + batch_size], pad_id))
            total += float(s)
            count += n
    return total / count


def batches(n_examples, batch_size, steps, seed):
    """Index batches for `steps` steps: reshuffled every epoch, reproducible from the seed."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(n_examples))
            rng.shuffle(epoch)
            order += epoch
        yield order[:batch_size]
        order = order[batch_size:]


def lr_at(step, steps, peak):
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 10)
    if step <= warm:
        return peak * step / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- model


def load_base(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def greedy(model, tokenizer, prompt, max_new_tokens=60) -> str:
    from lora_studio.core.generation.generate import GenerationSettings, generate

    return generate(model, tokenizer, prompt, GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)).text


def train_one(recipe: Recipe, args, base_path: Path, tokenizer, prompts: dict) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from lora_studio.core.io.atomic import atomic_output_dir

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    train = [encode(tokenizer, p) for p in read_pairs(args.data / f"{recipe.name}.train.jsonl")]
    val = [encode(tokenizer, p) for p in read_pairs(args.data / f"{recipe.name}.val.jsonl")]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lr = recipe.lr * args.lr_scale
    steps = args.steps or recipe.steps
    print(f"[{recipe.name}] {len(train)} train / {len(val)} val pairs, {steps} steps, lr {lr:g}", flush=True)

    model = load_base(base_path)
    base_val = eval_loss(model, val, pad_id)
    prompt = prompts.get(recipe.name, {}).get("prompt")
    base_answer = greedy(model, tokenizer, prompt) if prompt and not args.no_samples else None
    print(f"[{recipe.name}] base val loss {base_val:.4f}", flush=True)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.top_layers, n_layers)) if 0 < args.top_layers < n_layers else None
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        layers_to_transform=layers,
        init_lora_weights=recipe.init,
        task_type="CAUSAL_LM",
        base_model_name_or_path=BASE_REPO_ID,
    )
    torch.manual_seed(args.seed)
    model = get_peft_model(model, config)
    # get_peft_model records the local folder; ship the portable hub id instead.
    model.peft_config["default"].base_model_name_or_path = BASE_REPO_ID
    work = Path(tempfile.mkdtemp(prefix=f"demo-{recipe.name}-"))
    init_dir = None
    if recipe.init == "olora":
        # PEFT's recipe: save the initial adapter with init_lora_weights=True so that
        # reloading it for the conversion does not decompose the base a second time.
        init_dir = work / "olora_init"
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(init_dir)
        model.peft_config["default"].init_lora_weights = recipe.init

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rows = []
    start = time.monotonic()
    model.eval()  # no dropout anywhere; LoRA dropout is 0 too
    rows.append(
        {
            "step": 0,
            "train_loss": "",
            "val_loss": f"{eval_loss(model, val, pad_id):.5f}",
            "lr": "0",
            "elapsed_s": f"{time.monotonic() - start:.1f}",
        }
    )
    for step, idx in enumerate(batches(len(train), args.batch_size, steps, args.seed), 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        s, n = loss_sum(model, *collate([train[i] for i in idx], pad_id))
        loss = s / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        val_loss = eval_loss(model, val, pad_id) if step % args.eval_every == 0 or step == steps else None
        rows.append(
            {
                "step": step,
                "train_loss": f"{loss.item():.5f}",
                "val_loss": "" if val_loss is None else f"{val_loss:.5f}",
                "lr": f"{opt.param_groups[0]['lr']:.3g}",
                "elapsed_s": f"{time.monotonic() - start:.1f}",
            }
        )
        print(
            f"[{recipe.name}] step {step}/{steps} train {loss.item():.4f}"
            + ("" if val_loss is None else f" val {val_loss:.4f}")
            + f" ({time.monotonic() - start:.0f}s)",
            flush=True,
        )
    train_seconds = time.monotonic() - start

    # The trained model's logits on the validation set, to check the saved adapter against.
    probe = collate(val[:4], pad_id)
    with torch.no_grad():
        trained_logits = model(input_ids=probe[0], attention_mask=probe[2]).logits

    target = args.out / recipe.name
    with atomic_output_dir(target, overwrite=True) as tmp:
        if init_dir is not None:
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(init_dir))
        else:
            model.save_pretrained(tmp)
        with open(tmp / "loss.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        sidecar = {
            "tool": "resources/demo/train_demo_adapters.py",
            "init_lora_weights": recipe.init if isinstance(recipe.init, str) else "default",
            "converted_to_lora": init_dir is not None,
            "trained_rank": args.rank,
            "kind": recipe.kind,
            "description": recipe.description,
            "dataset": f"resources/demo/data/{recipe.name}.{{train,val}}.jsonl",
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": lr,
            "seed": args.seed,
            "top_layers": args.top_layers,
            "eval_every": args.eval_every,
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", "utf-8")
        (tmp / "README.md").write_text(readme(recipe, sidecar, init_dir is not None), "utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; shipped files must be readable by everyone
    del model
    shutil.rmtree(work, ignore_errors=True)

    # Quality check on exactly what ships: a fresh, unmodified base plus the saved folder.
    fresh = PeftModel.from_pretrained(load_base(base_path), str(target))
    fresh.eval()
    adapter_val = eval_loss(fresh, val, pad_id)
    with torch.no_grad():
        reloaded_logits = fresh(input_ids=probe[0], attention_mask=probe[2]).logits
    real = probe[2].bool()
    max_diff = float((reloaded_logits - trained_logits)[real].abs().max())
    answer = greedy(fresh, tokenizer, prompt) if prompt and not args.no_samples else None
    print(
        f"[{recipe.name}] adapter val loss {adapter_val:.4f} (base {base_val:.4f}); "
        f"reloaded-vs-trained max |dlogit| {max_diff:.2e}",
        flush=True,
    )
    if answer is not None:
        print(f"[{recipe.name}] base:    {base_answer!r}\n[{recipe.name}] adapter: {answer!r}", flush=True)
    if max_diff > 1e-2:
        raise SystemExit(
            f"{recipe.name}: the saved adapter does not reproduce the trained model (max |dlogit| {max_diff})"
        )
    return {
        "kind": recipe.kind,
        "init": sidecar["init_lora_weights"],
        "base_val_loss": round(base_val, 4),
        "adapter_val_loss": round(adapter_val, 4),
        "val_pairs": len(val),
        "train_pairs": len(train),
        "steps": steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "reload_max_abs_logit_diff": max_diff,
        "demo_prompt": prompt,
        "base_answer": base_answer,
        "adapter_answer": answer,
    }


def readme(recipe: Recipe, sidecar: dict, converted: bool) -> str:
    init = 'OLoRA (`init_lora_weights="olora"`)' if converted else "PEFT's default (Kaiming A, zero B)"
    lines = [
        f"# Demo adapter: {recipe.name}",
        "",
        f"{recipe.description} A {recipe.kind} adapter for {BASE_REPO_ID}, trained by "
        "`resources/demo/train_demo_adapters.py` on `resources/demo/data/"
        f"{recipe.name}.train.jsonl` ({sidecar['steps']} steps, batch {sidecar['batch_size']}, "
        f"seed {sidecar['seed']}).",
        "",
        f"- Initialisation: {init}.",
    ]
    if converted:
        lines.append(
            "- Saved with PEFT's `path_initial_model_for_weight_conversion`: a plain LoRA of rank "
            f"{2 * sidecar['trained_rank']} (twice the trained rank) that applies to the unmodified base. "
            "`adapter_config.json` therefore says `init_lora_weights: true`; `lora_studio.json` records the "
            "init actually used."
        )
    lines += [
        f"- `loss.csv`: training loss every step, validation loss every {sidecar['eval_every']} steps "
        "(step 0 is the base).",
        "",
    ]
    return "\n".join(lines)


def record_quality(path: Path, results: dict, torch_version: str) -> dict:
    """Merge these adapters' numbers into quality.json (locked: adapters may train in parallel)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # lock the folder: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text("utf-8")) if path.is_file() else {}
        adapters = {**old.get("adapters", {}), **results}
        quality = {
            "base_model": BASE_REPO_ID,
            "metric": "mean cross-entropy per answer token on the adapter's own validation split "
            "(chat template applied; lower is better)",
            "torch": torch_version,
            "adapters": {k: adapters[k] for k in sorted(adapters)},
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(quality, indent=2, ensure_ascii=False) + "\n", "utf-8")
        tmp.replace(path)
    finally:
        os.close(lock)
    return adapters


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from lora_studio.core.demo import model as demo

    if args.threads:
        torch.set_num_threads(args.threads)
    base_path = args.base or demo.ensure_demo_model().path
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompts = {p["adapter"]: p for p in json.loads(args.prompts.read_text("utf-8"))["prompts"]}
    names = args.only or list(RECIPES)
    results = {name: train_one(RECIPES[name], args, base_path, tokenizer, prompts) for name in names}
    adapters = record_quality(args.out / "quality.json", results, torch.__version__)
    worse = [k for k, v in adapters.items() if v["adapter_val_loss"] >= v["base_val_loss"]]
    if worse:
        print(f"quality check FAILED for {', '.join(worse)}: validation loss not below the base's", flush=True)
        return 1
    print(f"wrote {args.out / 'quality.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
