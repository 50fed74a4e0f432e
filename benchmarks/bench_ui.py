"""Does the window stay responsive? Drive the real window offscreen through load -> attach -> generate -> merge ->
train (the Train tab, its live curves drawing) while a 5 ms QTimer measures how late the event loop runs (a "stall").

Model: the demo (SmolLM2-135M-Instruct, float32, CPU) with its shipped 'pirate' adapter when both are on
this machine, else a small random Llama + adapter built here (tests/factories.py). Every step runs through
the window's own JobRunner, exactly as clicking the buttons does; the merge is core.merge.merge_and_save
(in-memory engine on the session, verified) in a runner job, like the Merge panel will run it.

Startup is measured separately: `lora-studio` in a fresh subprocess, process start -> first paint of the
window (median of 3 runs).

Last line (JSON): {"max_stall_ms", "p99_stall_ms", "startup_s", ...}. Targets: max stall < 50 ms, startup < 2 s.

    .venv/bin/python benchmarks/bench_ui.py [--model PATH --adapter PATH] [--tokens 32] [--runs N] [--trace [MS]]

--runs N: the whole benchmark N times, each in a fresh process; the JSON line then holds every run's max stall, the
median, the worst and how many runs met the target (the target must hold in every run, not in the best one).

--trace: a watchdog thread notices when the GUI thread's tick is more than 50 (or MS) ms late and prints (stderr) the
Python stack of every thread at that moment: what the GUI thread is doing, and which worker held the GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parent.parent
TICK_MS = 5


def measure_startup(runs: int = 3) -> list[float]:
    exe = Path(sys.executable).with_name("lora-studio")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_studio"]
    times = []
    with tempfile.TemporaryDirectory() as data:
        env = dict(os.environ, LORA_STUDIO_STARTUP_REPORT="1", LORA_STUDIO_DATA_DIR=data, QT_QPA_PLATFORM="offscreen")
        for _ in range(runs):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("window-shown")), None)
            if line is None:
                raise SystemExit(f"startup run failed: {out.stderr[-500:]}")
            times.append(float(line.split()[1]))
    return times


class StallTracer:
    """A daemon thread that records every thread's Python stack while the GUI thread's tick is late.

    The GUI tick stores its time in ``last``; every 5 ms the watchdog compares. While the tick is more than
    ``limit_ms`` late it captures all stacks (at most every 20 ms); when the tick comes back it prints the
    stall's length and the distinct stacks seen. The watchdog needs the GIL too: a gap between its own
    wake-ups means some thread held the GIL (a C call that does not release it) - it is printed as
    "watchdog starved", and the stacks right after show whose Python frame made that call.
    """

    def __init__(self, limit_ms: float = 50.0) -> None:
        import threading

        self.limit = limit_ms / 1000
        self.last = time.monotonic()
        self.step = ["idle"]
        self.reports: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-tracer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _stacks(self, own: int, main: int) -> list[str]:
        import threading
        import traceback

        names = {t.ident: t.name for t in threading.enumerate()}
        out = []
        for ident, frame in sys._current_frames().items():
            if ident == own:
                continue
            stack = traceback.extract_stack(frame)[-7:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))
            if "threading.py" in where.split(" <- ")[0] or "queue.py" in where.split(" <- ")[0]:
                continue  # idle threads
            out.append(f"[{'GUI' if ident == main else names.get(ident, ident)}] {where}")
        return out

    def _run(self) -> None:
        import threading

        main, own = threading.main_thread().ident, threading.get_ident()
        stall_for = None  # the tick time whose lateness is being recorded
        seen: list[str] = []
        last_capture = prev_wake = time.monotonic()
        while not self._stop.wait(0.005):
            woke = time.monotonic()
            starved = woke - prev_wake
            prev_wake = woke
            late = woke - self.last
            if stall_for is not None and self.last != stall_for:  # the tick is back: report the stall
                length = (self.last - stall_for) * 1000
                lines = [f"--- stall: GUI tick {length:.0f} ms apart during {self.step[0]} ---", *seen]
                self.reports.append("\n".join(lines))
                sys.stderr.write(self.reports[-1] + "\n")
                stall_for, seen = None, []
            if late < self.limit:
                continue
            if stall_for is None:
                stall_for = self.last
            if starved > 0.03:
                seen.append(f"  (watchdog starved {starved * 1000:.0f} ms: the GIL was held, or no CPU)")
            if woke - last_capture >= 0.02 or starved > 0.03:
                last_capture = woke
                for line in self._stacks(own, main):
                    entry = f"  +{(woke - stall_for) * 1000:.0f}ms {line}"
                    seen.append(entry)


def pick_model(args, tmp: Path) -> tuple[str, str, str]:
    if args.model:
        return args.model, args.adapter, "given"
    from bench_models import demo_or_random

    return demo_or_random(tmp, layers=4, hidden=256, heads=8, kv_heads=4)


def run_many(runs: int) -> int:
    """The benchmark ``runs`` times in fresh processes: every run's figures, their medians and spread."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--runs")]
    if "--runs" in sys.argv:  # "--runs N" as two words
        i = sys.argv.index("--runs")
        argv = [a for j, a in enumerate(sys.argv[1:], start=1) if j not in (i, i + 1)]
    results = []
    for n in range(runs):
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=1800)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"run {n + 1} failed: {out.stderr[-800:]}")
        results.append(json.loads(lines[-1]))
        sys.stderr.write(f"run {n + 1}/{runs}: max stall {results[-1]['max_stall_ms']} ms\n")
    stalls = [r["max_stall_ms"] for r in results]
    target = results[0]["targets"]["max_stall_ms"]
    summary = {
        "runs": runs,
        "max_stall_ms_runs": stalls,
        "max_stall_ms_median": statistics.median(stalls),
        "max_stall_ms_worst": max(stalls),
        "runs_under_target": sum(s < target for s in stalls),
        "p99_stall_ms_median": statistics.median(r["p99_stall_ms"] for r in results),
        "startup_s_median": statistics.median(r["startup_s"] for r in results),
        "startup_s_worst": max(r["startup_s"] for r in results),
        "stalls_over_50ms_runs": [r["stalls_over_50ms"] for r in results],
        "train_max_stall_ms_runs": [r["max_stall_ms_by_step"].get("train") for r in results],
        "model": results[0]["model"],
        "targets": results[0]["targets"],
    }
    print(json.dumps(summary))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=6, help="optimiser steps of the training step (default 6)")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    parser.add_argument(
        "--trace",
        type=float,
        nargs="?",
        const=50.0,
        metavar="MS",
        help="print every thread's stack when the GUI tick is more than MS (default 50) ms late",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the startup measurement")
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="override sys.setswitchinterval after the window is built (for comparisons; the window sets its own)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the whole benchmark this many times, each in a fresh process, and report the distribution",
    )
    args = parser.parse_args()
    if bool(args.model) != bool(args.adapter):
        parser.error("--model and --adapter go together")
    if args.runs > 1:
        return run_many(args.runs)

    startup = [0.0] if args.no_startup else measure_startup()
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    model, adapter, what = pick_model(args, tmp)

    from PySide6.QtCore import QElapsedTimer, QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from lora_studio.core.model.loading import offline_environment

    offline_environment()
    os.environ["LORA_STUDIO_DATA_DIR"] = str(tmp / "data")
    _app = QApplication.instance() or QApplication([])  # held: the window needs a living application
    from lora_studio.gui.window.main_window import MainWindow

    window = MainWindow()
    window.resize(1280, 820)
    window.show()

    def wait_for(cond, timeout_s=600.0):
        deadline = time.monotonic() + timeout_s
        loop = QEventLoop()
        while not cond():
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            QTimer.singleShot(10, loop.quit)
            loop.exec()

    wait_for(
        lambda: (
            window.memory_panel.plot is not None
            and window.adapter_panel.inspector.chart is not None
            and window.runner.is_idle()
        )
    )
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    gaps: list[float] = []
    # (step, ms, the status line then, the GUI thread's own CPU ms in that gap, seconds into the step) of each stall
    # over the target: CPU ms near the stall's length means the GUI thread was busy, far below it that it waited
    big: list[tuple[str, float, str, float, float]] = []
    by_step: dict[str, float] = {}  # the largest stall in each step
    current = ["idle"]
    step_started = [time.monotonic()]
    clock = QElapsedTimer()
    clock.start()
    last = [clock.nsecsElapsed()]
    last_cpu = [time.thread_time()]

    tracer = StallTracer(args.trace) if args.trace else None

    def tick():
        if tracer is not None:
            tracer.last = time.monotonic()
        now = clock.nsecsElapsed()
        cpu = time.thread_time()
        gap = (now - last[0]) / 1e6
        gaps.append(gap)
        if gap - TICK_MS > 50:
            into = round(time.monotonic() - step_started[0], 2)
            status = window.job_status.label.text()[:80]
            big.append((current[0], round(gap - TICK_MS, 1), status, round((cpu - last_cpu[0]) * 1000, 1), into))
        by_step[current[0]] = max(by_step.get(current[0], 0.0), round(gap - TICK_MS, 1))
        last[0] = now
        last_cpu[0] = cpu

    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(tick)
    timer.start()
    if tracer is not None:
        tracer.step = current
        tracer.last = time.monotonic()
        tracer.start()
    steps = {}

    def step(name, start):
        t = time.perf_counter()
        current[0] = name
        step_started[0] = time.monotonic()
        job = start()
        if job is None:
            raise SystemExit(f"{name} did not start: {window.job_status.label.text()}")
        wait_for(window.runner.is_idle)
        if job.state != "finished":
            raise SystemExit(f"{name} {job.state}: {window.job_status.label.text()}")
        steps[name] = round(time.perf_counter() - t, 2)

    step("load", lambda: window.open_base(model))
    step("attach", lambda: window.attach_adapter(adapter))
    window.adapter_panel.select(window.session.state().adapters[0][0])
    wait_for(lambda: window.adapter_panel.inspection is not None)
    window.adapter_panel.try_it.prompt_edit.setText("Tell me about the sea.")
    window.adapter_panel.try_it.max_tokens.setValue(args.tokens)
    step("generate", window.adapter_panel.generate)

    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save

    session = window.session
    name, path, _ = session.state().adapters[0]

    def merge(*, cancel, report):
        return merge_and_save(
            session.source,
            [AdapterSpec(name, Path(path))],
            MergeOptions(out=tmp / "merged", engine="in-memory"),
            session=session,
            cancel=cancel,
            report=report,
        )

    step("merge", lambda: window.runner.submit("merging", merge, on_done=lambda _: window.memory_panel.mark("merged")))

    # training through the Train tab, as its Train button runs it: the live curves draw while the trainer runs
    from lora_studio.core.train import TrainSettings

    train = window.train_panel
    window.tabs.setCurrentWidget(train)
    rows = tmp / "train.jsonl"
    pairs = [("Say hello.", "Hello there."), ("Name a colour.", "Blue."), ("Count to three.", "One, two, three.")]
    rows.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs * 4), "utf-8")
    train.form.set_settings(TrainSettings(r=4, alpha=8.0, max_steps=args.train_steps, batch_size=2, eval_steps=2))
    train.files.data_edit.setText(str(rows))
    train.files.out_edit.setText(str(tmp / "trained"))
    wait_for(lambda: not train.start_reason() and window.runner.is_idle())
    # a user reads the estimate before clicking Train: the tab's first showing and the estimate's line are drawn
    # in that pause (their stalls still count in the whole run's figures, not in the train step's)
    paused = time.monotonic()
    wait_for(lambda: time.monotonic() - paused > 0.5)
    step("train", train.start)
    # attached at the end (the snapshot the panels read: session.state() would wait for the attach job's lock)
    wait_for(lambda: len(window.session_model.state.adapters) == 2 and window.runner.is_idle())
    timer.stop()
    if tracer is not None:
        tracer.stop()
    window.shutdown()
    window.close()
    tmp_dir.cleanup()

    stalls = sorted(max(0.0, g - TICK_MS) for g in gaps[1:])
    p99 = stalls[min(len(stalls) - 1, int(0.99 * len(stalls)))] if stalls else 0.0
    result = {
        "max_stall_ms": round(stalls[-1], 1) if stalls else 0.0,
        "p99_stall_ms": round(p99, 1),
        "startup_s": round(statistics.median(startup), 3),
        "startup_runs_s": [round(s, 3) for s in startup],
        "ticks": len(gaps),
        "steps_s": steps,
        "model": what,
        "switch_interval_s": sys.getswitchinterval(),
        "stalls_over_50ms": big[:20],
        "max_stall_ms_by_step": by_step,
        "targets": {"max_stall_ms": 50, "startup_s": 2.0},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
