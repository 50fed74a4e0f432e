"""Does the window survive a working day? Drive the real window for a given time, cycle after cycle:

    load base -> attach adapter -> inspect it -> Try it -> compare (base vs adapter) -> a chat turn -> the adapter's
    scale (the comparison runs again) -> evaluate on a small data file -> reduce the adapter (measured, attached)
    -> merge -> GGUF export (q8_0, checked in llama.cpp when it is installed) -> detach -> unload all

with an idle pause in every cycle (the memory chart keeps drawing then, as on a desk). Every step goes through the
panels' own methods and the window's job runner, exactly as the buttons do.

The window runs in a child process, so a hard abort (a binding bug that frees ``None``, a segfault) is counted as a
crash instead of killing the soak. The child prints one JSON line per cycle; the parent prints one JSON line last:

    {"minutes", "cycles", "crashes", "rss_growth_pct_per_cycle", "objects_growth_per_cycle",
     "none_refcount_per_min", "passed", ...}

Passes when nothing crashed, at least one cycle ran, and RSS grows by less than 1 % per cycle after the first three.

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
from pathlib import Path

RSS_GROWTH_LIMIT_PCT = 1.0
WARMUP_CYCLES = 3


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# -- the child: the window ---------------------------------------------------------------------------------------------
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

    offline_environment()
    tmp_dir = tempfile.TemporaryDirectory(prefix="soak-")
    tmp = Path(tmp_dir.name)
    model, adapter, what = pick_model(args.tiny, tmp)

    app = QApplication.instance() or QApplication([])
    from lora_studio.gui.base.settings import StudioSettings
    from lora_studio.gui.window.main_window import MainWindow

    window = MainWindow(settings=StudioSettings(tmp / "window.ini"))
    window.resize(1280, 720)
    window.show()
    proc = psutil.Process()

    def pump(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        loop = QEventLoop()
        while time.monotonic() < deadline:
            QTimer.singleShot(20, loop.quit)
            loop.exec()

    def wait_for(cond, what_for: str, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        loop = QEventLoop()
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what_for}")
            QTimer.singleShot(10, loop.quit)
            loop.exec()

    def attached(name: str) -> bool:
        return any(a[0] == name for a in window.session.state().adapters)

    def step(name: str, start) -> None:
        job = start()
        if job is None:
            raise RuntimeError(f"{name} did not start: {window.job_status.label.text()}")
        wait_for(window.runner.is_idle, name)
        if job.state != "finished":
            raise RuntimeError(f"{name} ended {job.state}: {window.job_status.label.text()}")

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
        rp.cut.out_edit.setText(str(tmp / f"reduced-{cycle}"))
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
        trained = tmp / f"trained-{cycle}"
        tp.files.out_edit.setText(str(trained))
        tp.form.max_steps.setValue(2)
        wait_for(lambda: tp.data_preview.memory is not None and window.runner.is_idle(), "the training estimate")
        step("train", tp.start)
        wait_for(lambda run=trained.name: attached(run) and window.runner.is_idle(), "the trained adapter attached")
        step("detach", lambda name=name: ap.detach(name))
        step("attach again", lambda: window.attach_adapter(adapter))
        step("unload all", ap.unload_all)
        shutil.rmtree(tmp / f"reduced-{cycle}", ignore_errors=True)
        shutil.rmtree(trained, ignore_errors=True)
        shutil.rmtree(tmp / f"trained-{cycle}.checkpoints", ignore_errors=True)
        if len(unload_asked) != cycle:
            raise RuntimeError("Unload all did not ask to confirm")
        pump(args.idle_s)  # idle: the memory chart keeps sampling and repainting
        gc.collect()
        print(
            json.dumps(
                {
                    "event": "cycle",
                    "cycle": cycle,
                    "seconds": round(time.monotonic() - t0, 2),
                    "elapsed_min": round((time.monotonic() - started) / 60, 3),
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "objects": len(gc.get_objects()),
                    "refcount_none": sys.getrefcount(None),
                    "refcount_true": sys.getrefcount(True),
                    "refcount_false": sys.getrefcount(False),
                }
            ),
            flush=True,
        )
    window.shutdown()
    window.close()
    tmp_dir.cleanup()
    return 0


# -- the parent: run the child, judge it -------------------------------------------------------------------------------
def summarise(cycles: list[dict], returncode: int, stderr_tail: str, minutes: float, model: str) -> dict:
    after = cycles[WARMUP_CYCLES:] if len(cycles) > WARMUP_CYCLES + 1 else cycles[1:]
    xs = [float(c["cycle"]) for c in after]
    rss = [c["rss_mib"] for c in after]
    rss_slope = slope(xs, rss)
    rss_pct = 100.0 * rss_slope / statistics.fmean(rss) if rss else 0.0
    objects_slope = slope(xs, [float(c["objects"]) for c in after])
    minutes_x = [c["elapsed_min"] for c in cycles]
    none_per_min = slope(minutes_x, [float(c["refcount_none"]) for c in cycles])
    crashed = returncode != 0
    result = {
        "minutes": minutes,
        "model": model,
        "cycles": len(cycles),
        "crashes": int(crashed),
        "exit": returncode,
        "cycle_s_median": round(statistics.median(c["seconds"] for c in cycles), 2) if cycles else None,
        "rss_mib_first": cycles[0]["rss_mib"] if cycles else None,
        "rss_mib_last": cycles[-1]["rss_mib"] if cycles else None,
        "rss_growth_mib_per_cycle": round(rss_slope, 3),
        "rss_growth_pct_per_cycle": round(rss_pct, 3),
        "objects_growth_per_cycle": round(objects_slope, 1),
        "refcount_none_first": cycles[0]["refcount_none"] if cycles else None,
        "refcount_none_last": cycles[-1]["refcount_none"] if cycles else None,
        "none_refcount_per_min": round(none_per_min, 1),
        "targets": {"crashes": 0, "rss_growth_pct_per_cycle": RSS_GROWTH_LIMIT_PCT, "after_cycles": WARMUP_CYCLES},
    }
    result["passed"] = bool(not crashed and cycles and rss_pct < RSS_GROWTH_LIMIT_PCT)
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--minutes",
        str(args.minutes),
        "--tokens",
        str(args.tokens),
        "--idle-s",
        str(args.idle_s),
    ] + (["--tiny"] if args.tiny else [])
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
                sys.stderr.write(
                    f"soak: cycle {record['cycle']} {record['seconds']} s, RSS {record['rss_mib']} MiB, "
                    f"None refs {record['refcount_none']}\n"
                )
        returncode = proc.wait()
        err.seek(0)
        stderr_tail = err.read()[-4000:]
    print(json.dumps(summarise(cycles, returncode, stderr_tail, args.minutes, model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
