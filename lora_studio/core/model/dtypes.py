"""The dtypes a base model is loaded, estimated and merged in: their names, sizes and torch objects.

Names are what users pick and configs say ("float32", "bfloat16", "float16"); the safetensors
spelling ("F32", "BF16", ...) and its sizes belong to the file format
(:mod:`lora_studio.core.io.safetensors_format`), and this module maps between the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_studio.core.errors import UserError
from lora_studio.core.io.safetensors_format import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

# What a model can be loaded, estimated and merged in, in the order the front ends offer them.
DTYPES = ("float32", "bfloat16", "float16")
# safetensors spelling -> dtype name, for the floating-point dtypes checkpoints are saved in
ST_TO_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
NAME_TO_ST = {name: st for st, name in ST_TO_NAME.items()}
# bytes per element of each dtype in DTYPES
DTYPE_BYTES = {name: DTYPE_SIZES[NAME_TO_ST[name]] for name in DTYPES}


def check_dtype(name: str) -> str:
    """``name`` when it is one of :data:`DTYPES`; a UserError otherwise."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}", "choose float32, bfloat16 or float16")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a name in :data:`DTYPES` (``"bfloat16"`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, check_dtype(name))
