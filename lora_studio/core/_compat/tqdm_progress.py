"""Per-tensor progress and cancellation for ``from_pretrained``, through transformers' module-level ``tqdm``.

transformers has no progress callback for ``from_pretrained``; its weight-loading loops iterate through
a ``tqdm`` they import at module level. :func:`reporting_progress` swaps that name, for the calling thread
and the duration of one load, for an iterator that reports each tensor and stops the load when the user
cancels. A site that is missing or no longer looked up is skipped with a warning: the load still works,
with stage-level progress only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import code_uses_name, import_target, swapped, warn_inactive
from lora_studio.core.errors import Cancelled
from lora_studio.core.tasks import CancelToken, Progress, Report

# module path -> attribute holding the tqdm used by a weight-loading loop
SITES: tuple[tuple[str, str], ...] = (
    ("transformers.core_model_loading", "tqdm"),
    ("transformers.modeling_gguf_pytorch_utils", "tqdm"),
)


class ReportingIterable:
    """What the loop iterates instead of a tqdm bar: the same items, a Progress for each, a check for cancel."""

    def __init__(self, iterable: Iterable[Any], stage: str, cancel: CancelToken, report: Report) -> None:
        self._iterable = iterable
        self._stage = stage
        self._cancel = cancel
        self._report = report
        try:
            self._total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self._total = None

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self._iterable):
            if self._cancel.cancelled:
                raise Cancelled()
            self._report(Progress(i, self._total, self._stage, "tensors"))
            yield item
        self._report(Progress(self._total or 0, self._total, self._stage, "tensors"))


def _site_name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}"


def _inactive_reason(module_name: str, attr: str) -> tuple[Any, str]:
    """``(module, "")`` when the site can be hooked, else ``(None, why not)``."""
    module, reason = import_target(module_name)
    if module is None:
        return None, reason
    if not hasattr(module, attr):
        return None, f"{module_name} has no {attr!r} any more"
    if not callable(getattr(module, attr)):
        return None, f"{module_name}.{attr} is not callable"
    if not code_uses_name(module, attr):
        return None, f"no function of {module_name} looks up {attr!r} any more"
    return module, ""


def checks() -> dict[str, str]:
    return {_site_name(m, a): _inactive_reason(m, a)[1] or ACTIVE for m, a in SITES}


@contextmanager
def reporting_progress(cancel: CancelToken, report: Report) -> Iterator[None]:
    """While inside, this thread's ``from_pretrained`` reports each tensor and raises Cancelled when cancelled."""

    def factory(iterable: Iterable[Any] | None = None, *args: Any, desc: str = "", **kwargs: Any) -> ReportingIterable:
        stage = "dequantising GGUF tensors" if "GGUF" in (desc or "") else "loading weights"
        return ReportingIterable(iterable if iterable is not None else [], stage, cancel, report)

    with ExitStack() as stack:
        for module_name, attr in SITES:
            module, reason = _inactive_reason(module_name, attr)
            if module is None:
                warn_inactive(f"tqdm progress ({_site_name(module_name, attr)})", reason)
                continue
            stack.enter_context(swapped(module, attr, factory))
        yield
