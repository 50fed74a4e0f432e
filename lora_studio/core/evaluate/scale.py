"""What weight an adapter should have: its loss and its distance from the base as its scale goes from 0 up.

A scale multiplies the adapter's update at run time (PEFT's ``set_scale``: ΔW = scale·(alpha/r)·B·A), no merge:
0 is the base, 1 the adapter as trained. The sweep evaluates the base and the adapter at each scale on the same
examples; its best scale is the one with the lowest loss, and "use this scale" hands it to Merge, whose merged
weights then equal PEFT's merge at that scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_studio.core.compare.variants import Variant
from lora_studio.core.errors import UserError
from lora_studio.core.evaluate.datasets import EvalSet
from lora_studio.core.evaluate.run import evaluate
from lora_studio.core.session import check_scale
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from lora_studio.core.session import Session

DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
MAX_POINTS = 41


@dataclass(frozen=True)
class ScalePoint:
    scale: float
    loss: float
    kl_from_base: float
    accuracy: float

    def to_json(self) -> dict[str, float]:
        return {"scale": self.scale, "loss": self.loss, "kl_from_base": self.kl_from_base, "accuracy": self.accuracy}


@dataclass(frozen=True)
class ScaleSweep:
    adapter: str
    points: list[ScalePoint]
    base_loss: float
    seconds: float
    data: tuple[str, ...] = ()  # the names of the sets it was judged on

    @property
    def best(self) -> ScalePoint:
        """The lowest loss; of equal losses the smaller scale (the gentler change)."""
        return min(self.points, key=lambda p: (p.loss, p.scale))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "scale_sweep",
            "adapter": self.adapter,
            "base_loss": self.base_loss,
            "best_scale": self.best.scale,
            "points": [p.to_json() for p in self.points],
            "seconds": self.seconds,
            "data": list(self.data),
        }


def parse_scales(text: str) -> list[float]:
    """``"0, 0.5, 1"`` or a range ``"0:1.5:0.25"`` (start:stop:step, stop included)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise UserError("the step of a scale range must be positive", "e.g. 0:1.5:0.25")
            span = (stop - start) / step
            if not math.isfinite(span) or span + 1 > MAX_POINTS:  # counted before any list is built
                raise UserError(
                    f"{text} would try {span + 1:,.0f} scales; at most {MAX_POINTS}"
                    if math.isfinite(span)
                    else f"{text} is not a range of scales",
                    "use a coarser step",
                )
            count = round(span) + 1
            values = [start + i * step for i in range(max(0, count))]
        else:
            values = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise UserError(f"cannot read scales {text!r}", "write 0, 0.5, 1 or a range 0:1.5:0.25") from None
    return check_scales(values)


def check_scales(values: Sequence[float]) -> list[float]:
    out = sorted({round(check_scale(v), 6) for v in values})
    if not out:
        raise UserError("no scales to try", "e.g. 0, 0.5, 1, 1.5")
    if len(out) > MAX_POINTS:
        raise UserError(f"{len(out)} scales to try; at most {MAX_POINTS}", "use a coarser step")
    return out


def sweep_scale(
    session: Session,
    adapter: str,
    sets: Sequence[EvalSet],
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> ScaleSweep:
    """Loss, accuracy and KL from the base of ``adapter`` at each scale (the session's own scale unchanged)."""
    import time

    cancel = cancel or CancelToken()
    started = time.perf_counter()
    values = check_scales(scales)
    if adapter not in session.adapters:
        raise UserError(f"no adapter named {adapter!r} is attached", "attach it first")
    columns = [Variant.base(), Variant.of_adapter(adapter, name=adapter)]
    points, base_loss = [], 0.0
    for n, scale in enumerate(values):
        cancel.raise_if_cancelled()
        report(Progress(n, len(values), f"scale {scale:g}: {n}/{len(values)}", "scales"))
        with session.scale_selected(adapter, scale):
            result = evaluate(session, columns, sets, reference="base", bootstrap_samples=0, cancel=cancel)
        mine, base = result.overall(adapter), result.overall("base")
        base_loss = base.loss
        points.append(ScalePoint(scale, mine.loss, mine.kl or 0.0, mine.accuracy))
    report(Progress(len(values), len(values), "scale sweep done", "scales"))
    return ScaleSweep(adapter, points, base_loss, time.perf_counter() - started, tuple(s.name for s in sets))
