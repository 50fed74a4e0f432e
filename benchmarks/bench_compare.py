"""Comparison speed: base + 2 adapters, one mixed-adapter batch vs one run per variant.

On the demo model (SmolLM2-135M-Instruct, float32, CPU unless --device), two
LoRA adapters are made here with PEFT's get_peft_model(init_lora_weights=False)
on the attention projections (r=4), saved to a temporary folder and attached to a
Session like a user's. Then ``core.compare.compare`` generates 48 greedy new
tokens for base + both adapters, sequentially (mixed=False: one generate per
variant) and in one mixed batch, alternating, several repetitions; medians.

Last line (JSON): {"variants": 3, "sequential_s", "mixed_s", "ratio": mixed/sequential,
"identical": bool, ...}. ``identical``: every repetition's mixed outputs equal the
sequential ones token for token.

    .venv/bin/python benchmarks/bench_compare.py [--reps 5] [--tokens 48] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def make_adapters(session, folder: Path, count: int = 2, r: int = 4) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(session.model, config)
        with torch.no_grad():  # random B at full scale wrecks the text; keep the adapters plausible
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        path = folder / f"adapter{i + 1}"
        peft_model.save_pretrained(str(path))
        session.model = peft_model.unload()  # back to the plain base for the next one
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    import torch

    from lora_studio.core import compare as comparison
    from lora_studio.core.demo import model as demo
    from lora_studio.core.generation.generate import GenerationSettings
    from lora_studio.core.model.loading import offline_environment
    from lora_studio.core.session import Session

    offline_environment()
    if args.threads:
        torch.set_num_threads(args.threads)
    session = Session()
    t0 = time.perf_counter()
    session.load(demo.ensure_demo_model(), dtype="float32", device_map=args.device)
    say(f"loaded demo in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(make_adapters(session, Path(tmp))):
            session.attach(path, f"adapter{i + 1}")
    variants = comparison.session_variants(session)
    settings = GenerationSettings(max_new_tokens=args.tokens)

    def run(mixed: bool):
        t = time.perf_counter()
        result = comparison.compare(session, variants, PROMPT, settings, mixed=mixed, score=False)
        elapsed = time.perf_counter() - t
        assert result.mixed_batch == mixed, result.fallback_reason
        return elapsed, [o.token_ids for o in result.prompts[0].outputs]

    run(False), run(True)  # warm-up: first-call allocations, MKL/oneDNN kernel selection
    seq_times, mixed_times, identical = [], [], True
    for rep in range(args.reps):
        s, seq_ids = run(False)
        m, mixed_ids = run(True)
        identical &= seq_ids == mixed_ids
        seq_times.append(s)
        mixed_times.append(m)
        say(f"rep {rep + 1}: sequential {s:.2f}s  mixed {m:.2f}s  ratio {m / s:.2f}  identical {seq_ids == mixed_ids}")
    lengths = [len(ids) for ids in seq_ids]
    seq_s, mixed_s = statistics.median(seq_times), statistics.median(mixed_times)
    print(
        json.dumps(
            {
                "variants": len(variants),
                "sequential_s": round(seq_s, 3),
                "mixed_s": round(mixed_s, 3),
                "ratio": round(mixed_s / seq_s, 3),
                "identical": identical,
                # robust to a shared machine: each repetition's own ratio (adjacent runs), and best-of times
                "paired_ratio_median": round(
                    statistics.median(m / s for m, s in zip(mixed_times, seq_times, strict=True)), 3
                ),
                "best_ratio": round(min(mixed_times) / min(seq_times), 3),
                "new_tokens": lengths,
                "reps": args.reps,
                "device": args.device,
                "threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
