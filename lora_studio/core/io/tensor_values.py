"""What a weight read from a file holds, checked in one pass: the readers of adapters and of bases both refuse
NaN/Inf (and adapters values no trainer writes) through it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def largest_magnitude(tensor: torch.Tensor) -> float:
    """The largest absolute value of a non-empty floating-point tensor; NaN or Inf when it holds one. One reduction
    in the tensor's own dtype (``aminmax`` reads half precision on a CPU too): no copy, and no sum that overflows."""
    import torch

    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))
