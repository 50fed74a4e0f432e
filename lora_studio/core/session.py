"""A session: one base model, the adapters attached to it, and which one is active.

The session is the single owner of the model objects and of their adapter state.
Nothing outside this module switches the model's adapters: features ask the session,
by :meth:`Session.variant_selected` / :meth:`Session.mixed_batch_selected` (select for a
block, restore afterwards), :meth:`Session.register_combination` (a weighted
combination that becomes an adapter of the session) and
:meth:`Session.temporary_combination` (one that exists for a block only). Readers get
:meth:`Session.state` (a frozen snapshot) or the read-only :attr:`Session.adapters`.

Front ends run one job at a time against it (the window's job runner, the CLI's
straight-line code); the session's lock makes a second concurrent caller wait rather
than corrupt state.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from lora_studio.core._compat import bnb_cpu_unpack, peft_offload
from lora_studio.core.adapters import combinations, compatibility, mlx_format
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.io.paths import utf8_path
from lora_studio.core.model.config import read_config_file
from lora_studio.core.model.estimate import ModelFootprint, read_footprint
from lora_studio.core.model.placement import MaxMemory, check_max_memory, placed_layers
from lora_studio.core.model.quantize import Quantize, check_quantize, quantization_label, saved_quantization
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system import garbage
from lora_studio.core.system.devices import MPS, Devices, check_mps, this_machine
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class AttachedAdapter:
    name: str
    path: Path
    size_bytes: int  # memory its weights take in the loaded model
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done to attach it, not a problem (a conversion)


@dataclass(frozen=True)
class SessionState:
    """A snapshot for display: safe to hand to another thread."""

    base: str | None
    base_path: str | None
    dtype: str | None
    device: str | None
    params: int | None
    adapters: tuple[tuple[str, str, int], ...]  # (name, path, size_bytes)
    active_adapter: str | None  # None: base behaviour
    adapters_enabled: bool
    quantization: str | None = None  # e.g. "bitsandbytes 4-bit" when the base's weights are quantized
    quantize: str | None = None  # the quantisation asked for on load (nf4, fp4, int8), None: as the checkpoint is
    tokenizer_source: str | None = None  # an adapter folder whose tokenizer replaced the base's
    scales: tuple[tuple[str, float], ...] = ()  # (adapter, scale) for the adapters whose scale is not 1
    # where accelerate put the layers, per device ({"cpu": "embed_tokens, layers 0–3", "disk": "layers 4–29, …"});
    # empty when the whole model is on one device
    placement: tuple[tuple[str, str], ...] = ()

    @property
    def loaded(self) -> bool:
        return self.base is not None

    def scale_of(self, adapter: str) -> float:
        return dict(self.scales).get(adapter, 1.0)


class Session:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.source: ModelSource | None = None
        self.footprint: ModelFootprint | None = None
        # Any, not Optional[PreTrainedModel | PeftModel]: most calls need one or the other, after require_loaded()
        self.model: Any = None  # the transformers model, or a PeftModel wrapping it
        self.tokenizer: Any = None
        self.tokenizer_source: Path | None = None  # an adapter folder whose tokenizer replaced the base's
        self.quantization: str | None = None  # e.g. "bitsandbytes 4-bit" when the base's weights are quantized
        self.quantize: Quantize | None = None  # the quantisation asked for on load (None: as the checkpoint is)
        self.dtype: str | None = None
        self.device_map: str | None = None
        self.max_memory: MaxMemory | None = None  # the limits per device the base was placed under
        self._offload: Any = None  # a TemporaryDirectory: the layers accelerate offloaded to disk
        self._adapters: dict[str, AttachedAdapter] = {}
        self._scales: dict[str, float] = {}  # adapters whose LoRA scale is not 1 (see set_scale)
        self._active: str | None = None  # the selection made by activate / disable_adapters
        self._enabled = True
        # Inside a variant_selected / mixed_batch_selected block: what the model has now, (adapter, enabled);
        # None outside any block, where the model has the selection above.
        self._live: tuple[str | None, bool] | None = None

    # -- state -----------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def active_adapter(self) -> str | None:
        """The adapter whose behaviour the model has now; None means the base's."""
        return self._active if (self._enabled and self._adapters) else None

    @property
    def adapters_enabled(self) -> bool:
        return self._enabled

    @property
    def adapters(self) -> Mapping[str, AttachedAdapter]:
        """The attached adapters (combinations included) by name, in attach order; read-only."""
        return MappingProxyType(self._adapters)

    def state(self) -> SessionState:
        with self.lock:
            return SessionState(
                base=self.source.label if self.source else None,
                base_path=str(self.source.file) if self.source else None,
                dtype=self.dtype,
                device=self.device,
                params=self.footprint.params if self.footprint else None,
                adapters=tuple((a.name, str(a.path), a.size_bytes) for a in self._adapters.values()),
                active_adapter=self.active_adapter,
                adapters_enabled=self._enabled,
                quantization=self.quantization,
                quantize=self.quantize,
                tokenizer_source=str(self.tokenizer_source) if self.tokenizer_source is not None else None,
                scales=tuple(self._scales.items()),
                placement=tuple(self.placement().items()),
            )

    def placement(self) -> dict[str, str]:
        """Per device, the layers accelerate placed there (empty: one device, no device map)."""
        if self.model is None or self.max_memory is None:
            return {}
        device_map = getattr(self.base_model(), "hf_device_map", None) or {}
        return placed_layers(device_map)

    @property
    def device(self) -> str | None:
        if self.model is None:
            return None
        try:
            return str(next(self.model.parameters()).device)
        except StopIteration:  # pragma: no cover
            return None

    def require_loaded(self) -> Any:  # the model (Any: see self.model)
        if self.model is None:
            raise UserError("no base model is loaded", "load a base model first")
        return self.model

    # -- base ------------------------------------------------------------------
    def load(
        self,
        source: ModelSource,
        *,
        dtype: str = "float32",
        device_map: str = "cpu",
        trust_remote_code: bool = False,
        quantize: Quantize | None = None,
        max_memory: MaxMemory | None = None,
        cancel: CancelToken | None = None,
        report: Report = no_report,
    ) -> SessionState:
        """Load ``source`` as the session's base (replacing the one before). ``quantize``: its linear weights in 4
        or 8 bits through bitsandbytes, computing in ``dtype``. ``max_memory``: each device's limit, accelerate
        placing the layers and offloading what is left to a disk folder of the session's."""
        import tempfile

        from lora_studio.core.model.loading import load_base

        cancel = cancel or CancelToken()
        check_device(device_map, dtype=dtype, quantize=quantize)
        if max_memory is not None:
            check_max_memory(max_memory)
        footprint = read_footprint(source)
        # read_footprint has already refused a damaged config.json
        config = {} if source.gguf_file else read_config_file(source.path, missing_ok=True)
        check_quantize(quantize, source, config)
        saved = saved_quantization(config)
        quant = (
            quantization_label(quantize, dtype)
            if quantize
            else f"{quantization_label(*saved)}, as saved"
            if saved
            else compatibility.quantization_label(config)
        )
        offload = tempfile.TemporaryDirectory(prefix="lora-studio-offload-") if max_memory is not None else None
        try:
            model, tokenizer = load_base(
                source,
                dtype=dtype,
                device_map=device_map,
                trust_remote_code=trust_remote_code,
                quantize=quantize,
                max_memory=max_memory,
                offload_folder=Path(offload.name) if offload is not None else None,
                cancel=cancel,
                report=report,
            )
        except ImportError as exc:  # transformers names a missing quantization (or other optional) library
            first = " ".join(str(exc).split())[:200]
            if quant:
                raise UserError(
                    f"{source.label} is quantized ({quant}) and cannot be loaded here: {first}",
                    "install that library (it may need a GPU), or load the full-precision model",
                ) from exc
            raise UserError(
                f"cannot load {source.label}: {first}", "install the missing library, or pick another model"
            ) from exc
        except BaseException:
            if offload is not None:
                offload.cleanup()
            raise
        if max_memory is not None and not set(map(str, getattr(model, "hf_device_map", {}).values())) - {"disk"}:
            # nothing placed on a device: PEFT cannot attach to a model that lives on disk alone
            del model
            assert offload is not None
            offload.cleanup()
            release_memory()
            raise UserError(
                f"the memory limits leave no room for {source.label} on any device: all of it would run from disk",
                "raise the limit of the CPU or a GPU (its embeddings at least must fit)",
            )
        with self.lock:
            self._release()
            self.quantization, self.quantize = quant, quantize
            self.source, self.footprint = source, footprint
            self.model, self.tokenizer = model, tokenizer
            self.dtype, self.device_map = dtype, device_map
            self.max_memory, self._offload = max_memory, offload
        if quantize is not None:
            from lora_studio.core.system.memory import trim_heap

            # quantising on load frees the full-precision weights it read: hand those pages back to the system
            # (on the demo, resident memory after a NF4 load: 139 MB added instead of 458)
            trim_heap()
        return self.state()

    def close(self) -> None:
        with self.lock:
            self._release()

    def _placed(self) -> dict[str, Any]:
        """PEFT's arguments to place the wrapped model as the base was (it re-dispatches a model with layers on
        the CPU or disk, and without them would move every layer to one device)."""
        if self.max_memory is None or self._offload is None:
            return {}
        return {"max_memory": dict(self.max_memory), "offload_folder": self._offload.name, "device_map": "sequential"}

    def _offload_copies(self) -> Any:
        """Where PEFT writes its copies of disk-offloaded checkpoint files as an adapter attaches: the session's
        offload folder (see _compat.peft_offload)."""
        import contextlib

        if self._offload is None:
            return contextlib.nullcontext()
        return peft_offload.offload_copies_in(Path(self._offload.name))

    def _release(self) -> None:
        self.model = None
        self.tokenizer = None
        self.tokenizer_source = None
        self.quantization = None
        self.quantize = None
        self.source = None
        self.footprint = None
        self._adapters.clear()
        self._scales.clear()
        self._active = None
        self._enabled = True
        self._live = None
        self.max_memory = None
        release_memory()
        if self._offload is not None:  # after the model that mapped its files
            self._offload.cleanup()
            self._offload = None

    def base_model(self) -> PreTrainedModel:
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
        return (
            self.source.label,
            str(self.source.path),
            self.source.repo_id or "",
            str(getattr(config, "_name_or_path", "")),
        )

    # -- adapters --------------------------------------------------------------
    def check_adapter(self, path: Path) -> compatibility.Compatibility:
        self.require_loaded()
        arch = type(self.base_model()).__name__
        return compatibility.check(
            Path(path),
            self.weight_shapes(),
            base_label=self.source.label if self.source else "the base",
            base_identity=self.base_identity(),
            architecture=arch,
            model_type=getattr(self.base_model().config, "model_type", None),
        )

    def attach(
        self,
        path: Path,
        name: str | None = None,
        *,
        activate: bool = True,
        resize_embeddings: bool = False,
        cancel: CancelToken | None = None,
        report: Report = no_report,
    ) -> AttachedAdapter:
        """Check, then load an adapter under ``name`` (default: the folder name) and make it active.

        ``resize_embeddings``: for an adapter trained with added tokens, resize the base's
        embeddings to the adapter's vocabulary and use the adapter folder's tokenizer.
        """
        from peft import PeftModel

        cancel = cancel or CancelToken()
        path = Path(path).expanduser().absolute()
        name = validate_adapter_name(adapter_name_for(path) if name is None else name)
        path, converted = mlx_format.as_peft_folder(path)  # an mlx-lm adapter is attached as PEFT's
        # PEFT's load_adapter and the check below read the model's state dict: on a CPU, a 4-bit base that has run a
        # forward would come out of it with its block scales out of order (see _compat.bnb_cpu_unpack)
        with self.lock, bnb_cpu_unpack.block_scales_restored():
            self.require_loaded()
            if name in self._adapters:
                raise UserError(
                    f"an adapter named {name!r} is already attached", "delete it first or attach under another name"
                )
            report(Progress(0, 2, f"checking {name}", "steps"))
            try:
                compat = self.check_adapter(path)
            except compatibility.VocabularyMismatch as mismatch:
                if not resize_embeddings:
                    raise
                self._resize_vocabulary(path, mismatch)
                compat = self.check_adapter(path)
            tensors = adapter_files.load_tensors(path)
            adapter_files.check_finite(tensors, path)
            cancel.raise_if_cancelled()
            report(Progress(1, 2, f"loading {name}", "steps"))
            try:
                with utf8_path(path) as folder, self._offload_copies():
                    if self.is_peft:
                        self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
                    else:
                        self.model = PeftModel.from_pretrained(
                            self.model, str(folder), adapter_name=name, is_trainable=False, **self._placed()
                        )
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                raise UserError(
                    f"PEFT could not attach {path.name}: {' '.join(str(exc).split())[:300]}",
                    "check that the adapter matches this base",
                ) from exc
            self.model.eval()
            if adapter_files.saved_without_prefix(path):
                self._place_tensors(name, tensors)
            problem = self._misplaced(name, tensors)
            if problem:
                self._drop_adapter(name)
                if self._active is not None:
                    self._set_active(self._active)
                raise UserError(
                    f"{path.name}: {problem}; attached, it would not be the adapter that was saved",
                    "check target_modules in adapter_config.json against the weights, or re-save the adapter",
                )
            if cancel.cancelled:
                self._drop_adapter(name)
                raise Cancelled()
            attached = AttachedAdapter(name, path, self._adapter_bytes(name), list(compat.warnings))
            if converted:
                attached.notes.append(converted)
            self._adapters[name] = attached
            previous = self._active
            self._set_active(name)
            if not self._changes_outputs():
                # every factor is where the file put it (checked above): a zero update is legal (a fresh init)
                attached.warnings.append(f"{name} does not change the model's outputs (its lora_B weights are zero)")
            if not activate and previous is not None:
                self._set_active(previous)
            report(Progress(2, 2, f"attached {name}", "steps"))
            return attached

    def _place_tensors(self, name: str, tensors: dict) -> None:
        """Set the adapter's tensors under the names PEFT's loader expects (``base_model.model.`` + module): the one
        key normalisation, so the session, the in-memory merge and Compare use the weights the streaming merge reads."""
        from peft.utils import set_peft_model_state_dict

        prefixed = {adapter_files.PEFT_PREFIX + key: value for key, value in tensors.items()}
        set_peft_model_state_dict(self.model, prefixed, adapter_name=name)
        logger.info(
            "%s: its %d tensors were saved without PEFT's prefix; placed under PEFT's names", name, len(prefixed)
        )

    def _misplaced(self, name: str, tensors: dict) -> str:
        """'' when every LoRA factor of the file is in the model under ``name``, with its values, and the model has no
        factor the file lacks; else what is wrong. PEFT only warns about keys it could not place (and initialises
        the modules it found no weights for), so an adapter could otherwise load as something else."""
        import torch
        from peft.utils import get_peft_model_state_dict

        def factors(state: dict) -> dict:
            return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k or ".lora_embedding_" in k}

        loaded = factors(
            {
                adapter_files.strip_prefix(k): v
                for k, v in get_peft_model_state_dict(
                    self.model, adapter_name=name, save_embedding_layers=False
                ).items()
            }
        )
        saved = factors(tensors)
        missing = sorted(set(saved) - set(loaded))
        if missing:
            return f"{len(missing)} of its tensors were not placed by PEFT (e.g. {missing[0]})"
        extra = sorted(set(loaded) - set(saved))
        if extra:
            return f"the model got {len(extra)} LoRA tensors the file does not hold (e.g. {extra[0]}), initialised anew"
        for key, value in saved.items():
            if loaded[key].is_meta:  # a layer offloaded by accelerate: PEFT wrote its factors to the offload folder
                continue
            if not torch.equal(loaded[key], value.to(device=loaded[key].device, dtype=loaded[key].dtype)):
                return f"{key} does not hold the file's values after loading"
        return ""

    def _resize_vocabulary(self, adapter: Path, mismatch: compatibility.VocabularyMismatch) -> None:
        if self._adapters:
            raise UserError(
                f"resizing the vocabulary to {mismatch.adapter_vocab} tokens needs a base without adapters",
                "unload the other adapters first, then attach this one",
            )
        if not mismatch.adapter_has_tokenizer or mismatch.adapter_vocab < mismatch.base_vocab:
            raise UserError(str(mismatch.message), "the adapter folder has no tokenizer to resize the base with")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        if len(tokenizer) > mismatch.adapter_vocab:
            raise UserError(
                f"the tokenizer in {adapter.name} has {len(tokenizer)} tokens, "
                f"more than the adapter's {mismatch.adapter_vocab} embedding rows",
                "the adapter folder is inconsistent",
            )
        self.base_model().resize_token_embeddings(mismatch.adapter_vocab)
        self.tokenizer = tokenizer
        self.tokenizer_source = adapter

    def _changes_outputs(self) -> bool:
        import torch

        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=next(self.model.parameters()).device)
        # .weight, not .num_embeddings: LoRA may wrap embed_tokens in a layer without that attribute.
        weight = self.base_model().get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)  # a parameter (nn.Module's attribute type also allows a module)
        ids = ids.clamp(max=weight.shape[0] - 1)
        with torch.inference_mode():
            with_adapter = self.model(input_ids=ids).logits
            with self.model.disable_adapter():
                without = self.model(input_ids=ids).logits
        return not torch.equal(with_adapter, without)

    def activate(self, name: str) -> None:
        with self.lock:
            if name not in self._adapters:
                raise UserError(f"no adapter named {name!r} is attached", "attach it first")
            self._set_active(name)

    def _set_active(self, name: str) -> None:
        with self._selecting():
            self.model.set_adapter(name, inference_mode=True)
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
            if name not in self._adapters:
                raise UserError(f"no adapter named {name!r} is attached", "nothing to delete")
            self._drop_adapter(name)
            del self._adapters[name]
            if not self._adapters:
                self._active = None
                self._enabled = True
            elif self._active == name or self._active not in self._adapters:
                self._set_active(next(iter(self._adapters)))
                if not self._enabled:
                    self.model.base_model.disable_adapter_layers()
            release_memory()

    def _drop_adapter(self, name: str) -> None:
        self._scales.pop(name, None)
        if not self.is_peft:
            return
        if len(self.model.peft_config) <= 1:
            self.model = self.model.unload()  # last adapter: back to the plain base model
        else:
            if self.model.active_adapter == name:
                other = next(n for n in self.model.peft_config if n != name)
                self.model.set_adapter(other, inference_mode=True)
            self.model.delete_adapter(name)

    def unload_all(self) -> None:
        """Remove every adapter and keep the base, unmerged."""
        with self.lock:
            if self.is_peft:
                self.model = self.model.unload()
            self._adapters.clear()
            self._scales.clear()
            self._active = None
            self._enabled = True
            self._live = None
            release_memory()

    # -- combinations ----------------------------------------------------------
    def register_combination(
        self, name: str, weights: Mapping[str, float], combination_type: str = "linear", density: float | None = None
    ) -> AttachedAdapter:
        """Create adapter ``name`` = a weighted combination of attached adapters (PEFT ``add_weighted_adapter``).

        It is registered like an attached adapter (its path reads
        "combination (linear): a×0.5 + b×0.5"), can be compared, activated and deleted.
        The active adapter does not change.
        """
        name = validate_adapter_name(name)
        if not weights:
            raise UserError("a combination needs at least one adapter", "pick adapters and weights")
        combinations.check_combination(list(weights), list(weights.values()), combination_type, density)
        with self.lock:
            self.require_loaded()
            if name in self._adapters:
                raise UserError(f"an adapter named {name!r} is already attached", "choose another name")
            for adapter in weights:
                if adapter not in self._adapters:
                    raise UserError(f"no adapter named {adapter!r} is attached", "attach it first")
            self._add_combination(name, list(weights), list(weights.values()), combination_type, density)
            self.model.eval()
            label = " + ".join(f"{a}×{w:g}" for a, w in weights.items())
            path = Path(f"combination ({combination_type}): {label}")
            attached = AttachedAdapter(name, path, self._adapter_bytes(name))
            self._adapters[name] = attached
            return attached

    @contextmanager
    def temporary_combination(
        self, name: str, weights: Sequence[tuple[str, float]], combination_type: str, density: float | None = None
    ) -> Iterator[str]:
        """A weighted combination of attached adapters as PEFT adapter ``name`` for the block only; yields ``name``.

        It is not registered (``adapters`` and ``state()`` do not list it) and is deleted
        afterwards; one of that name left over is replaced. The selection does not change:
        select it with :meth:`variant_selected` inside the block.
        """
        names, values = [a for a, _ in weights], [w for _, w in weights]
        with self.lock:
            self.require_loaded()
            if not self.is_peft:
                missing = f"adapter {names[0]!r} is not attached" if names else "no adapter given"
                raise UserError(missing, "attach it before combining")
            self._add_combination(name, names, values, combination_type, density)
        try:
            yield name
        finally:
            with self.lock:
                if self.is_peft and name in self.model.peft_config:
                    self.model.delete_adapter(name)

    def _add_combination(
        self, name: str, names: list[str], weights: list[float], combination_type: str, density: float | None
    ) -> None:
        """PEFT's add_weighted_adapter (replacing an adapter of that name); the model's active adapter stays."""
        previous = self.model.active_adapter
        try:
            combinations.add_combination(self.model, names, weights, combination_type, density, new_name=name)
        except UserError:
            if name in self.model.peft_config:  # PEFT may fail after creating the empty adapter
                self.model.delete_adapter(name)
            raise
        finally:
            self.model.set_adapter(previous, inference_mode=True)

    # -- scales ----------------------------------------------------------------
    @property
    def scales(self) -> Mapping[str, float]:
        """The adapters whose LoRA scale is not 1, read-only."""
        return MappingProxyType(self._scales)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Run ``adapter`` at ``scale`` times its trained strength (PEFT's ``set_scale``: ΔW = scale·(alpha/r)·B·A).

        Applied to the layers, without a merge: generation, comparison and evaluation see it; 1 restores the
        adapter as trained, 0 makes it the base.
        """
        scale = check_scale(scale)
        with self.lock:
            self.require_loaded()
            if adapter not in self._adapters or not self.is_peft or adapter not in self.model.peft_config:
                raise UserError(f"no adapter named {adapter!r} is attached", "attach it first")
            self._apply_scale(adapter, scale)
            if scale == 1.0:
                self._scales.pop(adapter, None)
            else:
                self._scales[adapter] = scale

    @contextmanager
    def scale_selected(self, adapter: str, scale: float) -> Iterator[None]:
        """``adapter`` at ``scale`` for the block; its own scale again afterwards."""
        scale = check_scale(scale)
        with self.lock:
            self.require_loaded()
            if not (self.is_peft and adapter in self.model.peft_config):
                raise UserError(f"no adapter named {adapter!r} is attached", "attach it first")
            previous = self._scales.get(adapter, 1.0)
            self._apply_scale(adapter, scale)
        try:
            yield
        finally:
            with self.lock:
                if self.is_peft and adapter in self.model.peft_config:
                    self._apply_scale(adapter, previous)

    def _apply_scale(self, adapter: str, scale: float) -> None:
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(adapter, scale)  # from alpha and r each time: scales never compound

    # -- selection for a block -------------------------------------------------
    @contextmanager
    def variant_selected(self, adapter: str | None) -> Iterator[Any]:
        """Within the block the model behaves as ``adapter`` (None: the base, adapters disabled); yields the model.

        Afterwards the model has again what it had before (blocks nest). ``state()`` keeps
        reporting the selection made by :meth:`activate` / :meth:`disable_adapters`.
        The lock is held while switching; a caller that runs the model holds
        ``session.lock`` around the block.
        """
        with self.lock:
            self.require_loaded()
            if adapter is not None and not (self.is_peft and adapter in self.model.peft_config):
                raise UserError(f"no adapter named {adapter!r} is attached", "attach it first")
        with self._selected(adapter, adapter is not None) as model:
            yield model

    @contextmanager
    def mixed_batch_selected(self) -> Iterator[Any]:
        """Within the block every adapter layer is on, for a batch that names each row's adapter
        (PEFT's ``adapter_names``: a model with its adapters disabled would ignore them); yields the model.
        Restored afterwards, as :meth:`variant_selected`."""
        from lora_studio.core._compat.peft_mixed_batch import stray_hooks_removed

        with self.lock:
            self.require_loaded()
        with self._selected(None, True) as model, stray_hooks_removed(model):
            yield model

    @contextmanager
    def _selected(self, adapter: str | None, enabled: bool) -> Iterator[Any]:
        with self.lock:
            outer = self._live
            previous = outer if outer is not None else (self._active, self._enabled)
            self._apply_selection(adapter, enabled)
            self._live = (adapter if adapter is not None else previous[0], enabled)
            model = self.model
        try:
            yield model
        finally:
            with self.lock:
                self._apply_selection(*previous)
                self._live = outer

    def _apply_selection(self, adapter: str | None, enabled: bool) -> None:
        """Point the PEFT model at ``adapter`` (when given and still there) and switch its adapter layers on or off."""
        if not self.is_peft:
            return  # the plain base: base behaviour is the only one
        with self._selecting():
            if adapter is not None and adapter in self.model.peft_config:
                self.model.set_adapter(adapter, inference_mode=True)
            if enabled:
                self.model.base_model.enable_adapter_layers()
            else:
                self.model.base_model.disable_adapter_layers()

    def _selecting(self) -> Any:
        """Where PEFT's adapter switches run: in inference mode for a model accelerate placed, whose offloaded
        layers come back from a generation holding inference tensors (PEFT's enable_adapter_layers marks the active
        adapter trainable, which torch allows on those only in inference mode)."""
        import contextlib

        if self.max_memory is None:
            return contextlib.nullcontext()
        import torch

        return torch.inference_mode()

    def _adapter_bytes(self, name: str) -> int:
        total = 0
        for pname, p in self.model.named_parameters():
            if f".{name}." in pname or pname.endswith(f".{name}"):
                total += p.numel() * p.element_size()
        return total


MAX_SCALE = 4.0


def check_scale(scale: float) -> float:
    """A usable adapter scale, as a float: finite, from 0 to ``MAX_SCALE``."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise UserError(f"scale {scale!r} is not a number", "use a number like 0.5") from None
    if not (0.0 <= value <= MAX_SCALE):  # also refuses NaN
        raise UserError(f"scale {scale} is outside 0 to {MAX_SCALE:g}", "use a scale like 0.5, 1 or 1.5")
    return value


def validate_adapter_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise UserError("an adapter needs a name", "give it a short name like 'pirate'")
    if name == "__base__" or "." in name or any(c.isspace() for c in name):
        raise UserError(f"{name!r} cannot be an adapter name", "use letters, digits, '-' and '_' (no dots or spaces)")
    return name


def check_device(
    device_map: str, *, dtype: str | None = None, quantize: str | None = None, devices: Devices | None = None
) -> None:
    """A ``cuda:N`` that this machine has, or ``mps`` where it runs (with a dtype and quantisation it can run),
    before anything loads (torch would fail with an AssertionError, or deep inside a kernel)."""
    if device_map == MPS:
        check_mps(dtype, quantize, devices)
        return
    if not device_map.startswith("cuda"):
        return
    import torch

    count = (devices or this_machine()).cuda
    if count == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(
            f"no CUDA device is available (torch {torch.__version__} is {build}); the only device here is cpu",
            "use the cpu device (--device-map cpu)",
        )
    index = device_map.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= count):
        devices_here = ", ".join(f"cuda:{i}" for i in range(count))
        raise UserError(f"there is no {device_map}; this machine has {devices_here}", "pick one of those, or cpu")


def adapter_name_for(folder: Path) -> str:
    """A valid adapter name from a folder's name ("llama-3.1 lora" -> "llama-3_1_lora"): most real adapter folders
    have dots or spaces in their names, which PEFT cannot take as an adapter name."""
    name = re.sub(r"[.\s]+", "_", Path(folder).name.strip()).strip("_")
    return name if name and name != "__base__" else "adapter"


def release_memory() -> None:
    """Give freed tensors back: collect cycles and empty torch's CUDA cache when CUDA is in use."""
    garbage.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
