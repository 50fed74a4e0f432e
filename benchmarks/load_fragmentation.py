"""How much resident memory a process keeps for each model load it has freed again (the soak's remaining growth).

Loads the test Llama (tests/arch_zoo.py, SmolLM2's tokenizer) over and over in one process, in three ways, each in
a fresh child process so the figures do not share a heap:

* ``model``: ``AutoModelForCausalLM.from_pretrained``, deleted;
* ``tokenizer``: ``AutoTokenizer.from_pretrained``, deleted;
* ``tokenizer+model``: the tokenizer, then the model, both deleted;
* ``model+tokenizer``: the model, then the tokenizer, both deleted.

After each load: ``gc.collect()``, then the process's anonymous RSS and Python's small-object arenas
(``sys._debugmallocstats``). The growth a cycle is least-squares over the cycles after the first three.
``--pythonmalloc malloc`` runs the children with Python's small-object allocator off (``PYTHONMALLOC``).

    .venv/bin/python benchmarks/load_fragmentation.py [--cycles 30] [--pythonmalloc malloc] --json

The JSON line (last): {"cycles", "pythonmalloc", "per_cycle_mib": {way: growth}, "arenas": {way: [first, last]}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WAYS = ("model", "tokenizer", "tokenizer+model", "model+tokenizer")


def slope(ys: list[float]) -> float:
    xs = list(range(len(ys)))
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def small_object_arenas() -> int:
    """Python's small-object arenas in use (``sys._debugmallocstats`` writes to the C stderr)."""
    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    text = os.read(read, 1 << 20).decode(errors="replace")
    os.close(read)
    found = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    return int(found.group(1).replace(",", "")) if found else -1


def child(way: str, base: str, cycles: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_studio.core.system.allocator import limit_malloc_arenas
    from lora_studio.core.system.memory import read_rss_split

    limit_malloc_arenas()  # as LoRA Studio's processes do
    anon, arenas = [], []
    for _ in range(cycles):
        if way in ("tokenizer", "tokenizer+model"):
            tokenizer = AutoTokenizer.from_pretrained(base)
        if way != "tokenizer":
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if way == "model+tokenizer":
            tokenizer = AutoTokenizer.from_pretrained(base)
        if way != "tokenizer":
            del model
        if way != "model":
            del tokenizer
        gc.collect()
        anon.append(read_rss_split("/proc/self/status")[0] / 2**20)
        arenas.append(small_object_arenas())
    print(json.dumps({"anon": anon, "arenas": arenas}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--pythonmalloc", choices=("pymalloc", "malloc"), default="pymalloc")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.cycles)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    import arch_zoo

    per_cycle, arenas = {}, {}
    with tempfile.TemporaryDirectory(prefix="load-fragmentation-") as tmp:
        base = str(arch_zoo.make_family(Path(tmp) / "llama", "llama", tie_word_embeddings=False))
        env = dict(os.environ, PYTHONMALLOC=args.pythonmalloc)
        for way in WAYS:
            out = subprocess.run(
                [sys.executable, __file__, "--cycles", str(args.cycles), "--child", way, base],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            per_cycle[way] = round(slope(record["anon"][3:]), 3)
            arenas[way] = [record["arenas"][3], record["arenas"][-1]]
            print(f"{way}: {per_cycle[way]:+.3f} MiB a cycle, arenas {arenas[way]}", file=sys.stderr)
    print(
        json.dumps(
            {"cycles": args.cycles, "pythonmalloc": args.pythonmalloc, "per_cycle_mib": per_cycle, "arenas": arenas}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
