"""A working day in small: the soak's core actions, cycle after cycle, leave no Python objects behind.

``benchmarks/soak_ui.py`` runs the whole cycle for hours (training, export, chat included); this runs its core —
load, attach, Try it, compare, a chat turn, evaluate, detach, unload — a few times and checks that the objects the
collector tracks, counted by type, come back to the same numbers.
"""

from __future__ import annotations

import gc
import json
from collections import Counter

from window_helpers import idle, make_window

WARM_CYCLES = 2  # caches fill (imports, tokenizers' regexes, Qt's pixmaps) in the first cycles
MEASURED_CYCLES = 3
# Objects that come and go with timers and queued signals make a little noise (measured: 2, the Counter itself);
# a leak of one thing per cycle in a dozen places would show as more.
TOLERANCE = 10
# What the test harness keeps, not the window: pytest holds every log record of a test for its report (once an
# earlier test has set the app's loggers to INFO, each job's lines are records here; the window writes them out)
HARNESS = {"LogRecord"}


def test_the_core_cycle_leaves_no_objects_behind(qtbot, tmp_path, tiny_llama, llama_adapters, data_dir):
    window = make_window(qtbot, tmp_path)
    # The memory chart keeps its last two minutes of samples and 30 markers (HISTORY_S, MAX_MARKERS): capped on
    # purpose, they fill during the first minutes, longer than this test. Stopped in each cycle (the window starts
    # it once shown); the soak covers it.
    data = tmp_path / "eval.jsonl"
    rows = [("Hi.", "Hello."), ("1?", "2.")]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    ap, cp, ep = window.adapter_panel, window.compare_panel, window.evaluate_panel
    ap.confirm_unload = lambda _names: True

    def cycle() -> Counter[str]:
        window.monitor.stop()
        window.open_base(str(tiny_llama))
        idle(qtbot, window)
        window.attach_adapter(str(llama_adapters["alpha"]))
        idle(qtbot, window)
        name = window.session.state().adapters[0][0]
        ap.try_it.prompt_edit.setText("Tell me about the sea.")
        ap.try_it.max_tokens.setValue(4)
        ap.generate()
        idle(qtbot, window)
        cp.set_ticked([cp.base_name(), name])
        cp.prompt_box.edit.setPlainText("One sentence about ships.")
        cp.decoding.max_tokens.setValue(4)
        cp.run()
        idle(qtbot, window)
        cp.set_chat_mode(True)
        cp.send_chat("Hello!")
        idle(qtbot, window)
        cp.chat.new_chat_requested.emit()
        cp.set_chat_mode(False)
        ep.set_data_files([data])
        ep.run()
        idle(qtbot, window)
        ap.unload_all()
        # until nothing is left to run: the jobs, and the Train tab's memory estimate, which starts once the state
        # has rested (ESTIMATE_DELAY_MS) and was caught half-way by the count on a loaded machine
        estimate_waits = window.train_panel.data_preview._estimate_timer
        for _ in range(2):
            qtbot.waitUntil(lambda: window.runner.is_idle() and not estimate_waits.isActive(), timeout=60_000)
            qtbot.wait(300)
        gc.collect()
        return Counter(type(o).__qualname__ for o in gc.get_objects())

    for _ in range(WARM_CYCLES):
        cycle()
    before = cycle()
    for _ in range(MEASURED_CYCLES - 1):
        after = cycle()
    grown = {name: after[name] - before[name] for name in after if after[name] > before[name] and name not in HARNESS}
    total = sum(after[name] - before[name] for name in after.keys() | before.keys() if name not in HARNESS)
    growers = sorted(grown.items(), key=lambda item: -item[1])[:8]
    assert total <= TOLERANCE, f"{total} more objects after {MEASURED_CYCLES - 1} cycles; most grown: {growers}"


def test_superseded_side_jobs_keep_nothing_alive(qtbot, tmp_path, data_dir):
    """The local model list refreshed twice in a row, as a merge and an export ask for it: once every job has ended,
    none of their work objects is left (a QRunnable subclass that the pool deleted kept some alive for good)."""
    from lora_studio.gui.base import jobs

    window = make_window(qtbot, tmp_path)
    idle(qtbot, window)
    for _ in range(8):
        window.model_panel.refresh_local()
        window.model_panel.refresh_local()
        idle(qtbot, window)
    qtbot.wait(100)  # the ended jobs' deleteLater
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, jobs._Runnable)] == []
