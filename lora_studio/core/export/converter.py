"""llama.cpp's own converter, used as a library: the ``conversion`` package of the pinned llama.cpp.

``make llama-cpp`` (``llama_build``) unpacks ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their
``conversion`` package and ``gguf-py`` from the llama-cpp-python source distribution it builds the runtime from, into
this Python's prefix, and installs that ``gguf-py`` as the ``gguf`` package. So the architectures, hyperparameters,
tokenizers and tensor transforms of a GGUF export are those of the llama.cpp that checks and serves the file.

This module finds that converter, imports it once, and answers which converter class takes a configuration. A
missing or mismatched converter is a ``UserError`` naming the command that installs it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lora_studio.core.errors import UserError
from lora_studio.core.export.runtime import INSTALL_HINT, PINNED, llama_cpp_version, restart_needed

# what is unpacked from the source distribution's vendor/llama.cpp
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
PINNED_VERSION = PINNED.split("==", 1)[1]
CONVERTER_LOGGERS = ("hf-to-gguf", "lora-to-gguf", "gguf.gguf_writer", "gguf.vocab")


def converter_folder() -> Path:
    """Where ``make llama-cpp`` unpacks the pinned llama.cpp's converter (inside this Python's prefix)."""
    return Path(sys.prefix) / "share" / "lora-studio" / f"llama.cpp-converter-{PINNED_VERSION}"


def converter_refusal() -> str | None:
    """Why llama.cpp's converter cannot be used here, or None."""
    installed = llama_cpp_version()
    if installed is None:
        return "GGUF export uses llama.cpp's own converter, which is installed with llama.cpp"
    if installed != PINNED_VERSION:
        return f"llama-cpp-python {installed} is installed; GGUF export uses the converter of {PINNED_VERSION}"
    folder = converter_folder()
    if not all((folder / name).exists() for name in CONVERTER_FILES):
        return f"llama.cpp's converter is not unpacked in {folder}"
    if restart_needed():
        return "llama.cpp was installed while LoRA Studio was running: restart LoRA Studio to export GGUF files"
    return None


def require_converter() -> None:
    if reason := converter_refusal():
        raise UserError(reason, INSTALL_HINT)


@functools.cache
def conversion() -> ModuleType:
    """llama.cpp's ``conversion`` package (imported once; its scripts' own ``gguf-py`` path is not added: the
    installed ``gguf`` is that very gguf-py)."""
    require_converter()
    os.environ.setdefault("NO_LOCAL_GGUF", "1")
    folder = str(converter_folder())
    if folder not in sys.path:
        sys.path.append(folder)
    for name in CONVERTER_LOGGERS:  # the converter logs each tensor at INFO: keep it out of LoRA Studio's log
        logging.getLogger(name).setLevel(logging.WARNING)
    import conversion as package

    return package


def converter_script(name: str) -> Path:
    require_converter()
    return converter_folder() / name


@dataclass(frozen=True)
class ConverterArchitecture:
    """The converter class that takes a Hugging Face configuration."""

    hf_name: str  # "Qwen3ForCausalLM"
    gguf_name: str  # "qwen3"
    model_class: Any  # a subclass of conversion.TextModel
    config: dict


def with_architectures(config: dict) -> dict:
    """``config`` with ``architectures`` (a bare config names its family by ``model_type`` alone: transformers'
    own causal-LM table gives the class, as ``convert_hf_to_gguf.py`` needs it)."""
    if config.get("architectures") or config.get("text_config", {}).get("architectures"):
        return config
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(str(config.get("model_type"))))]
    except (KeyError, ValueError):
        return config  # not a causal LM transformers knows: the converter says what it makes of it
    return {**config, "architectures": [getattr(model_class, "__name__", str(model_class))]}


def converter_architecture(config: dict) -> ConverterArchitecture:
    """The converter class for ``config``, or a UserError naming what llama.cpp does not convert."""
    import gguf

    package = conversion()
    config = with_architectures(config)
    try:
        hf_name = package.get_model_architecture(config, package.ModelType.TEXT)
    except ValueError as exc:
        raise UserError(
            "the base's config.json names no architecture",
            "add its architectures entry (the model class, e.g. LlamaForCausalLM)",
        ) from exc
    try:
        model_class = package.get_model_class(hf_name)
    except NotImplementedError as exc:
        raise UserError(
            f"llama.cpp {PINNED_VERSION}'s converter does not convert {hf_name}",
            "export a merged Hugging Face folder instead (Merge tab, or lora-studio merge)",
        ) from exc
    return ConverterArchitecture(hf_name, gguf.MODEL_ARCH_NAMES[model_class.model_arch], model_class, config)


def text_architectures() -> list[str]:
    """Every Hugging Face architecture the pinned converter turns into a GGUF language model."""
    return sorted(conversion().TEXT_MODEL_MAP)


class ConverterLog(logging.Handler):
    """The converter's error lines (it logs the reason, then exits), to give the user its own words."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# what the converter raises (or exits with) when it cannot convert something
REFUSALS = (NotImplementedError, ValueError, KeyError, AssertionError, FileNotFoundError, SystemExit)


@contextmanager
def converter_refusals(folder: Path) -> Iterator[None]:
    """The converter's refusals while it reads ``folder`` as one UserError, in the converter's own words."""
    log = ConverterLog()
    loggers = [logging.getLogger(name) for name in CONVERTER_LOGGERS]
    for logger in loggers:
        logger.addHandler(log)
    try:
        yield
    except REFUSALS as exc:
        said = "; ".join(line.strip() for line in log.lines[-2:] if line.strip()) or str(exc) or type(exc).__name__
        if "pre-tokenizer" in said or "get_vocab_base_pre" in said:
            raise UserError(
                f"llama.cpp {PINNED_VERSION} would split this tokenizer's text differently: its pre-tokenizer is not "
                "one llama.cpp knows",
                "export a merged Hugging Face folder instead; llama.cpp's convert_hf_to_gguf_update.py adds tokenizers",
            ) from exc
        raise UserError(
            f"llama.cpp {PINNED_VERSION}'s converter cannot convert {Path(folder).name}: {said}",
            "export a merged Hugging Face folder instead",
        ) from exc
    finally:
        for logger in loggers:
            logger.removeHandler(log)
