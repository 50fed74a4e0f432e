"""Merge LoRA adapters into their base and save a deployable model folder.

``merge_and_save`` plans the merge (core/merge/plan.py: it refuses before anything
starts when it cannot be done) and runs one of two engines that give the same bits
as PEFT's ``merge_and_unload``:

* streaming (core/merge/streaming.py): base safetensors -> output shards one tensor
  at a time; memory is about one tensor plus the adapter; the default where it applies
  (a safetensors base, one adapter, plain LoRA/rsLoRA/Conv1D/embeddings).
* in-memory (core/merge/in_memory.py): PEFT's own per-layer merge on a loaded
  PeftModel (a session's, or one loaded for the job), for DoRA, lora_bias, weighted
  combinations, GGUF bases and ``safe_merge``.

Everything is written into a temporary sibling folder that replaces ``out`` only at
the end (core/io/atomic.atomic_output_dir): a cancel, crash or full disk leaves
no output folder. The config, tokenizer and model card come from
core/merge/outputs.py. The saved folder is then verified against the adapter model
and the result recorded in its README.md model card.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio import __version__
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir
from lora_studio.core.io.page_cache import read_ahead
from lora_studio.core.io.safetensors_format import DTYPE_SIZES
from lora_studio.core.io.shard_writer import write_state_dict
from lora_studio.core.merge import outputs, quantized
from lora_studio.core.merge import verify as verification_mod
from lora_studio.core.merge.plan import (
    AdapterSpec,
    EngineName,
    MergeOptions,
    base_config,
    full_precision_source,
    merge_quantization,
    plan_merge,
)
from lora_studio.core.model.config import tied_embeddings
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch

    from lora_studio.core.io.safetensors_format import FileSlice
    from lora_studio.core.session import Session

COMBINED_NAME = "lora_studio_combined"  # the weighted combination a merge builds on a session, for the job only


@dataclass
class MergeResult:
    out: Path
    engine: EngineName
    dtype: str
    files: list[str]
    bytes_written: int
    seconds: float
    verification: verification_mod.Verification | None
    provenance: dict = field(default_factory=dict)
    quantized_base: quantized.MergeTarget | None = None  # an adapter trained on a quantised base: what was chosen

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "engine": self.engine,
            "dtype": self.dtype,
            "files": self.files,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "verification": self.verification.to_json() if self.verification else None,
            "quantized_base": self.quantized_base.to_json() if self.quantized_base else None,
        }


def merge_and_save(
    source: ModelSource,
    adapters: Sequence[AdapterSpec],
    options: MergeOptions,
    *,
    session: Session | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> MergeResult:
    """Merge ``adapters`` into ``source`` and save the model folder ``options.out``; verify it unless told not to.

    With ``session`` (a loaded Session holding these adapters, by name), the in-memory
    engine merges that model without changing it, and it is the verification reference.
    """
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    source, options, quantised_source, saved_compute = full_precision_source(source, options)
    if quantised_source is not None:
        session = None  # merged from the full-precision folder, loaded for the job
    options, session, compute_dtype = _quantised_base(options, adapters, session)
    compute_dtype = saved_compute or compute_dtype
    plan = plan_merge(source, adapters, options, session=session)
    if plan.refusal:
        raise UserError(plan.refusal, plan.refusal_hint)
    engine, dtype = plan.engine, plan.dtype
    assert engine is not None  # a plan without a refusal names its engine
    if session is not None:
        missing = [a.name for a in adapters if a.name not in session.adapters]
        if missing:
            raise UserError(f"adapter {missing[0]!r} is not attached to the session", "attach it before merging")
    provenance = outputs.provenance(source, adapters, options, engine, dtype)
    owned = None  # a session this job loaded itself (freed at the end)
    target = None
    try:
        # ``selection`` gives the session back its own selection (and drops a combination built here) at the end
        with ExitStack() as selection, atomic_output_dir(Path(options.out), overwrite=options.overwrite) as tmp:
            if engine == "in-memory" and session is None:
                owned = session = _load_session(source, adapters, dtype, cancel, report, resize=plan.resize_vocabulary)
            name = None
            if session is not None:  # the adapter (or combination) to merge is selected: it is the reference
                name = _select_adapter(session, adapters, options, selection)
            if options.quantize is not None:  # QLoRA: the session's quantised layers get the chosen weights
                assert session is not None and name is not None  # a quantised-base merge is in-memory
                target = quantized.choose_merge_target(
                    session,
                    source,
                    adapters[0].path,
                    name,
                    options.quantize,  # type: ignore[arg-type]  # checked by plan_merge
                    compute_dtype or dtype,
                    options.merge_into or "auto",  # type: ignore[arg-type]  # checked by plan_merge
                    options.verify_prompts,
                    options.verify_tokens,
                    quantised_source=quantised_source,
                    cancel=cancel,
                    report=report,
                )
                provenance["quantized_base"] = target.to_json()
            if engine == "streaming":
                files, written = _run_streaming(source, adapters[0], dtype, tmp, options, cancel, report)
                outputs.write_config_from_folder(source, tmp, dtype)
            else:
                assert session is not None and name is not None  # the in-memory engine always has a session
                files, written = _run_in_memory(session, name, dtype, tmp, options, cancel, report)
                outputs.write_config_from_model(session.base_model(), source, tmp, dtype)
            outputs.copy_tokenizer(source, tmp, session if engine == "in-memory" else None)
            cancel.raise_if_cancelled()
            verification = None
            if options.verify:
                verification = _verify(source, adapters, options, dtype, tmp, session, cancel, report)
            provenance["verification"] = verification.to_json() if verification else None
            outputs.write_model_card(tmp, provenance, options.out)
            cancel.raise_if_cancelled()
            report(Progress(1, 1, "finishing", "steps"))
    finally:
        if owned is not None:
            owned.close()
    return MergeResult(
        Path(options.out).absolute(),
        engine,
        dtype,
        files,
        written,
        time.perf_counter() - started,
        verification,
        provenance,
        target,
    )


def _quantised_base(
    options: MergeOptions, adapters: Sequence[AdapterSpec], session: Session | None
) -> tuple[MergeOptions, Session | None, str | None]:
    """The options with the quantisation the adapter learned on (asked, the session's, or the adapter's own record),
    the session to merge, and the compute dtype. A quantised-base merge never uses the caller's session: one loaded
    quantised would be merged re-quantised, and a full-precision one would have its layers' weights replaced while
    the candidates are measured; the job loads the base itself."""
    quantize, compute_dtype = merge_quantization(options, adapters, session)
    if quantize is None:
        return options, session, None
    return replace(options, quantize=quantize), None, compute_dtype


def _run_streaming(
    source: ModelSource,
    adapter: AdapterSpec,
    dtype: str,
    tmp: Path,
    options: MergeOptions,
    cancel: CancelToken,
    report: Report,
) -> tuple[list[str], int]:
    import torch

    from lora_studio.core.merge.streaming import load_streaming_adapter, stream_merged_tensors, stream_plan

    sp = stream_plan(source.path, dtype)
    config = base_config(source)
    loaded = load_streaming_adapter(adapter.path, sp.sources, tied_embeddings(config), config.get("model_type"))
    if adapter.weight != 1.0:  # a single adapter's scale, as PEFT's set_scale applies it
        loaded.updates = {t: (kind, a, b, s * adapter.weight) for t, (kind, a, b, s) in loaded.updates.items()}
    targeted = set(loaded.updates)
    check = dtype == "float16"

    def checked() -> Iterator[tuple[str, torch.Tensor | FileSlice]]:
        for name, t in stream_merged_tensors(
            sp, loaded, dtype, cancel=cancel, reuse_buffers=True, ring=2, file_slices=True
        ):
            # fp16 can overflow where the float32 sum did not: never write Inf silently
            # (bfloat16 and float32 share float32's range: a finite base plus a finite update stays finite);
            # a targeted tensor is merged, so it comes as a tensor (only untouched ones come as FileSlices)
            if check and name in targeted and isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                raise UserError(
                    f"merging {adapter.name} puts NaN/Inf into {name} in {dtype}",
                    "merge in bfloat16 or float32 instead",
                )
            yield name, t

    # ring=2 + background: tensor i is written on a second thread while tensor i+1 is read and merged.
    # direct: this engine is for models too big to hold, where copying the output into the page cache costs
    # as much CPU as the merge; the in-memory engine's output goes through the cache, where its verification
    # reads it back.
    return _write(tmp, checked(), sp.out_plan, options, report, background=True, direct=True)


def _write(
    tmp: Path,
    tensors: Iterator[tuple[str, torch.Tensor | FileSlice]],
    out_plan: dict[str, tuple[str, tuple[int, ...]]],
    options: MergeOptions,
    report: Report,
    background: bool = False,
    direct: bool = False,
) -> tuple[list[str], int]:
    total = sum(DTYPE_SIZES[d] * _numel(s) for d, s in out_plan.values())
    count = len(out_plan)
    state = {"bytes": 0, "tensors": 0}

    def on_tensor(name: str, n: int) -> None:
        state["bytes"] += n
        state["tensors"] += 1
        report(Progress(state["bytes"], total, f"merging tensor {state['tensors']}/{count}", "bytes"))

    report(Progress(0, total, f"merging tensor 0/{count}", "bytes"))
    paths = write_state_dict(
        tmp,
        tensors,
        out_plan,
        max_shard_bytes=options.max_shard_bytes,
        on_tensor=on_tensor,
        metadata={"merged_by": f"lora-studio {__version__}"},
        background=background,
        direct=direct,
    )
    return [p.name for p in paths], state["bytes"]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _verifying(report: Report) -> Report:
    """``report`` with "verifying: " before each message: the reference model loaded for a verification."""

    def prefixed(progress: Progress) -> None:
        report(replace(progress, message=f"verifying: {progress.message}", stage=""))

    return prefixed


def _load_session(
    source: ModelSource,
    adapters: Sequence[AdapterSpec],
    dtype: str,
    cancel: CancelToken,
    report: Report,
    resize: bool = False,
) -> Session:
    from lora_studio.core.session import Session

    session = Session()
    try:
        report(Progress(0, None, f"loading {source.label} in {dtype}"))
        session.load(source, dtype=dtype, cancel=cancel, report=report)
        for a in adapters:
            session.attach(a.path, a.name, resize_embeddings=resize, cancel=cancel, report=report)
    except BaseException:
        session.close()
        raise
    return session


def _select_adapter(
    session: Session, adapters: Sequence[AdapterSpec], options: MergeOptions, selection: ExitStack
) -> str:
    """Select the adapter to merge (building the weighted combination first) until ``selection`` ends; its name."""
    if options.combination is None:
        name = adapters[0].name
        selection.enter_context(session.scale_selected(name, adapters[0].weight))
    else:
        name = selection.enter_context(
            session.temporary_combination(
                COMBINED_NAME, [(a.name, a.weight) for a in adapters], options.combination, options.density
            )
        )
    # entered after the combination, so left before it: PEFT warns when the active adapter is deleted
    selection.enter_context(session.variant_selected(name))
    return name


def _run_in_memory(
    session: Session, name: str, dtype: str, tmp: Path, options: MergeOptions, cancel: CancelToken, report: Report
) -> tuple[list[str], int]:
    from lora_studio.core.merge.in_memory import InMemoryPlan

    with session.lock:
        plan = InMemoryPlan(session.model, name, dtype if dtype != session.dtype else None)
        return _write(tmp, plan.tensors(safe_merge=options.safe_merge, cancel=cancel), plan.shapes(), options, report)


def _verify(
    source: ModelSource,
    adapters: Sequence[AdapterSpec],
    options: MergeOptions,
    dtype: str,
    tmp: Path,
    session: Session | None,
    cancel: CancelToken,
    report: Report,
) -> verification_mod.Verification:
    """Reference outputs from the adapter model, then the saved folder loaded plainly and compared."""
    from lora_studio.core.session import release_memory

    read_ahead(tmp)  # streamed shards were written past the page cache: read them back while the reference runs
    report(Progress(0, None, verification_mod.REFERENCE_STAGE))
    owned = None
    if session is None:  # streaming without a session: load base + adapter just for the reference
        owned = session = _load_session(source, adapters, dtype, cancel, _verifying(report))
        session.activate(adapters[0].name)
        if options.combination is None:
            session.set_scale(adapters[0].name, adapters[0].weight)
    try:
        with session.lock:
            ref = verification_mod.reference_outputs(
                session.model, session.tokenizer, options.verify_prompts, options.verify_tokens, cancel, report
            )
            device = session.device or "cpu"
    finally:
        if owned is not None:
            owned.close()  # free the reference before loading the merged model: one model in memory at a time
    release_memory()
    cancel.raise_if_cancelled()
    merged = verification_mod.load_merged(
        tmp, dtype, device_map=device if device.startswith("cuda") else "cpu", cancel=cancel, report=report
    )
    try:
        result = verification_mod.compare(merged, ref, dtype, cancel, report)
    finally:
        del merged
        release_memory()
    report(Progress(1, 1, f"verification {result.status}", "steps"))
    return result
