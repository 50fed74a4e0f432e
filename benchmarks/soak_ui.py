"""Does the window survive a working day? Drive the real window for a given time, cycle after cycle:

    load base -> attach adapter -> inspect it -> Try it -> compare (base vs adapter) -> a chat turn -> the adapter's
    scale (the comparison runs again) -> evaluate on a small data file -> reduce the adapter (measured, attached)
    -> merge -> GGUF export (q8_0, checked in llama.cpp when it is installed) -> train two steps (its own process,
    the window free beside it; the adapter attaches) -> detach -> attach again -> unload all

with an idle pause in every cycle (the memory chart keeps drawing then, as on a desk). Every step goes through the
panels' own methods and the window's job runner, exactly as the buttons do.

The window runs in a child process, so a hard abort (a binding bug that frees ``None``, a segfault) is counted as a
crash instead of killing the soak. The child prints one JSON line per cycle; the parent prints one JSON line last:

    {"minutes", "cycles", "crashes", "rss_growth_pct_per_cycle", "objects_growth_per_cycle", "top_growing_types",
     "none_held_growth_per_cycle", "none_refs_growth_per_cycle", "rss_mib_projected_8h", "judged_from_cycle",
     "growth_from_cycle_4", "within", "survived", "passed", ...}

After the first three cycles and minutes each cycle also prints the growth so far (least-squares slopes per cycle):
RSS, the objects the collector tracks with the five types that grew most, the references to ``None`` that objects
hold, and ``sys.getrefcount(None)``. Passes when nothing crashed, a cycle ran, and after the warm-up RSS grows by at
most 0.01 % a cycle, tracked objects by at most one a cycle, and the references to ``None`` that objects hold by at
most one a cycle. The warm-up is the first three cycles and three minutes, and the cycles until what the window keeps
on purpose is full: the memory chart's two minutes, the Log dock's lines (``judged_from_cycle``; the same fit from the
fourth cycle is reported beside it as ``growth_from_cycle_4``). ``sys.getrefcount(None)`` is reported, not judged:
PySide6 6.11 adds to it for every Qt object it wraps, and nothing holds those (``none_held``; docs/benchmarks.md).
``--who-holds-none`` also counts the held references by the holder's type. ``--records FILE`` keeps every cycle's
record.

    .venv/bin/python benchmarks/soak_ui.py --minutes 30 [--tiny] [--idle-s 5] [--json]

The platform is the environment's: under Xvfb (DISPLAY set) a real xcb window, else Qt's offscreen platform.
Model: the demo (SmolLM2-135M-Instruct + its pirate adapter) unless --tiny or it is not installed, then a small
random Llama + adapter built here (tests/factories.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

# Growth bounds per cycle after the warm-up, on least-squares slopes over the cycles (issue "A working day"): a
# window open for a day must not keep growing by any of them.
RSS_GROWTH_LIMIT_PCT = 0.01
OBJECTS_GROWTH_LIMIT = 1.0
# References to None that objects hold (none_held); sys.getrefcount(None) is reported beside it, not judged: it
# grows with every Qt object PySide6 6.11 wraps, whether or not anything is kept (none_held's docstring)
NONE_HELD_GROWTH_LIMIT = 1.0
TYPES_KEPT = 400  # the commonest types counted in each cycle's record (a grower is among them)
WARMUP_CYCLES = 3
WARMUP_MIN = 3.0  # the memory chart keeps two minutes of samples: its deque is full after them


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# -- the child: the window ---------------------------------------------------------------------------------------------
def kind_of(o: object) -> str:
    """An object's type name; a function's own name with it (which closure piles up says where)."""
    if isinstance(o, types.FunctionType):
        return f"function {o.__module__}.{o.__qualname__}"
    return type(o).__qualname__


def none_held_by_type(objects: list) -> dict[str, int]:
    """References to ``None`` that the collector's objects hold, by the holder's type (the commonest 40): where a rise
    in ``sys.getrefcount(None)`` is held, if it is held by objects at all and not leaked by a binding."""
    import gc

    held: Counter[str] = Counter()
    for o in objects:
        n = sum(1 for r in gc.get_referents(o) if r is None)
        if n:
            held[type(o).__qualname__] += n
    held["(total)"] = sum(held.values())
    return dict(held.most_common(40))


def none_held(objects: list) -> int:
    """References to ``None`` held by Python objects: the collector's objects, and the tuples and dicts it does not
    track (only atomic values: a pile of them holding ``None`` would not show among the objects) under them. A
    rise of ``sys.getrefcount(None)`` beyond this is held by no object: PySide6 6.11 adds one at each Python-made
    Qt object's first call of each virtual method, and about three at each ``QTimer.singleShot(ms, bound slot)``,
    and never gives them back (``benchmarks/pyside_none_refs.py``). That is a count, not memory."""
    import gc

    seen: set[int] = set()
    held = 0
    for o in objects:
        for r in gc.get_referents(o):
            if r is None:
                held += 1
            elif type(r) in (tuple, dict) and not gc.is_tracked(r) and id(r) not in seen:
                seen.add(id(r))
                held += sum(1 for v in (r.values() if type(r) is dict else r) if v is None)
    return held


def pick_model(tiny: bool, tmp: Path) -> tuple[str, str, str]:
    from bench_models import REPO, demo_or_random

    if not tiny:
        return demo_or_random(tmp, layers=2, hidden=128, heads=4, kv_heads=2)
    # the tests' small Llama with SmolLM2's tokenizer: one llama.cpp's converter takes, so the cycle's export runs
    sys.path.insert(0, str(REPO / "tests"))
    import arch_zoo

    base = arch_zoo.make_family(tmp / "soak-llama", "llama")
    adapter = arch_zoo.make_family_adapter(tmp / "soak-adapter", base, r=8)
    return str(base), str(adapter), "random Llama (SmolLM2's tokenizer) + r=8 adapter"


def child(args: argparse.Namespace) -> int:
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import psutil
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from lora_studio.core.model.loading import offline_environment
    from lora_studio.core.system.allocator import heap_usage, limit_malloc_arenas
    from lora_studio.core.system.memory import read_rss_split

    limit_malloc_arenas()  # as `lora-studio` does first thing
    offline_environment()
    tmp_dir = tempfile.TemporaryDirectory(prefix="soak-")
    tmp = Path(tmp_dir.name)
    model, adapter, what = pick_model(args.tiny, tmp)

    app = QApplication.instance() or QApplication([])
    from lora_studio.gui.base.settings import StudioSettings
    from lora_studio.gui.docks.log import MAX_BLOCKS as LOG_CAP
    from lora_studio.gui.window.main_window import MainWindow

    window = MainWindow(settings=StudioSettings(tmp / "window.ini"))
    window.resize(1280, 720)
    window.show()
    proc = psutil.Process()

    # One loop and one timer for every wait. QTimer.singleShot(ms, loop.quit) (a bound method of a QObject) keeps
    # about three references to None a call in PySide6 6.11: polled every 10 ms, the soak's own waiting was most of
    # the None count it measured.
    loop = QEventLoop()
    tick = QTimer()
    tick.setSingleShot(True)
    tick.timeout.connect(loop.quit)

    def pump(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tick.start(20)
            loop.exec()

    def wait_for(cond, what_for: str, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what_for}")
            tick.start(10)
            loop.exec()

    def attached(name: str) -> bool:
        return any(a[0] == name for a in window.session.state().adapters)

    none_by_step: Counter[str] = Counter()  # the rise of sys.getrefcount(None) over each step, this cycle

    rss_by_step: Counter[str] = Counter()  # the RSS each step added (MiB), this cycle

    def step(name: str, start) -> None:
        refs, rss = sys.getrefcount(None), proc.memory_info().rss
        job = start()
        if job is None:
            raise RuntimeError(f"{name} did not start: {window.job_status.label.text()}")
        wait_for(window.runner.is_idle, name)
        if job.state != "finished":
            raise RuntimeError(f"{name} ended {job.state}: {window.job_status.label.text()}")
        none_by_step[name] += sys.getrefcount(None) - refs
        rss_by_step[name] += (proc.memory_info().rss - rss) / 2**20

    wait_for(lambda: window.memory_panel.plot is not None and window.runner.is_idle(), "the first paint")
    print(json.dumps({"event": "started", "model": what, "platform": app.platformName()}), flush=True)
    merged = tmp / "merged"
    data = tmp / "eval.jsonl"
    rows = [("Say hello.", "Hello there."), ("Name a colour.", "Blue."), ("Count to three.", "One, two, three.")]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows), "utf-8")
    ap, cp, mp = window.adapter_panel, window.compare_panel, window.merge_panel
    ep, rp = window.evaluate_panel, window.reduce_panel
    mp.confirm_overwrite = lambda _path: True
    window.model_panel.confirm_replace_base = lambda _names: True  # "Load another base?" (none are attached then)
    tp = window.train_panel
    unload_asked: list[int] = []  # "Unload all" asks first; the soak answers yes and counts the questions
    ap.confirm_unload = lambda names: unload_asked.append(len(names)) is None
    started = time.monotonic()
    cycle = 0
    while time.monotonic() - started < args.minutes * 60 or cycle == 0:
        cycle += 1
        t0 = time.monotonic()
        step("load", lambda: window.open_base(model))
        step("attach", lambda: window.attach_adapter(adapter))
        name = window.session.state().adapters[0][0]
        ap.select(name)
        wait_for(
            lambda name=name: ap.inspection is not None and ap.inspection.name == name and window.runner.is_idle(),
            "inspect",
        )
        ap.try_it.prompt_edit.setText("Tell me about the sea.")
        ap.try_it.max_tokens.setValue(args.tokens)
        step("try it", ap.generate)
        cp.set_ticked([cp.base_name(), name])
        cp.prompt_box.edit.setPlainText("Write one sentence about ships.")
        cp.decoding.max_tokens.setValue(args.tokens)
        step("compare", cp.run)
        cp.set_chat_mode(True)
        step("chat", lambda: cp.send_chat("Hello! Who are you?"))
        cp.chat.new_chat_requested.emit()
        cp.set_chat_mode(False)
        step("scale", lambda name=name: cp.set_adapter_scale(name, 0.5))
        wait_for(window.runner.is_idle, "the comparison at scale 0.5")
        ep.set_data_files([data])
        step("evaluate", ep.run)
        wait_for(lambda name=name: rp.plan is not None and rp.plan.name == name and window.runner.is_idle(), "the plan")
        rp.cut.rank_spin.setValue(1)
        rp.set_data_files([data])
        # the same names each cycle (the folders go at its end): a day's adapters have a few names, and a new name
        # a cycle would only fill Python's regex cache (PEFT matches keys against each adapter's name; 512 at most)
        rp.cut.out_edit.setText(str(tmp / "reduced"))
        step("reduce", rp.run)
        for row in mp.rows:
            row.check.setChecked(row.name == name)
        mp.output.out_edit.setText(str(merged))
        wait_for(lambda: not mp.start_reason(), "the merge plan")
        step("merge", mp.start_merge)
        fmt = mp.output.format_combo
        fmt.setCurrentIndex(fmt.findData("gguf"))
        mp.output.out_edit.setText(str(tmp / "export.q8_0.gguf"))
        wait_for(lambda: not mp.start_reason(), "the export plan")
        step("export", mp.start_merge)
        fmt.setCurrentIndex(fmt.findData("hf"))
        # a short training run in its own process, the window free beside it; its adapter attaches at the end
        tp.files.data_edit.setText(str(data))
        trained = tmp / "trained"
        tp.files.out_edit.setText(str(trained))
        tp.form.max_steps.setValue(2)
        wait_for(lambda: tp.data_preview.memory is not None and window.runner.is_idle(), "the training estimate")
        step("train", tp.start)
        wait_for(lambda run=trained.name: attached(run) and window.runner.is_idle(), "the trained adapter attached")
        step("detach", lambda name=name: ap.detach(name))
        step("attach again", lambda: window.attach_adapter(adapter))
        step("unload all", ap.unload_all)
        shutil.rmtree(tmp / "reduced", ignore_errors=True)
        shutil.rmtree(trained, ignore_errors=True)
        shutil.rmtree(tmp / "trained.checkpoints", ignore_errors=True)
        if len(unload_asked) != cycle:
            raise RuntimeError("Unload all did not ask to confirm")
        refs = sys.getrefcount(None)
        pump(args.idle_s)  # idle: the memory chart keeps sampling and repainting
        none_by_step["idle"] += sys.getrefcount(None) - refs
        gc.collect()
        objects = gc.get_objects()
        by_type = Counter(kind_of(o) for o in objects)
        none_holders = none_held_by_type(objects) if args.who_holds_none else {}
        held = none_held(objects)
        anon_file = read_rss_split()
        print(
            json.dumps(
                {
                    "event": "cycle",
                    "cycle": cycle,
                    "seconds": round(time.monotonic() - t0, 2),
                    "elapsed_min": round((time.monotonic() - started) / 60, 3),
                    "rss_mib": round(proc.memory_info().rss / 2**20, 2),
                    "python_allocator": os.environ.get("PYTHONMALLOC", "pymalloc"),
                    "objects": len(objects),
                    # the commonest types, and every function made three times or more (a closure made again in
                    # each cycle and kept is a function of one name whose count follows the cycles)
                    "by_type": dict(by_type.most_common(TYPES_KEPT))
                    | {k: n for k, n in by_type.items() if n >= 3 and k.startswith("function ")},
                    "refcount_none": sys.getrefcount(None),
                    "none_held": held,
                    "refcount_true": sys.getrefcount(True),
                    "refcount_false": sys.getrefcount(False),
                    "none_held_by": none_holders,
                    "none_by_step": dict(none_by_step),
                    "rss_mib_by_step": {name: round(mib, 2) for name, mib in rss_by_step.items()},
                    # where the RSS is: anonymous or file-backed pages; glibc's heap in use, held free, mmapped
                    "rss_split_mib": dict(zip(("anon", "file"), (round(b / 2**20, 2) for b in anon_file), strict=True)),
                    "heap_mib": {k: round(b / 2**20, 2) for k, b in (heap_usage() or {}).items()},
                    "log_lines": window.log_panel.text.document().blockCount(),
                    "log_cap": LOG_CAP,
                }
            ),
            flush=True,
        )
        del objects
        none_by_step.clear()
        rss_by_step.clear()
    window.shutdown()
    window.close()
    tmp_dir.cleanup()
    return 0


# -- the parent: run the child, judge it -------------------------------------------------------------------------------
def type_growth(cycles: list[dict]) -> list[tuple[str, float]]:
    """Each counted type's least-squares growth per cycle over ``cycles``, largest first (a type missing from a
    cycle's record counted 0 there)."""
    names = {name for c in cycles for name in c.get("by_type", {})}
    xs = [float(c["cycle"]) for c in cycles]
    rates = [(name, slope(xs, [float(c.get("by_type", {}).get(name, 0)) for c in cycles])) for name in names]
    return sorted(rates, key=lambda item: -item[1])


def growth(cycles: list[dict]) -> dict:
    """Growth per cycle over ``cycles`` (least-squares slopes): RSS in MiB and in % of its mean, the objects the
    collector tracks, the five types that grew most, ``sys.getrefcount(None)``."""
    xs = [float(c["cycle"]) for c in cycles]
    rss = [c["rss_mib"] for c in cycles]
    rss_slope = slope(xs, rss)
    return {
        "rss_mib": rss_slope,
        "rss_pct": 100.0 * rss_slope / statistics.fmean(rss) if rss else 0.0,
        "objects": slope(xs, [float(c["objects"]) for c in cycles]),
        "top_types": type_growth(cycles)[:5],
        "none_refs": slope(xs, [float(c["refcount_none"]) for c in cycles]),
        "none_held": slope(xs, [float(c.get("none_held", 0)) for c in cycles]),
    }


def growth_line(cycles: list[dict]) -> str:
    """The growth so far, after the first three cycles and minutes (the Log dock may still be filling), as one line
    for the console."""
    g = growth(settled(cycles, log_full=False))
    top = ", ".join(f"{name} {rate:+.1f}" for name, rate in g["top_types"] if rate > 0) or "none"
    return (
        f"growth per cycle: RSS {g['rss_pct']:+.3f} % ({g['rss_mib']:+.2f} MiB), objects {g['objects']:+.1f} "
        f"(most: {top}), None held {g['none_held']:+.1f} (references {g['none_refs']:+.0f})"
    )


def settled(cycles: list[dict], *, or_all: bool = True, log_full: bool = True) -> list[dict]:
    """The cycles after the warm-up: the first three, the first minutes while the memory chart's history (two
    minutes of samples, capped) fills, and (``log_full``) those until the Log dock holds as many lines as it keeps
    (gui/docks/log.MAX_BLOCKS: ~36 lines a cycle, ~7 KiB each, full after ~28 cycles). When too few are left to fit
    a slope, all but the first (``or_all``) or none."""
    after = [c for c in cycles[WARMUP_CYCLES:] if c["elapsed_min"] >= WARMUP_MIN]
    if log_full and after and "log_lines" in after[0]:
        cap = after[0].get("log_cap") or max(c["log_lines"] for c in cycles)  # records made before log_cap: the most
        full = next((i for i, c in enumerate(cycles) if c["log_lines"] >= cap), len(cycles))
        after = [c for c in after if c["cycle"] > cycles[full]["cycle"]] if full < len(cycles) else []
    return after if len(after) > 1 or not or_all else cycles[1:]


def summarise(cycles: list[dict], returncode: int, stderr_tail: str, minutes: float, model: str) -> dict:
    after = settled(cycles)
    g = growth(after)
    minutes_x = [c["elapsed_min"] for c in cycles]
    none_per_min = slope(minutes_x, [float(c["refcount_none"]) for c in cycles])
    crashed = returncode != 0
    within = {
        "rss": g["rss_pct"] <= RSS_GROWTH_LIMIT_PCT,
        "objects": g["objects"] <= OBJECTS_GROWTH_LIMIT,
        "none_held": g["none_held"] <= NONE_HELD_GROWTH_LIMIT,
    }
    result = {
        "minutes": minutes,
        "model": model,
        "cycles": len(cycles),
        "crashes": int(crashed),
        "exit": returncode,
        "python_allocator": cycles[-1].get("python_allocator") if cycles else None,
        "cycle_s_median": round(statistics.median(c["seconds"] for c in cycles), 2) if cycles else None,
        "rss_mib_first": cycles[0]["rss_mib"] if cycles else None,
        "rss_mib_last": cycles[-1]["rss_mib"] if cycles else None,
        "rss_growth_mib_per_cycle": round(g["rss_mib"], 3),
        "rss_growth_pct_per_cycle": round(g["rss_pct"], 4),
        "objects_growth_per_cycle": round(g["objects"], 2),
        "top_growing_types": {name: round(rate, 2) for name, rate in g["top_types"]},
        "refcount_none_first": cycles[0]["refcount_none"] if cycles else None,
        "refcount_none_last": cycles[-1]["refcount_none"] if cycles else None,
        "none_held_growth_per_cycle": round(g["none_held"], 2),
        "none_refs_growth_per_cycle": round(g["none_refs"], 1),
        "none_refcount_per_min": round(none_per_min, 1),
        "rss_mib_projected_8h": round(g["rss_mib"] * 8 * 60 / (statistics.median(c["seconds"] for c in after) / 60), 1)
        if after
        else None,
        "targets": {
            "crashes": 0,
            "rss_growth_pct_per_cycle": RSS_GROWTH_LIMIT_PCT,
            "objects_growth_per_cycle": OBJECTS_GROWTH_LIMIT,
            "none_held_growth_per_cycle": NONE_HELD_GROWTH_LIMIT,
            "after_cycles": WARMUP_CYCLES,
            "after_minutes": WARMUP_MIN,
        },
        "within": within,
        "survived": bool(not crashed and cycles),
    }
    # the same fit from the fourth cycle, the Log dock still filling: reported beside, not judged
    filling = growth(settled(cycles, log_full=False))
    result["growth_from_cycle_4"] = {
        "rss_pct": round(filling["rss_pct"], 4),
        "rss_mib": round(filling["rss_mib"], 3),
        "objects": round(filling["objects"], 2),
        "none_held": round(filling["none_held"], 2),
    }
    result["judged_from_cycle"] = after[0]["cycle"] if after else None
    result["passed"] = bool(result["survived"] and all(within.values()))
    if crashed:
        result["error"] = stderr_tail[-1500:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to keep cycling (default 30)")
    parser.add_argument("--tiny", action="store_true", help="a small random model instead of the demo")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens for Try it and Compare")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle seconds at the end of each cycle")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument(
        "--who-holds-none", action="store_true", help="count the references to None each type of object holds"
    )
    parser.add_argument("--records", type=Path, help="also write each cycle's record (a JSON line) to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    cmd = (
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--minutes",
            str(args.minutes),
            "--tokens",
            str(args.tokens),
            "--idle-s",
            str(args.idle_s),
        ]
        + (["--tiny"] if args.tiny else [])
        + (["--who-holds-none"] if args.who_holds_none else [])
    )
    cycles: list[dict] = []
    model = "?"
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "started":
                model = record["model"]
                sys.stderr.write(f"soak: {model} on {record['platform']}\n")
            elif record.get("event") == "cycle":
                cycles.append(record)
                if args.records is not None:
                    with args.records.open("a", encoding="utf-8") as kept:
                        kept.write(line)
                sys.stderr.write(
                    f"soak: cycle {record['cycle']} {record['seconds']} s, RSS {record['rss_mib']} MiB, "
                    f"None refs {record['refcount_none']}\n"
                )
                if len(settled(cycles, or_all=False, log_full=False)) > 1:
                    sys.stderr.write(f"soak: {growth_line(cycles)}\n")
        returncode = proc.wait()
        err.seek(0)
        stderr_tail = err.read()[-4000:]
    print(json.dumps(summarise(cycles, returncode, stderr_tail, args.minutes, model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
