"""A session: one base model, the adapters attached to it, and which one is active.

The session is the single owner of the model objects. Front ends run one job at
a time against it (the window's job runner, the CLI's straight-line code); the
session's lock makes a second concurrent caller wait rather than corrupt state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lora_studio.core.adapters import files as adapter_files, compatibility

from lora_studio.core.system import garbage
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.model.estimate import ModelFootprint, read_footprint
from lora_studio.core.io.paths import utf8_path
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report


@dataclass
class AttachedAdapter:
    name: str
    path: Path
    size_bytes: int  # memory its weights take in the loaded model
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SessionState:
    """A snapshot for display: safe to hand to another thread."""

    base: Optional[str]
    base_path: Optional[str]
    dtype: Optional[str]
    device: Optional[str]
    params: Optional[int]
    adapters: tuple[tuple[str, str, int], ...]  # (name, path, size_bytes)
    active_adapter: Optional[str]  # None: base behaviour
    adapters_enabled: bool


class Session:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.source: Optional[ModelSource] = None
        self.footprint: Optional[ModelFootprint] = None
        self.model = None  # the transformers model, or a PeftModel wrapping it
        self.tokenizer = None
        self.tokenizer_source: Optional[Path] = None  # an adapter folder whose tokenizer replaced the base's
        self.quantization: Optional[str] = None  # e.g. "bitsandbytes 4-bit" when the base's weights are quantized
        self.dtype: Optional[str] = None
        self.device_map: Optional[str] = None
        self.adapters: dict[str, AttachedAdapter] = {}
        self._active: Optional[str] = None
        self._enabled = True

    # -- state -----------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def active_adapter(self) -> Optional[str]:
        """The adapter whose behaviour the model has now; None means the base's."""
        return self._active if (self._enabled and self.adapters) else None

    @property
    def adapters_enabled(self) -> bool:
        return self._enabled

    def state(self) -> SessionState:
        with self.lock:
            return SessionState(
                base=self.source.label if self.source else None,
                base_path=str(self.source.file) if self.source else None,
                dtype=self.dtype,
                device=self.device,
                params=self.footprint.params if self.footprint else None,
                adapters=tuple((a.name, str(a.path), a.size_bytes) for a in self.adapters.values()),
                active_adapter=self.active_adapter,
                adapters_enabled=self._enabled,
            )

    @property
    def device(self) -> Optional[str]:
        if self.model is None:
            return None
        try:
            return str(next(self.model.parameters()).device)
        except StopIteration:  # pragma: no cover
            return None

    def require_loaded(self):
        if self.model is None:
            raise UserError("no base model is loaded", "load a base model first")
        return self.model

    # -- base ------------------------------------------------------------------
    def load(self, source: ModelSource, *, dtype: str = "float32", device_map: str = "cpu", trust_remote_code: bool = False,
             cancel: Optional[CancelToken] = None, report: Report = no_report) -> SessionState:
        from lora_studio.core.model.loading import load_base

        cancel = cancel or CancelToken()
        footprint = read_footprint(source)
        quant = None if source.gguf_file else compatibility.quantization_label(_read_config(source.path))
        try:
            model, tokenizer = load_base(source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                                         cancel=cancel, report=report)
        except ImportError as exc:  # transformers names a missing quantization (or other optional) library
            first = " ".join(str(exc).split())[:200]
            if quant:
                raise UserError(f"{source.label} is quantized ({quant}) and cannot be loaded here: {first}",
                                "install that library (it may need a GPU), or load the full-precision model") from exc
            raise UserError(f"cannot load {source.label}: {first}", "install the missing library, or pick another model") from exc
        with self.lock:
            self._release()
            self.quantization = quant
            self.source, self.footprint = source, footprint
            self.model, self.tokenizer = model, tokenizer
            self.dtype, self.device_map = dtype, device_map
        return self.state()

    def close(self) -> None:
        with self.lock:
            self._release()

    def _release(self) -> None:
        self.model = None
        self.tokenizer = None
        self.tokenizer_source = None
        self.quantization = None
        self.source = None
        self.footprint = None
        self.adapters.clear()
        self._active = None
        self._enabled = True
        release_memory()

    def base_model(self):
        """The underlying transformers model (inside the PEFT wrapper when there is one)."""
        model = self.require_loaded()
        if self.is_peft:
            return model.get_base_model()
        return model

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return compatibility.weight_shapes_from_model(self.require_loaded())

    def base_identity(self) -> tuple[str, ...]:
        if self.source is None:
            return ()
        config = self.base_model().config
        return (self.source.label, str(self.source.path), self.source.repo_id or "", str(getattr(config, "_name_or_path", "")))

    # -- adapters --------------------------------------------------------------
    def check_adapter(self, path: Path) -> compatibility.Compatibility:
        self.require_loaded()
        arch = type(self.base_model()).__name__
        return compatibility.check(Path(path), self.weight_shapes(), base_label=self.source.label if self.source else "the base",
                                   base_identity=self.base_identity(), architecture=arch)

    def attach(self, path: Path, name: Optional[str] = None, *, activate: bool = True, resize_embeddings: bool = False,
               cancel: Optional[CancelToken] = None, report: Report = no_report) -> AttachedAdapter:
        """Check, then load an adapter under ``name`` (default: the folder name) and make it active.

        ``resize_embeddings``: for an adapter trained with added tokens, resize the base's
        embeddings to the adapter's vocabulary and use the adapter folder's tokenizer.
        """
        from peft import PeftModel

        cancel = cancel or CancelToken()
        path = Path(path).expanduser().absolute()
        name = validate_adapter_name(path.name if name is None else name)
        with self.lock:
            self.require_loaded()
            if name in self.adapters:
                raise UserError(f"an adapter named {name!r} is already attached", "delete it first or attach under another name")
            report(Progress(0, 2, f"checking {name}", "steps"))
            try:
                compat = self.check_adapter(path)
            except compatibility.VocabularyMismatch as mismatch:
                if not resize_embeddings:
                    raise
                self._resize_vocabulary(path, mismatch)
                compat = self.check_adapter(path)
            adapter_files.check_finite(adapter_files.load_tensors(path), path)
            cancel.raise_if_cancelled()
            report(Progress(1, 2, f"loading {name}", "steps"))
            try:
                with utf8_path(path) as folder:
                    if self.is_peft:
                        self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
                    else:
                        self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                raise UserError(f"PEFT could not attach {path.name}: {' '.join(str(exc).split())[:300]}",
                                "check that the adapter matches this base") from exc
            self.model.eval()
            if cancel.cancelled:
                self._drop_adapter(name)
                raise Cancelled()
            attached = AttachedAdapter(name, path, self._adapter_bytes(name), list(compat.warnings))
            self.adapters[name] = attached
            previous = self._active
            self._set_active(name)
            if not self._changes_outputs():
                # PEFT only warns about keys it could not place; a zero update is legal (fresh init) but worth saying.
                attached.warnings.append(f"{name} does not change the model's outputs (its lora_B weights may be zero)")
            if not activate and previous is not None:
                self._set_active(previous)
            report(Progress(2, 2, f"attached {name}", "steps"))
            return attached

    def _resize_vocabulary(self, adapter: Path, mismatch: compatibility.VocabularyMismatch) -> None:
        if self.adapters:
            raise UserError(f"resizing the vocabulary to {mismatch.adapter_vocab} tokens needs a base without adapters",
                            "unload the other adapters first, then attach this one")
        if not mismatch.adapter_has_tokenizer or mismatch.adapter_vocab < mismatch.base_vocab:
            raise UserError(str(mismatch.message), "the adapter folder has no tokenizer to resize the base with")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        if len(tokenizer) > mismatch.adapter_vocab:
            raise UserError(f"the tokenizer in {adapter.name} has {len(tokenizer)} tokens, more than the adapter's {mismatch.adapter_vocab} embedding rows",
                            "the adapter folder is inconsistent")
        self.base_model().resize_token_embeddings(mismatch.adapter_vocab)
        self.tokenizer = tokenizer
        self.tokenizer_source = adapter

    def _changes_outputs(self) -> bool:
        import torch

        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=next(self.model.parameters()).device)
        # .weight, not .num_embeddings: LoRA may wrap embed_tokens in a layer without that attribute.
        ids = ids.clamp(max=self.base_model().get_input_embeddings().weight.shape[0] - 1)
        with torch.inference_mode():
            with_adapter = self.model(input_ids=ids).logits
            with self.model.disable_adapter():
                without = self.model(input_ids=ids).logits
        return not torch.equal(with_adapter, without)

    def activate(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise UserError(f"no adapter named {name!r} is attached", "attach it first")
            self._set_active(name)

    def _set_active(self, name: str) -> None:
        self.model.set_adapter(name)
        self.model.base_model.enable_adapter_layers()
        self._active = name
        self._enabled = True

    def disable_adapters(self) -> None:
        """Base behaviour with the adapters still attached."""
        with self.lock:
            if self.is_peft:
                self.model.base_model.disable_adapter_layers()
            self._enabled = False

    def delete(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise UserError(f"no adapter named {name!r} is attached", "nothing to delete")
            self._drop_adapter(name)
            del self.adapters[name]
            if not self.adapters:
                self._active = None
                self._enabled = True
            elif self._active == name or self._active not in self.adapters:
                self._set_active(next(iter(self.adapters)))
                if not self._enabled:
                    self.model.base_model.disable_adapter_layers()
            release_memory()

    def _drop_adapter(self, name: str) -> None:
        if not self.is_peft:
            return
        if len(self.model.peft_config) <= 1:
            self.model = self.model.unload()  # last adapter: back to the plain base model
        else:
            if self.model.active_adapter == name:
                other = next(n for n in self.model.peft_config if n != name)
                self.model.set_adapter(other)
            self.model.delete_adapter(name)

    def unload_all(self) -> None:
        """Remove every adapter and keep the base, unmerged."""
        with self.lock:
            if self.is_peft:
                self.model = self.model.unload()
            self.adapters.clear()
            self._active = None
            self._enabled = True
            release_memory()

    def _adapter_bytes(self, name: str) -> int:
        total = 0
        for pname, p in self.model.named_parameters():
            if f".{name}." in pname or pname.endswith(f".{name}"):
                total += p.numel() * p.element_size()
        return total


def _read_config(folder: Path) -> dict:
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}  # loading says what is wrong with it
    return cfg if isinstance(cfg, dict) else {}


def validate_adapter_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise UserError("an adapter needs a name", "give it a short name like 'pirate'")
    if name == "__base__" or "." in name or any(c.isspace() for c in name):
        raise UserError(f"{name!r} cannot be an adapter name", "use letters, digits, '-' and '_' (no dots or spaces)")
    return name


def release_memory() -> None:
    """Give freed tensors back: collect cycles and empty torch's CUDA cache when CUDA is in use."""
    garbage.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
