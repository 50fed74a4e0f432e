"""Loading a base model and its tokenizer, with progress and cancellation.

transformers has no progress callback for ``from_pretrained``; the hook in
:mod:`lora_studio.core._compat.tqdm_progress` reports each tensor and stops the
load when the user cancels. If a transformers release renames those loops the
hook logs a warning and loads still work, with stage-level progress only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.core._compat.gguf_reader import fast_gguf_reads
from lora_studio.core._compat.tqdm_progress import reporting_progress
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.io.paths import utf8_path
from lora_studio.core.io.tensor_values import largest_magnitude
from lora_studio.core.model.config import gguf_pretrained_config, read_config_file
from lora_studio.core.model.dtypes import torch_dtype
from lora_studio.core.model.placement import PLACED_MAPS, MaxMemory
from lora_studio.core.model.quantize import Quantize, check_quantize, quantization_config
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def offline_environment() -> None:
    """Make sure nothing reaches for the network (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def remote_code_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*.py"))


def check_remote_code(source: ModelSource, trust_remote_code: bool) -> None:
    """Refuse a model that needs its own Python code unless the user trusted it."""
    if trust_remote_code or source.gguf_file:
        return
    config = read_config_file(source.path, missing_ok=True)
    if config.get("auto_map"):
        from transformers import CONFIG_MAPPING

        if config.get("model_type") in CONFIG_MAPPING:
            return  # transformers has a built-in class; the shipped code is not needed and not run
        files = ", ".join(remote_code_files(source.path)) or "Python files named in auto_map"
        raise UserError(
            f"{source.label} needs its own Python code to load ({files}); it was not run",
            "only if you trust where this model came from, enable 'trust remote code' for it",
        )


_ADDED_TOKENS_KEY = re.compile(r'"added_tokens"\s*:\s*\[')
_MODEL_KEY = re.compile(r'"model"\s*:')


def added_tokens_hint(folder: Path) -> dict:
    """``added_tokens_decoder`` read from tokenizer.json's small "added_tokens" array, or {} to let transformers do it.

    A tokenizer saved by transformers 5 has no ``added_tokens_decoder`` in tokenizer_config.json; loading it then
    parses the *whole* tokenizer.json with Python's json module (SmolLM2's is 3.4 MB: 0.1-0.3 s in one C call
    that holds the GIL, so the window freezes for that long) only to take that array. Handing transformers the
    same entries up front skips that parse; the result is identical (its legacy path builds
    ``AddedToken(**entry)`` from the same entries). Only for the case that path covers alone: no
    special_tokens_map.json or added_tokens.json beside it.
    """
    tokenizer_json, config_json = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tokenizer_json.is_file() or not config_json.is_file():
        return {}
    if (folder / "special_tokens_map.json").exists() or (folder / "added_tokens.json").exists():
        return {}
    try:
        config = json.loads(config_json.read_text("utf-8"))
        if not isinstance(config, dict) or "added_tokens_decoder" in config:
            return {}
        text = tokenizer_json.read_text("utf-8")
        found = _ADDED_TOKENS_KEY.search(text)
        model = _MODEL_KEY.search(text)
        if found is None or (model is not None and model.start() < found.start()):
            return {}  # not the top-level key of a Hugging Face tokenizer.json (it comes before "model")
        entries, _ = json.JSONDecoder().raw_decode(text, found.end() - 1)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    decoder = {}
    for entry in entries if isinstance(entries, list) else ():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int)
            or not isinstance(entry.get("content"), str)
        ):
            return {}
        decoder[entry["id"]] = {k: v for k, v in entry.items() if k != "id"}
    return {"added_tokens_decoder": decoder} if decoder else {}


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    offline_environment()
    from transformers import AutoTokenizer

    from lora_studio.core.model.tokenizer_parse import stepwise_tokenizer_parsing

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else added_tokens_hint(Path(source.path))
    try:
        with utf8_path(source.path) as folder, stepwise_tokenizer_parsing(), _gguf_reads(source):
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:
        raise UserError(
            f"cannot load the tokenizer of {source.label}: {exc}",
            "the model folder needs tokenizer files (tokenizer.json or similar)",
        ) from exc


def load_base(
    source: ModelSource,
    *,
    dtype: str = "float32",
    device_map: str = "cpu",
    trust_remote_code: bool = False,
    quantize: Quantize | None = None,
    max_memory: MaxMemory | None = None,
    offload_folder: Path | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer; returns ``(model, tokenizer)``. Raises Cancelled if cancelled.

    The weights first, then the tokenizer: loaded the other way round, the few small objects each load leaves
    behind kept whole arenas of Python's allocator from going back to the system, and a window that loads and
    unloads bases all day grew ~0.7 MiB a load (``benchmarks/load_fragmentation.py``)."""
    cancel = cancel or CancelToken()
    offline_environment()
    check_remote_code(source, trust_remote_code)
    model = load_model(
        source,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        quantize=quantize,
        max_memory=max_memory,
        offload_folder=offload_folder,
        cancel=cancel,
        report=report,
    )
    report(Progress(0, None, "reading tokenizer"))
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    cancel.raise_if_cancelled()
    return model, tokenizer


def load_model(
    source: ModelSource,
    *,
    dtype: str = "float32",
    device_map: str = "cpu",
    trust_remote_code: bool = False,
    quantize: Quantize | None = None,
    max_memory: MaxMemory | None = None,
    offload_folder: Path | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> PreTrainedModel:
    """Load the weights alone (frozen, in eval mode), for a caller that has the tokenizer already. ``quantize``:
    the linear weights in 4 or 8 bits through bitsandbytes (see ``model.quantize``). ``max_memory``: each device's
    limit (``model.placement``), accelerate placing the layers (``device_map`` auto unless one of its other
    strategies); what overflows goes to disk in ``offload_folder``."""
    cancel = cancel or CancelToken()
    offline_environment()
    check_remote_code(source, trust_remote_code)
    report(Progress(0, None, "loading weights"))
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    # weights_only: a .bin checkpoint is never unpickled with arbitrary code.
    kwargs: dict = {"trust_remote_code": trust_remote_code, "weights_only": True}
    if source.gguf_file:
        # GGUF tensors are dequantised to float32; cast afterwards to the chosen dtype. The configuration is the one
        # remembered for this file (read once, ~4 s for a 262k-token vocabulary): the plans and export use it too.
        kwargs.update(gguf_file=source.gguf_file, dtype=torch_dtype("float32"), config=gguf_pretrained_config(source))
    else:
        kwargs.update(dtype=torch_dtype(dtype), use_safetensors=_has_safetensors(source.path))
    if device_map != "cpu":
        kwargs["device_map"] = device_map
    if quantize is not None:
        check_quantize(quantize, source, read_config_file(source.path, missing_ok=True))
        kwargs["quantization_config"] = quantization_config(quantize, dtype)
        # bitsandbytes places its weights where the device map says: the CPU too must be named
        kwargs["device_map"] = {"": "cpu"} if device_map == "cpu" else device_map
    if max_memory is not None:
        if source.gguf_file:
            raise UserError("a GGUF base is placed on one device", "drop --max-memory for a .gguf base")
        kwargs.update(
            device_map=device_map if device_map in PLACED_MAPS else "auto",
            max_memory=dict(max_memory),
            offload_folder=str(offload_folder) if offload_folder is not None else None,
        )
    if not source.gguf_file:
        from lora_studio.core.io.page_cache import warm_page_cache

        warm_page_cache(source.path, cancel)
    weight_files = [source.path / source.gguf_file] if source.gguf_file else _weight_files(source.path)
    report_tensors = _releasing_as_it_loads(weight_files, report)
    try:
        with reporting_progress(cancel, report_tensors), utf8_path(source.path) as folder, _gguf_reads(source):
            # output_loading_info: (model, info) -- transformers' stubs type only the plain return
            loaded: Any = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
            model: PreTrainedModel = loaded[0]
            info: dict = loaded[1]
    except (Cancelled, UserError):
        raise
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{source.label}: a .bin weights file was refused because it is not plain tensors (it could run code)",
            "LoRA Studio opens pickles only with weights_only=True; get a safetensors copy of this model",
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        from lora_studio.core.errors import is_out_of_memory

        if is_out_of_memory(exc):
            raise
        raise UserError(
            f"cannot load {source.label}: {_short(exc)}", "check that the folder is a complete causal language model"
        ) from exc
    cancel.raise_if_cancelled()
    missing = sorted(info.get("missing_keys") or ())
    if missing and not source.gguf_file:
        # transformers initialises them at random and only logs it: every output would be noise
        del model
        raise UserError(
            f"{source.label}: {len(missing)} weights that config.json declares are not in the checkpoint "
            f"(e.g. {missing[0]}); they would be random",
            "the checkpoint is incomplete, or config.json belongs to another model",
        )
    _check_finite_weights(model, source)
    if source.gguf_file:
        _check_gguf_read(model, source)
        _forget_gguf_quantization(model)
        if dtype != "float32":
            # transformers declares .to with functools.wraps(Module.to): mypy then takes the dtype for ``self``
            model = model.to(torch_dtype(dtype))  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return model


def _weight_files(folder: Path) -> list[Path]:
    return sorted(path for pattern in ("*.safetensors", "*.bin") for path in folder.glob(pattern))


def _releasing_as_it_loads(weight_files: list[Path], report: Report) -> Report:
    """``report``, and while transformers reports its tensors, the memory the load is done with handed back: the
    checkpoint's mapped pages read so far (they stay in the page cache), every 30 ms or five times what checking its
    page table alone takes (6 ms for 0.5 GB: a big checkpoint is checked less often), and glibc's freed heap pages
    (the full-precision copies a quantised load reads its rows from) every 300 ms. Without it a load's peak RSS
    counted the whole checkpoint on top of the model (docs/benchmarks.md, bench_quantized.py)."""
    from lora_studio.core.system.allocator import release_free_memory, release_mapped_pages

    next_release = next_trim = -math.inf  # from the first tensor on
    interval = 0.03

    def report_and_release(progress: Progress) -> None:
        nonlocal next_release, next_trim, interval
        now = time.monotonic()
        if progress.unit == "tensors" and now >= next_release:
            released = release_mapped_pages(weight_files)  # at a report, the tensors before it have been copied out
            if not released:  # what reading the page table alone costs: a big checkpoint's is checked less often
                interval = max(interval, 5 * (time.monotonic() - now))
            next_release = now + interval
        if progress.unit == "tensors" and now >= next_trim:
            release_free_memory()
            next_trim = now + 0.3
        report(progress)

    return report_and_release


def _check_finite_weights(model: PreTrainedModel, source: ModelSource) -> None:
    """A base with a NaN or Inf weight answers NaN everywhere, and a merge of it is NaN: one line instead. One
    reduction a parameter, as for an adapter's tensors; weights stored as whole numbers (4/8-bit codes) and
    offloaded ones (on the meta device) are left alone."""
    import torch

    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.device.type == "meta" or param.numel() == 0:
            continue
        if math.isfinite(largest_magnitude(param.detach())):
            continue
        bad = int((~torch.isfinite(param)).sum())
        raise UserError(
            f"{source.label}: {name} holds {bad} NaN/Inf values; every output would be NaN",
            "the checkpoint is damaged; download or save the model again",
        )


def _gguf_reads(source: ModelSource) -> contextlib.AbstractContextManager[None]:
    """gguf's reader through the compat hook while transformers reads a GGUF base; a folder's load leaves it be."""
    return fast_gguf_reads() if source.gguf_file else contextlib.nullcontext()


def _check_gguf_read(model: PreTrainedModel, source: ModelSource) -> None:
    """transformers can read a GGUF's tensors as other numbers without a word (a float32 GGUF of a Llama was seen
    loaded with only each tensor's first row right, every key "present", by transformers 5): a few rows of the loaded
    embedding must be the file's own, dequantised by gguf (read with the file's footprint, once per file). A mismatch
    is one UserError, never a model that answers with noise."""
    import numpy as np
    import torch

    from lora_studio.core.model.estimate import gguf_tensors_read

    sample = gguf_tensors_read(source).embedding
    embeddings = model.get_input_embeddings()
    if sample is None or embeddings is None:
        return
    weight = embeddings.weight
    assert isinstance(weight, torch.Tensor)  # an embedding's weight
    fits = max(sample.rows) < weight.shape[0]
    loaded = weight[list(sample.rows)].detach().float().cpu().numpy() if fits else None
    if loaded is None or loaded.shape != sample.values.shape or not np.allclose(sample.values, loaded, 1e-3, 1e-3):
        raise UserError(
            f"{source.label}: transformers read this GGUF's weights wrongly "
            f"(its embedding differs from the file's {sample.tensor_type} data)",
            "open the model's Hugging Face folder, or a GGUF of another type (f16, q8_0) made with llama.cpp",
        )


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """A GGUF load is fully dequantised; drop the marker that makes transformers refuse to save it."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        with contextlib.suppress(AttributeError):  # a read-only property on some versions: nothing to drop
            # torch's stubs type Module.__setattr__ for tensors and modules only; any value is set
            model.is_quantized = False  # type: ignore[assignment]


def _has_safetensors(folder: Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
