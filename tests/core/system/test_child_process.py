"""A job in a worker process ends like one in a thread: its result, its typed error, its cancel, its reports."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from lora_studio.core.errors import Cancelled, OutOfMemory, UserError, describe
from lora_studio.core.system.child_process import ChildProcessDied, run_in_child_process
from lora_studio.core.tasks import CancelToken, Progress


# the jobs: module-level functions, so the worker process can import them by name
def add(a, b, *, cancel, report, on_value):
    report(Progress(1, 2, "adding"))
    on_value(a)
    logging.getLogger("lora_studio.test_worker").warning("worker says %s", a + b)
    return {"sum": a + b, "pid": os.getpid()}


def niceness_at_import_and_now(*, cancel, report):
    return {"at_import": NICENESS_AT_IMPORT, "now": os.getpriority(os.PRIO_PROCESS, 0)}


# in the worker, this module is imported (to find the job) before the job runs: how low it ran by then
NICENESS_AT_IMPORT = os.getpriority(os.PRIO_PROCESS, 0)


def refuse(*, cancel, report):
    raise UserError("the data has no rows", "pick another file")


def break_down(*, cancel, report):
    return {}["missing"]


def wait_for_cancel(*, cancel, report, on_value):
    on_value("started")
    deadline = time.monotonic() + 60
    while not cancel.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    raise Cancelled("stopped after step 3")


def die(*, cancel, report):
    os.kill(os.getpid(), signal.SIGKILL)


def test_result_reports_callbacks_and_logs_cross_back(caplog):
    reports, values = [], []
    with caplog.at_level(logging.WARNING, logger="lora_studio.test_worker"):
        result = run_in_child_process(add, 2, 3, report=reports.append, callbacks={"on_value": values.append})
    assert result["sum"] == 5 and result["pid"] != os.getpid()
    assert [r.message for r in reports][-1] == "adding" and values == [2]
    assert any(r.getMessage() == "worker says 5" for r in caplog.records)


def test_a_user_error_keeps_its_type_and_hint():
    with pytest.raises(UserError) as caught:
        run_in_child_process(refuse)
    assert describe(caught.value).message == "the data has no rows (pick another file)"


def test_an_internal_error_carries_the_workers_traceback():
    with pytest.raises(KeyError) as caught:
        run_in_child_process(break_down)
    assert "in the worker process" in describe(caught.value).detail and "break_down" in describe(caught.value).detail


def test_cancel_reaches_the_worker():
    cancel = CancelToken()
    with pytest.raises(Cancelled, match="stopped after step 3"):
        run_in_child_process(wait_for_cancel, cancel=cancel, callbacks={"on_value": lambda _: cancel.cancel()})


def test_a_killed_worker_is_one_clear_error_not_a_hang():
    with pytest.raises(OutOfMemory, match=r"killed .*memory"):
        run_in_child_process(die)


def crash(*, cancel, report):
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crashed_worker_says_so():
    with pytest.raises(ChildProcessDied, match=r"crashed \(SIGSEGV"):
        run_in_child_process(crash)


def test_the_memory_chart_counts_a_running_worker_and_only_it():
    from lora_studio.core.system.memory import MemorySampler

    sampler = MemorySampler(open_nvml=False)
    seen = []
    cancel = CancelToken()

    def sample_then_stop(_):
        seen.append(sampler.sample().workers_rss_bytes)
        cancel.cancel()

    with pytest.raises(Cancelled):
        run_in_child_process(wait_for_cancel, cancel=cancel, callbacks={"on_value": sample_then_stop})
    assert seen[0] > 10 * 2**20  # a Python interpreter's worth
    assert sampler.sample().workers_rss_bytes == 0  # multiprocessing's resource tracker, still alive, is not counted


def test_the_worker_runs_below_the_window_from_its_first_imports():
    """Its bootstrap imports the job's module (for training: torch, TRL) before the job runs: that already runs low."""
    from lora_studio.core.system.child_process import WORKER_NICENESS

    got = run_in_child_process(niceness_at_import_and_now)
    assert got["now"] >= WORKER_NICENESS and got["now"] <= 19
    assert got["at_import"] >= min(WORKER_NICENESS, 19)
