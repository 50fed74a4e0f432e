"""Does a quantised GGUF still carry the adapter? Per adapted tensor, the file against the base exported alone.

A LoRA update is small beside its weight, and quantising the merged weight can round most of it away: the file
then says "merged" while it is almost the base (re-quantising after a merge left 80 % of 4-bit codes unchanged in
mflux PR #668). This measures what survived, tensor by tensor, without writing the base's file:

* the base tensor as the file would hold it when exported alone: read through llama.cpp's converter (its names and
  transforms, ``merged.converter_for``), rounded through the type the converter wrote (f16/bf16 before llama.cpp's
  quantiser) and quantised by ggml to the type the file holds for that tensor (``quantize_rows``, the function
  llama.cpp's quantiser calls, row by row);
* the merged tensor made the same way must give the file's own bytes (the reproduction check; a tensor that does
  not is left out, named);
* the intended update ΔW in the file's layout, in float32: the converter's transform of PEFT's merge minus the base.

Reported per tensor: the share of weights with a non-zero update whose quantised value changed against the base,
the correlation of that realised change with ΔW, and its gain along ΔW (round-to-nearest passes a small update on
in expectation, as flipped codes, so the gain stays near 1 while the correlation falls: the change is then mostly
rounding noise). A tensor under either floor is washed out; the result names
such tensors and a higher type. Large tensors are measured on evenly spaced rows (quantisation works row by row).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from lora_studio.core.merge.streaming import StreamingAdapter

MEASURING_STAGE = "measuring the adapter in the quantised file"
CORRELATION_FLOOR = 0.5  # realised change against ΔW
CHANGED_FLOOR = 0.2  # share of updated weights whose quantised value moved
MEASURED_ELEMENTS = 1 << 20  # per tensor; more rows than that are sampled evenly
# bits per weight of each tensor type a file holds, and the output types to suggest in their order: a washed-out
# tensor needs a type above its own (a K-quant file writes rows that do not fill 256-wide blocks as q5_0 or q8_0)
TYPE_BITS = {"q2_k": 2, "q3_k": 3, "q4_0": 4, "q4_1": 4, "q4_k": 4, "q5_0": 5, "q5_1": 5, "q5_k": 5, "q6_k": 6}
TYPE_BITS |= {"q8_0": 8, "bf16": 16, "f16": 16}
HIGHER_TYPES = (("q6_k", 6), ("q8_0", 8), ("f16", 16), ("f32", 32))

Status = Literal["carried", "washed out", "not measured"]


@dataclass(frozen=True)
class CarriedTensor:
    name: str  # the GGUF tensor
    type: str  # its type in the file
    rows_measured: int
    rows: int
    changed_share: float  # of the measured weights with a non-zero update, the share whose quantised value changed
    correlation: float  # of the realised change (file − base alone, dequantised) with ΔW
    gain: float  # the realised change's component along ΔW: 1 = the whole update on average, 0 = none of it

    @property
    def washed_out(self) -> bool:
        return self.correlation < CORRELATION_FLOOR or self.changed_share < CHANGED_FLOOR


@dataclass(frozen=True)
class CarriedAdapter:
    type: str
    tensors: list[CarriedTensor]
    left_out: dict[str, str] = field(default_factory=dict)  # tensor -> why it was not measured
    reason: str = ""  # why nothing was measured

    @property
    def washed_out(self) -> list[CarriedTensor]:
        return [t for t in self.tensors if t.washed_out]

    @property
    def status(self) -> Status:
        if not self.tensors:
            return "not measured"
        return "washed out" if self.washed_out else "carried"

    @property
    def suggestion(self) -> str | None:
        """The smallest output type above every washed-out tensor's own type in this file."""
        if self.status != "washed out":
            return None
        bits = max(TYPE_BITS.get(t.type, 16) for t in self.washed_out)
        return next((name for name, higher in HIGHER_TYPES if higher > bits), None)

    def median(self, attribute: str) -> float | None:
        values = sorted(getattr(t, attribute) for t in self.tensors)
        if not values:
            return None
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2

    def summary(self) -> str:
        if self.status == "not measured":
            return f"the adapter's share in the file was not measured: {self.reason or 'no adapted tensor'}"
        figures = (
            f"median correlation with ΔW {self.median('correlation'):.2f}, median "
            f"{self.median('changed_share'):.0%} of updated weights changed, over {len(self.tensors)} tensors"
        )
        if self.status == "carried":
            return f"the {self.type} file carries the adapter: {figures}"
        washed = sorted(self.washed_out, key=lambda t: t.correlation)  # the least carried named first
        names = ", ".join(t.name for t in washed[:4]) + (f" and {len(washed) - 4} more" if len(washed) > 4 else "")
        higher = f"; try {self.suggestion}" if self.suggestion else ""
        return (
            f"in {len(washed)} of {len(self.tensors)} tensors of the {self.type} file the update is mostly rounded "
            f"away or drowned in rounding noise ({names}); {figures}{higher}"
        )

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "type": self.type,
            "summary": self.summary(),
            "suggestion": self.suggestion,
            "floors": {"correlation": CORRELATION_FLOOR, "changed_share": CHANGED_FLOOR},
            "median_correlation": self.median("correlation"),
            "median_changed_share": self.median("changed_share"),
            "washed_out": [t.name for t in self.washed_out],
            "tensors": [asdict(t) for t in self.tensors],
            "left_out": self.left_out,
            "reason": self.reason,
        }

    def table(self) -> list[str]:
        """The per-tensor table, as Markdown lines (for the card)."""
        lines = [
            "| tensor | type | rows measured | updated weights changed | correlation with ΔW | gain along ΔW |",
            "|---|---|---|---|---|---|",
        ]
        for t in sorted(self.tensors, key=lambda t: t.correlation):  # the least carried first
            mark = " ⚠" if t.washed_out else ""
            lines.append(
                f"| `{t.name}`{mark} | {t.type} | {t.rows_measured}/{t.rows} | {t.changed_share:.0%} | "
                f"{t.correlation:.3f} | {t.gain:.2f} |"
            )
        return lines


def not_measured(type_name: str, reason: str) -> CarriedAdapter:
    return CarriedAdapter(type_name, [], reason=reason)


def measure_carried(
    gguf_file: Path,
    base_folder: Path,
    adapter: StreamingAdapter,
    dtype: str,
    written: str,
    type_name: str,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> CarriedAdapter:
    """How much of ``adapter`` the GGUF ``gguf_file`` (``base_folder`` + adapter merged in ``dtype``, written by the
    converter as ``written``, then quantised to ``type_name`` when they differ) carries."""
    import gguf
    import torch

    from lora_studio.core._compat.ggml_quantize import quantize_rows
    from lora_studio.core.errors import UserError
    from lora_studio.core.export.converter import conversion
    from lora_studio.core.export.merged import converter_for, merge_fn
    from lora_studio.core.merge.streaming import merged_tensor

    cancel = cancel or CancelToken()
    if type_name == "f32":
        return not_measured(type_name, "float32 keeps every bit of the merged weights")
    try:
        quantize_rows(torch.zeros(1, 32).numpy(), gguf.GGMLQuantizationType.Q8_0)
    except OSError as exc:
        return not_measured(type_name, f"ggml's quantiser is not loadable ({exc})")
    try:
        file_tensors = _tensor_index(Path(gguf_file))
    except (OSError, AttributeError) as exc:
        return not_measured(type_name, f"ggml's GGUF reader is not loadable ({exc})")
    converter = converter_for(base_folder, written)
    to_eager = conversion().LazyTorchTensor.to_eager
    out_dtype = getattr(torch, dtype)
    stage = {"f16": torch.float16, "bf16": torch.bfloat16}.get(written) if written != type_name else None
    measured: list[CarriedTensor] = []
    left_out: dict[str, str] = {}
    count = len(adapter.updates)
    for index, (target, update) in enumerate(adapter.updates.items()):
        cancel.raise_if_cancelled()
        report(Progress(index, count, f"{MEASURING_STAGE} {index + 1}/{count}", "tensors"))
        try:
            name = converter.converter_name(target, converter.model_tensors)
        except UserError:
            left_out[target] = "llama.cpp's converter leaves it out"
            continue
        transposed = target in adapter.transposed
        base = to_eager(converter.model_tensors[name]())
        merged = merge_fn(update, transposed, out_dtype)(base)
        kind, a, b, scaling = update
        intended = merged_tensor(torch.zeros(base.shape, dtype=torch.float32), kind, a, b, scaling, transposed)
        outputs = [converter.converted(t.to(torch.float32), name) for t in (base, merged, intended)]
        del base, merged, intended
        shapes = [[(n, tuple(t.shape)) for n, t in produced] for produced in outputs]
        if not shapes[0] or shapes[0] != shapes[1] or shapes[0] != shapes[2]:
            left_out[target] = "llama.cpp's converter combines it with other tensors"
            continue
        for (gguf_name, base_t), (_, merged_t), (_, intended_t) in zip(*outputs, strict=True):
            found = file_tensors.get(gguf_name)
            if found is None or base_t.dim() != 2:
                left_out[gguf_name] = "not a 2-D tensor of the file"
                continue
            if found.data.size % base_t.shape[0]:
                left_out[gguf_name] = "the file holds it in another layout"
                continue
            try:
                result = _measure_tensor(gguf_name, found, base_t, merged_t, intended_t, stage, quantize_rows)
            except (ValueError, RuntimeError, IndexError, NotImplementedError) as exc:  # a type gguf-py cannot read
                result = f"not measured ({type(exc).__name__}: {str(exc)[:80]})"
            if isinstance(result, str):
                left_out[gguf_name] = result
            else:
                measured.append(result)
    report(Progress(count, count, f"{MEASURING_STAGE} {count}/{count}", "tensors"))
    return CarriedAdapter(type_name, measured, left_out, "" if measured else "no adapted tensor could be measured")


@dataclass(frozen=True)
class _FileTensor:
    """One tensor of the written file: its type and its rows' bytes (mapped, not read)."""

    tensor_type: int  # ggml's type number (gguf.GGMLQuantizationType)
    data: Any  # its bytes, a numpy uint8 view of the mapped file


def _tensor_index(path: Path) -> dict[str, _FileTensor]:
    """Every 2-D tensor of a GGUF by name, through ggml's own GGUF reader (gguf-py's builds every field of the
    header in Python: seconds for a 49k-token vocabulary), its data mapped from the file."""
    import ctypes

    import numpy as np

    from lora_studio.core._compat.ggml_quantize import ggml_base

    lib = ggml_base()

    class InitParams(ctypes.Structure):  # gguf.h: struct gguf_init_params {bool no_alloc; ggml_context ** ctx;}
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for name, restype in (
        ("gguf_get_n_tensors", ctypes.c_int64),
        ("gguf_get_data_offset", ctypes.c_size_t),
        ("gguf_get_tensor_name", ctypes.c_char_p),
        ("gguf_get_tensor_offset", ctypes.c_size_t),
        ("gguf_get_tensor_type", ctypes.c_int),
        ("gguf_get_tensor_size", ctypes.c_size_t),
    ):
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = [ctypes.c_void_p] + ([ctypes.c_int64] if "tensor_" in name else [])
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    context = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    if not context:
        raise OSError(f"ggml cannot read {path.name}")
    try:
        data_offset = lib.gguf_get_data_offset(context)
        entries = [
            (
                lib.gguf_get_tensor_name(context, i).decode(),
                lib.gguf_get_tensor_type(context, i),
                lib.gguf_get_tensor_offset(context, i),
                lib.gguf_get_tensor_size(context, i),
            )
            for i in range(lib.gguf_get_n_tensors(context))
        ]
    finally:
        lib.gguf_free(context)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    return {
        name: _FileTensor(kind, mapped[data_offset + offset : data_offset + offset + size])
        for name, kind, offset, size in entries
    }


def _measure_tensor(
    name: str,
    found: Any,
    base: Any,
    merged: Any,
    intended: Any,
    stage: Any,
    quantize_rows: Any,
) -> CarriedTensor | str:
    """One tensor's figures, or why it is left out."""
    import gguf
    import numpy as np
    import torch

    qtype = gguf.GGMLQuantizationType(found.tensor_type)
    if qtype == gguf.GGMLQuantizationType.F32:
        return "kept in float32 by the file"
    rows, width = base.shape
    picked = _rows_to_measure(rows, width)

    def as_written(t: Any) -> Any:
        t = t[picked]
        if stage is not None:  # the converter's f16/bf16 file, which llama.cpp's quantiser read
            t = t.to(stage)
        return t.to(torch.float32).numpy()

    try:
        base_codes = quantize_rows(as_written(base), qtype)
        merged_codes = quantize_rows(as_written(merged), qtype)
    except OSError as exc:
        return f"ggml's quantiser is not loadable ({exc})"
    by_row = found.data.reshape(rows, -1)
    if by_row.shape[1] != merged_codes.shape[1]:
        return "the file holds it in another layout"
    file_codes = np.ascontiguousarray(by_row[picked])
    if not np.array_equal(file_codes, merged_codes):
        return "its bytes in the file could not be reproduced"
    realised = (
        gguf.quants.dequantize(file_codes, qtype).astype(np.float64)
        - gguf.quants.dequantize(base_codes, qtype).astype(np.float64)
    ).reshape(-1)
    delta = intended[picked].to(torch.float64).numpy().reshape(-1)
    updated = delta != 0
    changed = float((realised[updated] != 0).mean()) if updated.any() else 0.0
    return CarriedTensor(
        name,
        qtype.name.lower(),
        len(picked),
        rows,
        changed,
        _correlation(realised, delta),
        float(np.dot(realised, delta) / max(float(np.dot(delta, delta)), 1e-300)),
    )


def _rows_to_measure(rows: int, width: int) -> list[int]:
    wanted = max(1, MEASURED_ELEMENTS // max(width, 1))
    if rows <= wanted:
        return list(range(rows))
    step = rows / wanted
    return sorted({int(i * step) for i in range(wanted)})


def _correlation(x: Any, y: Any) -> float:
    """Pearson's correlation; 0 when either side is constant (nothing changed, or no update)."""
    import numpy as np

    x = x - x.mean()
    y = y - y.mean()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norm == 0 or not math.isfinite(norm):
        return 0.0
    return float(np.dot(x, y) / norm)
