"""Out-of-core merge: base safetensors in, merged safetensors out, one tensor at a time.

Each base tensor is read with ``pread`` (not mmap, whose touched pages would count
in RSS), cast to the output dtype, the LoRA update added, and written straight to
the output shard. Peak memory is one tensor (plus its float32 update) and the
adapter, whatever the model size.

Bit-identity with PEFT: the arithmetic below repeats PEFT's ``merge_and_unload``
(``safe_merge=False``) step for step, in the same dtypes and the same order, so
the results are the same bits rather than merely close:

* PEFT upcasts half-precision adapter weights to float32 when it loads them
  (``autocast_adapter_dtype``), so A and B are float32 here too.
* Linear / Conv1D: ``delta = transpose(B @ A, fan_in_fan_out) * scaling`` in
  float32, then ``weight += delta`` in place: a mixed-dtype in-place add, computed
  in float32 and rounded once to the weight's dtype.
* Embedding: ``delta = (B @ A).T * scaling``, cast to the weight's dtype *first*,
  then added (PEFT's Embedding.merge does ``.to(orig_dtype)`` before the add).

What the streaming engine cannot reproduce exactly it refuses with a clear message
(DoRA, lora_bias, modules_to_save, trainable tokens, an adapted tied embedding);
the in-memory engine, which runs PEFT's own code, handles those.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError
from lora_studio.core.io.safetensors_format import (
    DTYPE_SIZES,
    FileSlice,
    TensorInfo,
    pread_exact,
    read_headers,
    read_tensor,
    st_dtype,
    torch_dtype,
)
from lora_studio.core.tasks import CancelToken

if TYPE_CHECKING:
    import torch

    from lora_studio.core.adapters.files import ModuleKind

FLOAT_ST_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass
class StreamingAdapter:
    """An adapter ready to stream: per base tensor name, the factors and the scaling."""

    path: Path
    updates: dict[str, tuple[ModuleKind, torch.Tensor, torch.Tensor, float]] = field(
        default_factory=dict
    )  # weight name -> (kind, A, B, scaling)
    # base tensor name -> the adapter's saved full tensor
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    # weight names whose layer stores in × out (Conv1D): PEFT's fan_in_fan_out, decided per layer as PEFT does
    transposed: set[str] = field(default_factory=set)
    nbytes: int = 0


def streaming_refusal(adapter_folder: Path, base_tensor_names: Iterable[str], tied_embeddings: bool) -> str | None:
    """Why the streaming engine cannot merge this adapter exactly, or None when it can."""
    config = adapter_files.read_adapter_config(adapter_folder)
    keys = adapter_files.tensor_shapes(adapter_folder)
    lay = adapter_files.layout(keys)
    name = Path(adapter_folder).name
    if config.use_dora or any(m.magnitude for m in lay.lora.values()):
        return f"{name} is a DoRA adapter"
    if any(m.bias for m in lay.lora.values()):
        return f"{name} trains LoRA biases (lora_bias)"
    names = set(base_tensor_names)
    for full, key in lay.full_weights.items():
        # modules_to_save copies and saved embedding layers replace the base tensor, as PEFT's load does
        if full not in names:
            return f"{name} saves {key}, which the base checkpoint does not have"
        if tied_embeddings and _is_embedding(full.rsplit(".", 1)[0]):
            return f"{name} replaces {full}, a tied embedding"
    if lay.trainable_tokens or config.trainable_token_indices:
        return f"{name} trains token embeddings (trainable_token_indices)"
    if lay.unknown:
        return f"{name} has tensors this engine does not understand ({lay.unknown[0]})"
    for module, entry in lay.lora.items():
        if not entry.a or not entry.b:
            return f"{name}: {module} lacks its lora_A or lora_B tensor"
        target = _base_weight_name(module, names)
        if target is None:
            return f"{name} adapts {module}, which the base checkpoint does not have"
        if tied_embeddings and _is_embedding(module):
            return f"{name} adapts {module}, a tied embedding"
    return None


def _is_embedding(module: str) -> bool:
    return module.split(".")[-1] in (
        "embed_tokens",
        "lm_head",
        "wte",
        "embed_in",
        "embed_out",
        "word_embeddings",
        "tok_embeddings",
        "output",
    )


def _base_weight_name(module: str, names: set[str]) -> str | None:
    # Checkpoints saved from a bare backbone lack the model's first prefix (e.g. GPT-2's "transformer.").
    candidates = [f"{module}.weight"]
    if "." in module:
        candidates.append(f"{module.split('.', 1)[1]}.weight")
    for c in candidates:
        if c in names:
            return c
    return None


def load_streaming_adapter(
    adapter_folder: Path,
    base_tensors: Mapping[str, tuple[Path, TensorInfo]],
    tied_embeddings: bool = False,
    model_type: str | None = None,
) -> StreamingAdapter:
    """The adapter's factors per base weight, each with the orientation of its layer (``base_tensors``: the
    stream plan's sources, for the shapes; ``model_type``: the base config's, for square weights)."""
    import torch

    from lora_studio.core.adapters.compatibility import stores_in_by_out

    reason = streaming_refusal(adapter_folder, base_tensors, tied_embeddings)
    if reason:
        raise UserError(
            f"the streaming engine cannot merge this adapter exactly: {reason}",
            "use the in-memory engine (--engine in-memory)",
        )
    config = adapter_files.read_adapter_config(adapter_folder)
    tensors = adapter_files.load_tensors(adapter_folder)
    adapter_files.check_finite(tensors, adapter_folder)
    lay = adapter_files.layout(tensors)
    names = set(base_tensors)
    out = StreamingAdapter(Path(adapter_folder))
    for module, entry in lay.lora.items():
        # float32 like PEFT's loaded adapter (autocast_adapter_dtype upcasts half precision)
        a = tensors[entry.a].to(torch.float32)
        b = tensors[entry.b].to(torch.float32)
        out.nbytes += (a.numel() + b.numel()) * 4
        target = _base_weight_name(module, names)
        assert target is not None  # streaming_refusal returned None: every adapted module has its base weight
        out.updates[target] = (entry.kind, a, b, config.scaling_for(module))
        shape = base_tensors[target][1].shape
        if entry.kind != "embedding" and stores_in_by_out(module, shape, a.shape[1], b.shape[0], model_type):
            out.transposed.add(target)
    for full, key in lay.full_weights.items():
        out.replacements[full] = tensors[key]
        out.nbytes += tensors[key].numel() * tensors[key].element_size()
    return out


def _check_update_shape(delta: torch.Tensor, weight: torch.Tensor) -> None:
    if delta.shape != weight.shape:
        raise UserError(
            f"the adapter's update has shape {tuple(delta.shape)} but the base weight has {tuple(weight.shape)}",
            "the adapter was trained for another model",
        )


def merged_tensor(
    weight: torch.Tensor, kind: ModuleKind, a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """``weight`` (already in the output dtype, owned by the caller) with the LoRA update added, as PEFT does."""
    if kind == "embedding":
        delta = (b @ a).T * scaling
        weight += delta.to(weight.dtype)
    else:
        delta = b @ a  # the same float32 matmul call as PEFT's (chunking it would change the bits)
        if fan_in_fan_out:
            delta = delta.T
        _check_update_shape(delta, weight)
        # PEFT: ``weight += delta * scaling``, a mixed-dtype in-place add computed in float32 and rounded once.
        # Same bits, fewer passes and allocations: scale in place, add the weight into the float32 delta
        # (IEEE addition is commutative), round once to the weight's dtype.
        delta.mul_(scaling)
        delta.add_(weight)
        if delta.dtype == weight.dtype:
            return delta.contiguous()
        return delta.to(weight.dtype).contiguous()
    return weight


@dataclass
class StreamPlan:
    """Where each base tensor is and what it becomes."""

    sources: dict[str, tuple[Path, TensorInfo]]  # name -> (shard, info), in checkpoint order
    out_plan: dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)

    @property
    def out_bytes(self) -> int:
        total = 0
        for dtype, shape in self.out_plan.values():
            n = DTYPE_SIZES[dtype]
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def largest_tensor_elements(self) -> int:
        return max((info.numel for _, info in self.sources.values()), default=0)


def stream_plan(base_folder: Path, out_dtype: str) -> StreamPlan:
    """Read only the headers: which tensors exist and what the output will hold."""
    import torch

    out_st = st_dtype(getattr(torch, out_dtype))
    sources: dict[str, tuple[Path, TensorInfo]] = {}
    out_plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    for header in read_headers(Path(base_folder)):
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
            if name in sources:
                raise UserError(
                    f"{Path(base_folder).name}: tensor {name} appears in two shards", "the checkpoint is damaged"
                )
            if info.dtype not in DTYPE_SIZES or info.dtype.startswith("F8"):
                raise UserError(
                    f"{Path(base_folder).name}: tensor {name} is {info.dtype}",
                    "quantised checkpoints cannot be merged; use the original weights",
                )
            sources[name] = (header.path, info)
            out_plan[name] = (out_st if info.dtype in FLOAT_ST_DTYPES else info.dtype, info.shape)
    return StreamPlan(sources, out_plan)


class _Scratch:
    """Flat buffers reused from tensor to tensor.

    A fresh 50 MB tensor per weight costs page faults and zeroing on every use; reusing
    the buffers (read, float32 update, upcast block, output) nearly halves the merge time.
    The matmul writes into a 64-byte-aligned buffer exactly like a fresh tensor, so the
    bits do not change (the tests compare the saved folder with PEFT's merge).
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        n = 1
        for d in shape:
            n *= d
        flat = self._flat.get((role, dtype))
        if flat is None or flat.numel() < n:
            flat = self._flat[(role, dtype)] = torch.empty(max(n, 1), dtype=dtype)
        return flat[:n].view(shape)


def _pread_into(fd: int, info: TensorInfo, path: Path, out_bytes: torch.Tensor) -> None:
    # numpy's stubs give ndarray the buffer protocol (__buffer__) only for Python >= 3.12
    pread_exact(fd, out_bytes.numpy(), info, path)  # type: ignore[arg-type]


# Row blocks for the merge arithmetic: each block's float32 update (~2 MB) stays in the CPU caches
# through the five steps below instead of making five trips through main memory (measured: ~1.6x faster).
_BLOCK_ELEMENTS = 1 << 19
_BLOCK_ROWS_MULTIPLE = 64
# (rows, cols, rank, block rows, torch threads) -> whether the blocked matmul gives the whole matmul's bits here
_BLOCKING_EXACT: dict[tuple, bool] = {}


def _row_blocks(m: int, n: int) -> list[tuple[int, int]] | None:
    """Row ranges for a blocked merge of an (m, n) weight, or None when blocking does not pay.

    Every block has at least ``_BLOCK_ROWS_MULTIPLE`` rows: BLAS libraries switch to other kernels
    (with other rounding) for matrices of a few rows, so a short remainder joins the block before it.
    """
    rows = (_BLOCK_ELEMENTS // max(n, 1)) // _BLOCK_ROWS_MULTIPLE * _BLOCK_ROWS_MULTIPLE
    if rows < _BLOCK_ROWS_MULTIPLE or m < 2 * rows:
        return None
    starts = list(range(0, m, rows))
    if m - starts[-1] < _BLOCK_ROWS_MULTIPLE:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else m) for i, s in enumerate(starts)]


def _blocking_is_exact(scratch: _Scratch, a: torch.Tensor, b: torch.Tensor, blocks: list[tuple[int, int]]) -> bool:
    """Does ``B[rows] @ A``, block by block, give exactly the rows of PEFT's whole ``B @ A`` here?

    It does with the BLAS builds we know (a rank-r product sums r terms in the same order whatever
    the number of rows), but that is the library's choice, not a promise: the first weight of each
    shape is multiplied both ways and compared, and a shape that differs is merged whole.
    """
    import torch

    m, n = b.shape[0], a.shape[1]
    key = (m, n, a.shape[0], blocks[0][1], torch.get_num_threads())
    exact = _BLOCKING_EXACT.get(key)
    if exact is None:
        whole = torch.mm(b, a)  # transient, once per shape
        block = scratch.get("delta", torch.float32, (max(e - s for s, e in blocks), n))
        exact = True
        for s, e in blocks:
            torch.mm(b[s:e], a, out=block[: e - s])
            if not torch.equal(block[: e - s], whole[s:e]):
                exact = False
                break
        del whole
        _BLOCKING_EXACT[key] = exact
    return exact


def _merged_into(
    scratch: _Scratch,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    slot: int = 0,
) -> torch.Tensor:
    """``merged_tensor`` for a linear weight, writing into reused buffers; same bits.

    PEFT adds the float32 update to a half-precision weight with a mixed-dtype in-place add;
    torch runs that add several times slower than upcasting the weight (exact) and adding
    float32 to float32, which computes the same float32 sums; the sum is then rounded once.
    Large weights go through in row blocks (see ``_row_blocks``); each step is still one torch
    call per block of ~0.5 M elements, so torch's per-call overhead stays small.
    """
    import torch

    m, n = b.shape[0], a.shape[1]
    blocks = None if fan_in_fan_out else _row_blocks(m, n)
    if blocks is not None and tuple(weight.shape) == (m, n) and _blocking_is_exact(scratch, a, b, blocks):
        out = scratch.get(f"out{slot}", weight.dtype, (m, n))
        rows = max(e - s for s, e in blocks)
        delta = scratch.get("delta", torch.float32, (rows, n))
        upcast = scratch.get("upcast", torch.float32, (rows, n)) if weight.dtype != torch.float32 else None
        for s, e in blocks:
            d = delta[: e - s]
            torch.mm(b[s:e], a, out=d)
            d.mul_(scaling)
            if upcast is None:
                torch.add(d, weight[s:e], out=out[s:e])
            else:
                u = upcast[: e - s]
                u.copy_(weight[s:e])  # bfloat16/float16 -> float32 is exact
                d.add_(u)
                out[s:e].copy_(d)  # the same round-to-nearest-even conversion as .to()
        return out
    # the buffer that is returned belongs to this ring slot; the others are free again once this returns
    delta = scratch.get(f"delta{slot}" if weight.dtype == torch.float32 else "delta", torch.float32, (m, n))
    torch.mm(b, a, out=delta)  # the same float32 matmul call as PEFT's
    if fan_in_fan_out:
        delta = delta.T
    _check_update_shape(delta, weight)
    # PEFT: ``weight += delta * scaling``. IEEE addition is commutative, so adding the weight into the
    # scaled float32 update gives the same float32 sums without touching the weight.
    delta.mul_(scaling)
    if weight.dtype == torch.float32:
        delta.add_(weight)  # float32 base: no upcast copy, and the update buffer is the output
        if delta.is_contiguous():
            return delta
    else:
        upcast = scratch.get("upcast", torch.float32, tuple(weight.shape))
        upcast.copy_(weight)  # bfloat16/float16 -> float32 is exact
        delta.add_(upcast)
    out = scratch.get(f"out{slot}", weight.dtype, tuple(weight.shape))
    out.copy_(delta)  # the same round-to-nearest-even conversion as .to()
    return out


def stream_merged_tensors(
    plan: StreamPlan,
    adapter: StreamingAdapter | None,
    out_dtype: str,
    *,
    cancel: CancelToken | None = None,
    reuse_buffers: bool = False,
    ring: int = 1,
    file_slices: bool = False,
) -> Iterator[tuple[str, torch.Tensor | FileSlice]]:
    """Yield ``(name, merged tensor)`` in ``plan`` order, one tensor in memory at a time.

    ``reuse_buffers``: yielded tensors live in buffers that the next tensor overwrites;
    only for a consumer that is done with each tensor before asking for the next (the writer).
    ``ring``: with reuse_buffers, how many yielded tensors stay valid at once (2: a yielded tensor
    is overwritten only when the next-but-one is requested, for a writer on another thread).
    ``file_slices``: a tensor the merge leaves unchanged (same dtype, no update) is yielded as a
    :class:`~lora_studio.core.io.safetensors_format.FileSlice` for the writer to copy file to file.
    """
    import torch

    target = getattr(torch, out_dtype)
    target_st = st_dtype(target)
    scratch = _Scratch() if reuse_buffers else None
    fds: dict[Path, int] = {}
    produced = 0
    try:
        for name, (path, info) in plan.sources.items():
            if cancel is not None:
                cancel.raise_if_cancelled()
            replacement = adapter.replacements.get(name) if adapter is not None else None
            update = adapter.updates.get(name) if adapter is not None else None
            if (
                file_slices
                and replacement is None
                and update is None
                and info.nbytes > 0
                and (info.dtype == target_st or info.dtype not in FLOAT_ST_DTYPES)
            ):
                yield name, FileSlice(Path(path), info.dtype, info.shape, info.begin, info.nbytes)
                continue
            slot = produced % max(1, ring)
            produced += 1
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            if replacement is not None:
                if tuple(replacement.shape) != info.shape:
                    raise UserError(
                        f"the adapter's {name} has shape {tuple(replacement.shape)}, the base's {info.shape}",
                        "the adapter was trained for another model or vocabulary",
                    )
                tensor = replacement.clone()
            elif scratch is not None and info.nbytes > 0:
                # a linear weight with an update is only an input (the output has its own buffer): one shared buffer
                only_input = update is not None and update[0] != "embedding"
                raw = scratch.get("read" if only_input else f"read{slot}", torch.uint8, (info.nbytes,))
                _pread_into(fd, info, path, raw)
                tensor = raw.view(torch_dtype(info.dtype)).view(info.shape)
            else:
                tensor = read_tensor(info, path, fd)
            if tensor.is_floating_point() and tensor.dtype != target:
                if scratch is not None and replacement is None:
                    cast = scratch.get(f"cast{slot}", target, info.shape)
                    cast.copy_(tensor)  # the same conversion as .to()
                    tensor = cast
                else:
                    tensor = tensor.to(target)
            if update is not None:
                kind, a, b, scaling = update
                fan_in_fan_out = adapter is not None and name in adapter.transposed
                with torch.no_grad():
                    if scratch is not None and kind != "embedding":
                        tensor = _merged_into(scratch, tensor, a, b, scaling, fan_in_fan_out, slot)
                    else:
                        tensor = merged_tensor(tensor, kind, a, b, scaling, fan_in_fan_out)
            yield name, tensor
            del tensor
    finally:
        for fd in fds.values():
            os.close(fd)


def tensor_dtype_name(st: str) -> str:
    return str(torch_dtype(st)).replace("torch.", "")
