"""The one worker pattern: exactly one terminal signal, stale results dropped, one model job at a time."""

from __future__ import annotations

import threading
import time

import pytest

from lora_studio.core.errors import UserError
from lora_studio.core.tasks import Progress
from lora_studio.gui.base.jobs import Busy, JobRunner


@pytest.fixture
def runner(qtbot):
    r = JobRunner()
    yield r
    assert r.shutdown(10_000)
    qtbot.waitUntil(r.is_idle, timeout=5000)


def record(job):
    seen = []
    job.finished.connect(lambda r: seen.append(("finished", r)))
    job.failed.connect(lambda d: seen.append(("failed", d)))
    job.cancelled.connect(lambda: seen.append(("cancelled", None)))
    return seen


def settle(qtbot, runner, seen, n=1):
    qtbot.waitUntil(lambda: len(seen) >= n and runner.is_idle(), timeout=10_000)
    qtbot.wait(50)  # nothing more may arrive


def test_finished_runs_off_the_gui_thread(qtbot, runner):
    gui = threading.get_ident()
    job = runner.submit("add", lambda *, cancel, report: (threading.get_ident(), 1 + 1))
    seen = record(job)
    settle(qtbot, runner, seen)
    assert len(seen) == 1 and seen[0][0] == "finished"
    worker, value = seen[0][1]
    assert worker != gui and value == 2 and job.state == "finished"


def test_user_error_fails_with_one_line(qtbot, runner):
    def bad(*, cancel, report):
        raise UserError("model.layers.0 expects 64, base has 32", "pick the right base")

    job = runner.submit("attach", bad)
    seen = record(job)
    settle(qtbot, runner, seen)
    assert [s[0] for s in seen] == ["failed"]
    assert seen[0][1].kind == "user" and "model.layers.0" in seen[0][1].message and "\n" not in seen[0][1].message


def test_internal_error_keeps_traceback_for_the_log(qtbot, runner):
    job = runner.submit("boom", lambda *, cancel, report: 1 / 0)
    seen = record(job)
    settle(qtbot, runner, seen)
    desc = seen[0][1]
    assert desc.kind == "internal" and "ZeroDivisionError" in desc.message and "Traceback" in desc.detail


def test_cancel_ends_in_cancelled_only(qtbot, runner):
    started = threading.Event()

    def slow(*, cancel, report):
        started.set()
        while True:
            cancel.raise_if_cancelled()
            time.sleep(0.005)

    job = runner.submit("slow", slow)
    seen = record(job)
    assert runner.busy_reason.startswith("busy: slow")
    started.wait(5)
    runner.cancel_current()
    settle(qtbot, runner, seen)
    assert [s[0] for s in seen] == ["cancelled"] and runner.busy_reason == ""


def test_only_one_model_job_at_a_time(qtbot, runner):
    gate = threading.Event()
    job = runner.submit("loading x", lambda *, cancel, report: gate.wait(5))
    seen = record(job)
    with pytest.raises(Busy, match="loading x"):
        runner.submit("attaching y", lambda *, cancel, report: None)
    side = runner.submit("estimate", lambda *, cancel, report: 7, exclusive=False, key="estimate")
    side_seen = record(side)
    qtbot.waitUntil(lambda: bool(side_seen), timeout=5000)
    assert side_seen == [("finished", 7)]
    gate.set()
    settle(qtbot, runner, seen)
    assert seen == [("finished", True)]


def test_freed_pages_go_back_to_the_system_when_the_last_running_job_ends(qtbot, runner, monkeypatch):
    """What a job and its listeners freed (a model closed, a comparison dropped) is handed back then, not kept as
    the window's RSS (allocator.release_free_memory)."""
    from lora_studio.gui.base import jobs

    released: list[int] = []
    monkeypatch.setattr(jobs, "release_free_memory", lambda: released.append(len(runner.running_jobs())))
    gate = threading.Event()
    model_job = runner.submit("loading x", lambda *, cancel, report: gate.wait(5))
    side = runner.submit("estimate", lambda *, cancel, report: 7, exclusive=False, key="estimate")
    seen, side_seen = record(model_job), record(side)
    qtbot.waitUntil(lambda: bool(side_seen), timeout=5000)
    assert released == []  # a job still runs
    gate.set()
    settle(qtbot, runner, seen)
    assert released == [0]


def test_stale_keyed_result_is_dropped(qtbot, runner):
    release = threading.Event()

    def old_estimate(*, cancel, report):
        release.wait(5)
        return "old"

    old = runner.submit("estimate", old_estimate, exclusive=False, key="estimate")
    old_seen = record(old)
    new = runner.submit("estimate", lambda *, cancel, report: "new", exclusive=False, key="estimate")
    new_seen = record(new)
    assert old.state == "cancelled"  # superseded at once: listeners move on
    qtbot.waitUntil(lambda: bool(new_seen), timeout=5000)
    release.set()
    qtbot.waitUntil(runner.is_idle, timeout=5000)
    qtbot.wait(50)
    assert new_seen == [("finished", "new")]
    assert old_seen == [("cancelled", None)]  # exactly one terminal signal; 'old' is never delivered
    assert old.result is None


def test_progress_is_throttled_and_the_last_one_arrives(qtbot, runner):
    got = []

    def chatty(*, cancel, report):
        for i in range(20_000):
            report(Progress(i + 1, 20_000, "tensors", "tensors"))
        return "ok"

    job = runner.submit("load", chatty, on_progress=got.append)
    seen = record(job)
    settle(qtbot, runner, seen)
    assert seen == [("finished", "ok")]
    assert 1 <= len(got) < 200
    assert got[-1].done == 20_000


def test_every_stage_change_arrives_only_repeats_are_dropped(qtbot, runner):
    """Issue 16: the bar sat at "tensor 272/272" through verification because the stage change was throttled away."""
    got = []
    gate = threading.Event()

    def merge_like(*, cancel, report):
        for i in range(1000):  # far faster than the throttle's interval
            report(Progress(i, 1000, f"merging tensor {i}/1000", "bytes"))
        report(Progress(0, 3, "verifying: running the adapter model", "prompts"))  # at once after the last repeat
        gate.wait(10)  # the job stays in this stage: nothing later would carry it to the window
        return "ok"

    job = runner.submit("merge", merge_like, on_progress=got.append)
    seen = record(job)
    qtbot.waitUntil(lambda: bool(got) and got[-1].stage == "verifying: running the adapter model", timeout=10_000)
    gate.set()
    settle(qtbot, runner, seen)
    assert seen == [("finished", "ok")]
    assert len(got) < 100  # the 1000 repeats were throttled
    assert [p.stage for p in got].count("verifying: running the adapter model") == 1
    assert got[0].stage == "merging tensor" and got[0].done == 0  # a job's first report is a new stage


def test_many_stages_all_arrive_in_order(qtbot, runner):
    got = []

    def stages(*, cancel, report):
        for stage in range(50):
            for i in range(100):
                report(Progress(i, 100, f"stage {chr(65 + stage // 26)}{chr(65 + stage % 26)}", "items"))
        return "ok"

    job = runner.submit("many", stages, on_progress=got.append)
    seen = record(job)
    settle(qtbot, runner, seen)
    names = [p.stage for p in got]
    firsts = list(dict.fromkeys(names))
    assert len(firsts) == 50 and names == sorted(names, key=firsts.index)  # each stage shows, none out of order


def test_stage_is_the_message_without_its_counts():
    assert Progress(5, 272, "merging tensor 5/272", "bytes").stage == "merging tensor"
    assert (
        Progress(1, 3, "verifying: running the adapter model", "prompts").stage
        == "verifying: running the adapter model"
    )
    assert Progress(1, 3, "anything", stage="named").stage == "named"


def test_unhandled_base_exception_still_ends_the_job(qtbot, runner):
    def interrupted(*, cancel, report):
        raise KeyboardInterrupt

    job = runner.submit("x", interrupted)
    seen = record(job)
    settle(qtbot, runner, seen)
    assert [s[0] for s in seen] == ["cancelled"] and runner.busy_reason == ""
