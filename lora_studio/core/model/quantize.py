"""Quantize on load: a base's linear weights in 4 or 8 bits through bitsandbytes, on the CPU or CUDA.

``nf4`` and ``fp4`` are bitsandbytes' 4-bit types (QLoRA's NF4 by default), ``int8`` its LLM.int8(); embeddings,
norms and the output head stay in the load dtype, which is also the 4-bit layers' compute dtype. PEFT's LoRA layers
wrap bitsandbytes' ``Linear4bit``/``Linear8bitLt`` directly, so adapters attach, switch, scale and compare on the
quantised base as on any other. A GGUF base (already quantised, dequantised by transformers on load) and a folder
saved quantised are not quantised again.
"""

from __future__ import annotations

from typing import Any, Literal

from lora_studio.core.errors import UserError
from lora_studio.core.model.dtypes import torch_dtype
from lora_studio.core.model.sources import ModelSource

Quantize = Literal["nf4", "fp4", "int8"]
QUANTIZE_CHOICES: tuple[Quantize, ...] = ("nf4", "fp4", "int8")
BLOCK_SIZE_4BIT = 64  # bitsandbytes' 4-bit block (values sharing one absmax)
BITS = {"nf4": 4, "fp4": 4, "int8": 8}
INSTALL_HINT = "install bitsandbytes (pip install bitsandbytes): its 4- and 8-bit kernels run on the CPU and CUDA"


def bitsandbytes_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_quantize_choice(kind: str) -> None:
    """One line naming the choices when ``kind`` is not a quantisation LoRA Studio offers."""
    if kind not in QUANTIZE_CHOICES:
        raise UserError(f"unknown quantisation {kind!r}", f"choose one of {', '.join(QUANTIZE_CHOICES)}")


def quantize_refusal(kind: str | None, source: ModelSource, config: dict | None = None) -> str | None:
    """Why ``source`` cannot be quantised as ``kind`` (one of QUANTIZE_CHOICES) on load, or None (``kind`` None:
    nothing to say)."""
    if kind is None:
        return None
    if source.gguf_file:
        return f"{source.label} is a GGUF file, already quantised: it loads as transformers dequantises it"
    if config is not None and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantised")
        return f"{source.label} is saved quantised ({method}): it opens as it is, without --quantize"
    if bitsandbytes_version() is None:
        return f"quantising on load needs bitsandbytes, which is not installed ({INSTALL_HINT})"
    if config is not None and BITS.get(kind) == 4:
        # bitsandbytes' 4-bit kernels work on rows of whole blocks (its CPU kernel fails on anything else)
        widths = {k: int(config[k]) for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
        odd = {k: v for k, v in widths.items() if v % BLOCK_SIZE_4BIT}
        if odd:
            name, width = next(iter(odd.items()))
            return (
                f"{source.label}'s {name} is {width}, not a multiple of bitsandbytes' 4-bit block of "
                f"{BLOCK_SIZE_4BIT}: its layers cannot be quantised to {kind}"
            )
    return None


def quantization_config(kind: Quantize, dtype: str) -> Any:
    """transformers' BitsAndBytesConfig for ``kind``, computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
        bnb_4bit_use_double_quant=False,
    )


def quantization_label(kind: Quantize, dtype: str) -> str:
    """What the session says of its base: ``bitsandbytes nf4 (blocks of 64, compute float32)``."""
    if kind == "int8":
        return "bitsandbytes int8 (LLM.int8)"
    return f"bitsandbytes {kind} (blocks of {BLOCK_SIZE_4BIT}, compute {dtype})"


def quantization_record(kind: Quantize, dtype: str) -> dict:
    """The base's quantisation as cards and JSON record it."""
    record: dict = {"method": "bitsandbytes", "type": kind, "bits": BITS[kind]}
    if kind != "int8":
        record.update(block_size=BLOCK_SIZE_4BIT, compute_dtype=dtype)
    return record


def saved_quantization(config: dict) -> tuple[Quantize, str] | None:
    """(type, compute dtype) of a checkpoint saved quantised with bitsandbytes (its ``quantization_config``), or
    None for any other checkpoint."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict) or str(q.get("quant_method", "bitsandbytes")) != "bitsandbytes":
        return None
    compute = str(q.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
    if q.get("load_in_8bit"):
        return "int8", compute
    kind = q.get("bnb_4bit_quant_type")
    if q.get("load_in_4bit") and kind in ("nf4", "fp4"):
        return kind, compute
    return None


def check_quantize(kind: str | None, source: ModelSource, config: dict | None = None) -> None:
    if kind is not None:
        check_quantize_choice(kind)
    if reason := quantize_refusal(kind, source, config):
        raise UserError(reason, "" if bitsandbytes_version() else INSTALL_HINT)
