"""The devices a model can be put on: the CPU, each CUDA GPU, Apple silicon's ``mps``, and accelerate's ``auto``.

``mps`` is offered only where ``torch.backends.mps.is_available()`` (a Mac with Apple silicon and a torch built with
MPS). Its memory is unified: the GPU allocates from the same RAM the CPU uses, so an estimate counts the free RAM,
not a separate GPU pool. What it cannot run is refused before anything loads: float64 (MPS has no 64-bit floats),
bfloat16 before macOS 14, and bitsandbytes' 4/8-bit quantisation (its kernels are for CUDA and the CPU).

Every check takes what the machine has as arguments (read from torch by default), so the choices are tested on any
machine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from lora_studio.core.errors import UserError

MPS = "mps"


@dataclass(frozen=True)
class Devices:
    """What this machine offers: CUDA GPUs by count, and whether mps runs (and bfloat16 on it)."""

    cuda: int = 0
    mps: bool = False
    mps_bfloat16: bool = False

    def choices(self) -> list[str]:
        """The device maps to offer, in order: cpu, each GPU, mps, auto."""
        return ["cpu", *(f"cuda:{i}" for i in range(self.cuda)), *([MPS] if self.mps else []), "auto"]

    def auto_target(self) -> str:
        """Where accelerate's ``auto`` puts a model that fits: the first GPU, else mps, else the CPU."""
        return "cuda:0" if self.cuda else MPS if self.mps else "cpu"


def this_machine() -> Devices:
    """Read from torch (imported here if it is not yet)."""
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    bf16 = False
    if mps:
        try:
            bf16 = bool(torch.backends.mps.is_macos_or_newer(14, 0))
        except (AttributeError, RuntimeError):  # an older torch: assume the older macOS
            bf16 = False
    return Devices(cuda, mps, bf16)


def mps_here() -> bool:
    """Whether mps runs here, without importing torch where it cannot (it is Apple's, on macOS only)."""
    return sys.platform == "darwin" and this_machine().mps


def check_mps(dtype: str | None = None, quantize: str | None = None, devices: Devices | None = None) -> None:
    """Refuse, in one line, what ``mps`` cannot run here: the device itself, a dtype, quantisation."""
    devices = devices or this_machine()
    if not devices.mps:
        platform = "this Mac" if sys.platform == "darwin" else f"this machine ({sys.platform})"
        raise UserError(
            f"mps is not available on {platform}: it needs Apple silicon and a torch built with MPS",
            "use cpu" + (" or a cuda device" if devices.cuda else ""),
        )
    if dtype == "float64":
        raise UserError("mps has no float64", "use float32, float16 or bfloat16")
    if dtype == "bfloat16" and not devices.mps_bfloat16:
        raise UserError("bfloat16 on mps needs macOS 14 or newer", "use float16 or float32 on this Mac")
    if quantize:
        raise UserError(
            f"{quantize} quantisation (bitsandbytes) does not run on mps: its kernels are for CUDA and the CPU",
            "load the base in float16 on mps, or quantise on the CPU",
        )


def mps_memory() -> tuple[int, int] | None:
    """(torch's current allocations, the Metal driver's allocations) on mps in bytes; None where mps is not in use
    (torch not imported, or no mps)."""
    torch = sys.modules.get("torch")
    if torch is None or sys.platform != "darwin":  # read at every memory sample: nothing to ask off a Mac
        return None
    try:
        if not torch.backends.mps.is_available():
            return None
        return int(torch.mps.current_allocated_memory()), int(torch.mps.driver_allocated_memory())
    except (AttributeError, RuntimeError):
        return None
