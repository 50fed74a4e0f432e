"""benchmarks/soak_ui.py judges growth after its warm-up: three cycles and minutes, and until the Log dock is full."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import soak_ui


def test_the_soak_judges_growth_once_what_the_window_keeps_on_purpose_is_full():
    cycles = [
        {"cycle": n, "elapsed_min": 0.8 * n, "log_lines": min(36 * n, 1000), "log_cap": 1000} for n in range(1, 60)
    ]
    assert soak_ui.settled(cycles)[0]["cycle"] == 29  # the dock's 1,000 lines reached in cycle 28
    assert soak_ui.settled(cycles, log_full=False)[0]["cycle"] == 4  # three cycles and three minutes
    never_full = [dict(c, log_lines=10 * c["cycle"]) for c in cycles]
    assert soak_ui.settled(never_full, or_all=False) == []  # not judged on a filling log...
    assert soak_ui.settled(never_full)[0]["cycle"] == 2  # ...or, asked for a figure, judged on every cycle but one
    older = [{k: v for k, v in c.items() if not k.startswith("log")} for c in cycles]  # records before log_lines
    assert soak_ui.settled(older)[0]["cycle"] == 4
