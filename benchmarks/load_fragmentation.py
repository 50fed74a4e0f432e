"""How much resident memory a process keeps for each model load it has freed again (the soak's remaining growth),
with Python's small-object allocator (pymalloc) and with glibc's (``PYTHONMALLOC=malloc``).

Loads the test Llama (tests/arch_zoo.py, SmolLM2's tokenizer) over and over in one process, in five ways, each in
a fresh child process so the figures do not share a heap:

* ``model``: ``AutoModelForCausalLM.from_pretrained``, deleted;
* ``tokenizer``: ``AutoTokenizer.from_pretrained``, deleted;
* ``tokenizer+model``: the tokenizer, then the model, both deleted;
* ``model+tokenizer``: the model, then the tokenizer, both deleted;
* ``session``: the window's cycle on its job threads: ``Session.load``, attach an r=8 adapter (PEFT), 16 tokens
  generated through it, detach, close.

After each cycle: ``gc.collect()`` and ``malloc_trim`` (as the window does when its jobs end), then the process's
anonymous RSS, Python's small-object arenas (``sys._debugmallocstats``) and the cycle's seconds. The growth a cycle
is least-squares over the cycles after the first three; a cycle's seconds, their median. ``--pythonmalloc`` picks
the allocator of the children (``PYTHONMALLOC``); ``both`` runs every way with each, a child of one beside a child of
the other, ``--runs`` times.

    .venv/bin/python benchmarks/load_fragmentation.py [--cycles 30] [--runs 3] [--pythonmalloc both] --json

The JSON line (last): {"cycles", "runs", "by_allocator": {allocator: {"per_cycle_mib": {way: [a run's growth, ...]},
"arenas": {way: [[first, last], ...]}, "seconds": {way: [a run's median, ...]}}}, and with ``both``:
"malloc_over_pymalloc": {way: {"growth_mib_median": [pymalloc, malloc], "seconds_ratio_median": the median over
the runs of malloc's seconds / pymalloc's}}}.
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
WAYS = ("model", "tokenizer", "tokenizer+model", "model+tokenizer", "session")


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
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_studio.core.system.allocator import limit_malloc_arenas, release_free_memory
    from lora_studio.core.system.memory import read_rss_split

    limit_malloc_arenas()  # as LoRA Studio's processes do
    anon, arenas, seconds = [], [], []
    session = None
    if way == "session":
        from lora_studio.core.model.sources import resolve_source
        from lora_studio.core.session import Session

        session = Session()

    def window_cycle() -> None:  # on a thread of its own, as the window's jobs run
        assert session is not None
        session.load(resolve_source(Path(base)))
        session.attach(Path(base).with_name("adapter"), "a")
        with session.lock, session.variant_selected("a"):
            ids = session.tokenizer("Tell me about the sea.", return_tensors="pt").input_ids
            session.model.generate(ids, max_new_tokens=16, do_sample=False)
        session.delete("a")
        session.close()

    for _ in range(cycles):
        started = time.perf_counter()
        if way == "session":
            worker = threading.Thread(target=window_cycle)
            worker.start()
            worker.join()
        else:
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
        release_free_memory()
        seconds.append(time.perf_counter() - started)
        anon.append(read_rss_split("/proc/self/status")[0] / 2**20)
        arenas.append(small_object_arenas())
    print(json.dumps({"anon": anon, "arenas": arenas, "seconds": seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--pythonmalloc", choices=("pymalloc", "malloc", "both"), default="both")
    parser.add_argument("--runs", type=int, default=3, help="child processes per way and allocator (default 3)")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.cycles)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    import arch_zoo

    allocators = ("pymalloc", "malloc") if args.pythonmalloc == "both" else (args.pythonmalloc,)
    runs: dict[str, dict] = {a: {"per_cycle_mib": {}, "arenas": {}, "seconds": {}} for a in allocators}
    with tempfile.TemporaryDirectory(prefix="load-fragmentation-") as tmp:
        base = arch_zoo.make_family(Path(tmp) / "llama", "llama", tie_word_embeddings=False)
        arch_zoo.make_family_adapter(Path(tmp) / "adapter", base, r=8)
        for way in WAYS:
            for _ in range(args.runs):
                for allocator in allocators:  # side by side, so that both see the same machine
                    out = subprocess.run(
                        [sys.executable, __file__, "--cycles", str(args.cycles), "--child", way, str(base)],
                        env=dict(os.environ, PYTHONMALLOC=allocator),
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    record = json.loads(out.stdout.strip().splitlines()[-1])
                    run = runs[allocator]
                    run["per_cycle_mib"].setdefault(way, []).append(round(slope(record["anon"][3:]), 3))
                    run["arenas"].setdefault(way, []).append([record["arenas"][3], record["arenas"][-1]])
                    run["seconds"].setdefault(way, []).append(round(statistics.median(record["seconds"][3:]), 3))
                    print(
                        f"{allocator} {way}: {run['per_cycle_mib'][way][-1]:+.3f} MiB a cycle, arenas"
                        f" {run['arenas'][way][-1]}, median seconds a cycle {run['seconds'][way][-1]}",
                        file=sys.stderr,
                    )
    result: dict = {"cycles": args.cycles, "runs": args.runs, "by_allocator": runs}
    if len(allocators) == 2:
        result["malloc_over_pymalloc"] = {
            way: {
                "growth_mib_median": [statistics.median(runs[a]["per_cycle_mib"][way]) for a in allocators],
                "seconds_ratio_median": round(
                    statistics.median(
                        m / p
                        for p, m in zip(runs["pymalloc"]["seconds"][way], runs["malloc"]["seconds"][way], strict=True)
                    ),
                    3,
                ),
            }
            for way in WAYS
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
