"""Installing an optional package into this Python from the window: pip as a long job (Cancel kills it)."""

from __future__ import annotations

import importlib
import logging
import select
import subprocess
import time

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

logger = logging.getLogger(__name__)


def run_installer(
    command: list[str],
    what: str,
    *,
    building: str = "building from source",
    hint: str = "the log file has pip's output",
    cancel: CancelToken,
    report: Report = no_report,
) -> None:
    """Run ``command`` (pip, or a script around it), reporting its stage and the time it has taken as
    "installing WHAT: stage (m:ss)"; a failure is one line with pip's last words. Import caches are refreshed
    afterwards, so the new package is found."""
    started = time.monotonic()
    stage = "starting pip"
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: list[str] = []
    try:
        assert child.stdout is not None  # stdout=PIPE
        while True:
            if cancel.cancelled:
                raise Cancelled()
            # wait at most half a second for pip's next line, so Cancel and the clock stay live during a build
            ready, _, _ = select.select([child.stdout], [], [], 0.5)
            line = child.stdout.readline().strip() if ready else ""
            if ready and not line and child.poll() is not None:
                break
            if line:
                tail = [*tail, line][-5:]
                logger.debug("pip: %s", line)
            if "Building wheel" in line:
                stage = building
            elif line.startswith(("Collecting", "Downloading")):
                stage = "downloading"
            elif line.startswith("Installing collected"):
                stage = "installing"
            minutes, seconds = divmod(int(time.monotonic() - started), 60)
            report(Progress(0, None, f"installing {what}: {stage} ({minutes}:{seconds:02d})"))
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise UserError(f"pip could not install {what}: {tail[-1] if tail else 'no output'}", hint)
    importlib.invalidate_caches()
