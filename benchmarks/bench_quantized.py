#!/usr/bin/env python
"""Quantised bases on the demo model: memory and speed of NF4 against bfloat16, QLoRA against LoRA, and the merge.

Every measurement runs in its own fresh process (a child of this script), interleaved over ``--rounds``:

* ``load``: LoRA Studio's ``Session.load`` of the demo (SmolLM2-135M-Instruct) in bfloat16, and in NF4
  (bitsandbytes, computing in bfloat16), with torch, transformers, PEFT and bitsandbytes imported first: the
  process's peak RSS (VmHWM), the same less the RSS after the imports, and what stays resident after the load (freed
  heap pages handed back); then the demo's pirate adapter attached and ``--tokens`` greedy tokens generated
  (tokens/s, after one warm-up);
* ``train``: ``train_adapter`` on the demo pirate data, LoRA (float32) against QLoRA (``quantize="nf4"``, computing
  in float32), the same rank, seed and ``--steps``: peak RSS and the Trainer's tokens/s;
* ``merge``: the QLoRA adapter of the last train round merged with ``merge_into="auto"``: the KL of each candidate
  (original W16 + ΔW, dequantized dequant(Wq) + ΔW) against the adapter on the NF4 base, and the chosen one.

The last line on stdout is one JSON object: {"load": {"rss_ratio", "rss_above_imports_ratio", "resident_ratio",
"tokens_per_s_ratio", per-round values}, "train": {"rss_ratio", "tokens_per_s_ratio", ...}, "merge": {"kl",
"chosen", "median_gap_ratio"}, "targets"}. Target (issue 28): NF4 load peak RSS <= 0.5x bfloat16's.

    .venv/bin/python benchmarks/bench_quantized.py [--rounds 3] [--tokens 32] [--steps 8] [--train-rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "resources" / "demo" / "data" / "pirate.train.jsonl"
ADAPTER = ROOT / "resources" / "demo" / "adapters" / "pirate"
PROMPT = "How do I make a good cup of coffee?"


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def rss_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child_load(quantize: str | None, tokens: int) -> dict:
    import bitsandbytes  # noqa: F401 - every library imported first (PEFT imports it too): the load's own cost
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from lora_studio.core.demo.model import ensure_demo_model
    from lora_studio.core.session import Session
    from lora_studio.core.system.memory import trim_heap

    source = ensure_demo_model()
    imported = rss_mb("VmRSS")
    session = Session()
    started = time.perf_counter()
    session.load(source, dtype="bfloat16", quantize=quantize)  # type: ignore[arg-type]
    load_s = time.perf_counter() - started
    peak_load = rss_mb()
    trim_heap()  # what stays: the freed pages of the load handed back (the session does so after quantising)
    resident = rss_mb("VmRSS") - imported
    session.attach(ADAPTER, "pirate")
    ids = session.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        session.model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up (bitsandbytes packs on the CPU)
        started = time.perf_counter()
        out = session.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - started
    generated = int(out.shape[1] - ids.shape[1])
    session.close()
    return {
        "load_s": load_s,
        "peak_rss_mb": peak_load,
        "imports_rss_mb": imported,
        "resident_mb": resident,
        "tokens_per_s": generated / seconds,
    }


def child_train(quantize: str | None, steps: int, out: str) -> dict:
    from lora_studio.core.demo.model import ensure_demo_model
    from lora_studio.core.train import TrainRequest, TrainSettings, train_adapter

    settings = TrainSettings(
        max_steps=steps,
        batch_size=4,
        dropout=0.0,
        val_fraction=0.0,
        save_steps=10_000,
        seed=42,
        quantize=quantize,  # type: ignore[arg-type]  # nf4 or None
    )
    result = train_adapter(TrainRequest(ensure_demo_model(), DATA, Path(out), settings, overwrite=True))
    record = result.lora
    return {"tokens_per_s": record.tokens / record.seconds, "peak_rss_mb": rss_mb(), "adapter": str(result.adapter)}


def child_merge(adapter: str, out: str) -> dict:
    from lora_studio.core.demo.model import ensure_demo_model
    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save

    started = time.perf_counter()
    result = merge_and_save(
        ensure_demo_model(), [AdapterSpec("qlora", Path(adapter))], MergeOptions(Path(out), overwrite=True)
    )
    target = result.quantized_base
    assert target is not None, "the QLoRA adapter's record names its base's quantisation"
    summary = target.to_json()
    return {
        "kl": target.kl,
        "chosen": target.chosen,
        "median_gap_ratio": summary["median_gap_ratio"],
        "layers_gap_above_update": summary["layers_gap_above_update"],
        "layers": len(target.layers),
        "verification": result.verification.status if result.verification else None,
        "seconds": time.perf_counter() - started,
    }


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="load + generate rounds (default 3)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens generated per round (default 32)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (default 8)")
    parser.add_argument("--train-rounds", type=int, default=1, help="LoRA + QLoRA training rounds (default 1)")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        kind, *rest = args.child
        if kind == "load":
            result = child_load(None if rest[0] == "none" else rest[0], int(rest[1]))
        elif kind == "train":
            result = child_train(None if rest[0] == "none" else rest[0], int(rest[1]), rest[2])
        else:
            result = child_merge(rest[0], rest[1])
        print(json.dumps(result))
        return 0

    started = time.perf_counter()
    loads: dict[str, list[dict]] = {"bfloat16": [], "nf4": []}
    for n in range(args.rounds):
        for kind in ("nf4", "bfloat16") if n % 2 else ("bfloat16", "nf4"):
            loads[kind].append(child("load", "none" if kind == "bfloat16" else "nf4", str(args.tokens)))
        b, q = loads["bfloat16"][-1], loads["nf4"][-1]
        log(
            f"load round {n + 1}: peak RSS nf4 {q['peak_rss_mb']:.0f} / bf16 {b['peak_rss_mb']:.0f} MB, "
            f"tokens/s nf4 {q['tokens_per_s']:.1f} / bf16 {b['tokens_per_s']:.1f}"
        )
    trains: dict[str, list[dict]] = {"lora": [], "qlora": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.train_rounds):
            for kind in ("qlora", "lora") if n % 2 else ("lora", "qlora"):
                quantize = "nf4" if kind == "qlora" else "none"
                trains[kind].append(child("train", quantize, str(args.steps), str(Path(tmp) / kind)))
            log(
                f"train round {n + 1}: peak RSS qlora {trains['qlora'][-1]['peak_rss_mb']:.0f} / lora "
                f"{trains['lora'][-1]['peak_rss_mb']:.0f} MB, tokens/s qlora {trains['qlora'][-1]['tokens_per_s']:.1f}"
                f" / lora {trains['lora'][-1]['tokens_per_s']:.1f}"
            )
        merge = child("merge", trains["qlora"][-1]["adapter"], str(Path(tmp) / "merged"))
        log(f"merge: KL {merge['kl']}, chosen {merge['chosen']}, median gap ratio {merge['median_gap_ratio']}")

    def above(r: dict) -> float:
        return r["peak_rss_mb"] - r["imports_rss_mb"]

    pairs = list(zip(loads["nf4"], loads["bfloat16"], strict=True))
    train_pairs = list(zip(trains["qlora"], trains["lora"], strict=True))
    summary = {
        "benchmark": "quantized",
        "model": "SmolLM2-135M-Instruct (demo), CPU",
        "load": {
            "rss_ratio": spread([q["peak_rss_mb"] / b["peak_rss_mb"] for q, b in pairs]),
            "rss_above_imports_ratio": spread([above(q) / above(b) for q, b in pairs]),
            "resident_ratio": spread([q["resident_mb"] / b["resident_mb"] for q, b in pairs]),
            "nf4_resident_mb": spread([q["resident_mb"] for q, _ in pairs], 0),
            "bfloat16_resident_mb": spread([b["resident_mb"] for _, b in pairs], 0),
            "tokens_per_s_ratio": spread([q["tokens_per_s"] / b["tokens_per_s"] for q, b in pairs]),
            "nf4_peak_rss_mb": spread([q["peak_rss_mb"] for q, _ in pairs], 0),
            "bfloat16_peak_rss_mb": spread([b["peak_rss_mb"] for _, b in pairs], 0),
            "imports_rss_mb": spread([b["imports_rss_mb"] for _, b in pairs], 0),
            "nf4_tokens_per_s": spread([q["tokens_per_s"] for q, _ in pairs], 1),
            "bfloat16_tokens_per_s": spread([b["tokens_per_s"] for _, b in pairs], 1),
        },
        "train": {
            "steps": args.steps,
            "rss_ratio": spread([q["peak_rss_mb"] / lo["peak_rss_mb"] for q, lo in train_pairs]),
            "tokens_per_s_ratio": spread([q["tokens_per_s"] / lo["tokens_per_s"] for q, lo in train_pairs]),
            "qlora_peak_rss_mb": spread([q["peak_rss_mb"] for q, _ in train_pairs], 0),
            "lora_peak_rss_mb": spread([lo["peak_rss_mb"] for _, lo in train_pairs], 0),
        },
        "merge": merge,
        "targets": {"load.rss_ratio": "<= 0.5"},
        "pass": {"load.rss_ratio": statistics.median([q["peak_rss_mb"] / b["peak_rss_mb"] for q, b in pairs]) <= 0.5},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
