"""Evaluation speed: base + the 3 demo adapters on 64 validation examples, one mixed batch vs sequential runs.

On the demo model (SmolLM2-135M-Instruct, float32, CPU unless --device) with its three demo adapters (pirate,
bullets, sql) attached like a user's, ``core.evaluate.evaluate`` scores 64 examples -- the 36 rows of the three
demo validation sets, then training rows of the same sets to make 64 -- three ways, in turn, several
repetitions:

* ``mixed``: every variant in one mixed-adapter batch per group of examples (what the Evaluate tab runs);
* ``sequential``: each variant alone, one example at a time (a hand-written PEFT loop: set_adapter, forward);
* ``sequential_batched``: each variant alone, in the same groups of examples as the mixed run.

Last line (JSON): medians of each, ``ratio`` = mixed / sequential (target ≤ 0.5), ``ratio_batched`` = mixed /
sequential_batched, and ``max_loss_diff``: the largest difference of a variant's mean loss (and
``max_example_diff`` of one example's) between the mixed and the sequential runs (target ≤ 1e-5, float32).

    .venv/bin/python benchmarks/bench_evaluate.py [--reps 3] [--examples 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def examples_file(folder: Path, count: int) -> Path:
    from lora_studio.core.demo.assets import demo_dir

    data = demo_dir() / "data"
    rows: list[str] = []
    for kind in ("val", "train"):
        for name in ("pirate", "bullets", "sql"):
            rows += (data / f"{name}.{kind}.jsonl").read_text("utf-8").splitlines()
    path = folder / "bench.val.jsonl"
    path.write_text("\n".join(rows[:count]) + "\n", "utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    import torch

    from lora_studio.core.compare import session_variants
    from lora_studio.core.demo import model as demo
    from lora_studio.core.demo.assets import demo_adapters
    from lora_studio.core.evaluate.datasets import load_eval_set
    from lora_studio.core.evaluate.run import evaluate
    from lora_studio.core.model.loading import offline_environment
    from lora_studio.core.session import Session

    offline_environment()
    if args.threads:
        torch.set_num_threads(args.threads)
    session = Session()
    t0 = time.perf_counter()
    session.load(demo.ensure_demo_model(), dtype="float32", device_map=args.device)
    for adapter in demo_adapters():
        session.attach(adapter.path, adapter.name)
    say(f"loaded demo + {len(session.adapters)} adapters in {time.perf_counter() - t0:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        eval_set = load_eval_set(examples_file(Path(tmp), args.examples), session.tokenizer)
    variants = session_variants(session)
    modes = {
        "mixed": dict(mixed=True),
        "sequential": dict(mixed=False, batch_examples=1),
        "sequential_batched": dict(mixed=False),
    }

    def run(mode: str):
        started = time.perf_counter()
        result = evaluate(session, variants, [eval_set], bootstrap_samples=0, **modes[mode])
        return time.perf_counter() - started, result

    evaluate(session, variants, [eval_set], bootstrap_samples=0, batch_examples=2)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    loss_diff = example_diff = 0.0
    for rep in range(args.reps):
        results = {}
        for mode in modes:
            elapsed, results[mode] = run(mode)
            times[mode].append(elapsed)
        assert results["mixed"].mixed_batch, results["mixed"].fallback_reason
        for other in ("sequential", "sequential_batched"):
            for v in variants:
                a, b = results["mixed"], results[other]
                loss_diff = max(loss_diff, abs(a.overall(v.name).loss - b.overall(v.name).loss))
                for x, y in zip(a.scores[v.name], b.scores[v.name], strict=True):
                    example_diff = max(example_diff, abs(x.loss - y.loss))
        say(f"rep {rep + 1}: " + "  ".join(f"{m} {times[m][-1]:.1f}s" for m in modes))
    med = {m: statistics.median(t) for m, t in times.items()}
    print(
        json.dumps(
            {
                "variants": len(variants),
                "examples": len(eval_set.examples),
                "answer_tokens": sum(len(e.answer_ids) for e in eval_set.examples),
                "mixed_s": round(med["mixed"], 3),
                "sequential_s": round(med["sequential"], 3),
                "sequential_batched_s": round(med["sequential_batched"], 3),
                "ratio": round(med["mixed"] / med["sequential"], 3),
                "ratio_batched": round(med["mixed"] / med["sequential_batched"], 3),
                "paired_ratios": [round(m / s, 3) for m, s in zip(times["mixed"], times["sequential"], strict=True)],
                "max_loss_diff": loss_diff,
                "max_example_diff": example_diff,
                "losses_equal": loss_diff <= 1e-5,
                "reps": args.reps,
                "device": args.device,
                "threads": torch.get_num_threads(),
            }
        )
    )
    session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
