"""Adapters for mlx-lm, and from it, each checked in mlx-lm itself.

* ``mlx``: a PEFT adapter written as an mlx-lm adapter folder (core/adapters/mlx_format.py), for
  ``mlx_lm.load(BASE, adapter_path=DIR)``, ``mlx_lm.generate`` and ``mlx_lm.server`` on a Mac;
* ``peft``: an mlx-lm adapter folder written as a PEFT adapter, for transformers, vLLM and every other export here.

The check: the adapter model in PEFT (the session's, or one loaded for the job) greedily continues the verification
prompts; mlx-lm loads the base folder with the mlx-lm adapter (the one written, or the one read) in a worker process
and runs the same token sequences. Compared as a GGUF is in llama.cpp (core/export/verify.py): greedy agreement and
the top-k KL, with the thresholds of the base's dtype (float32: every token, KL ≤ 1e-4). mlx-lm reads Hugging Face
folders, so the base must be one (not a GGUF file). mlx is optional: without it the files are written and the
check says it was skipped, and how to install it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio import __version__
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.mlx_format import (
    MLX_WEIGHTS,
    is_mlx_adapter,
    mlx_origin,
    mlx_refusal,
    mlx_to_peft,
    peft_to_mlx,
)
from lora_studio.core.errors import UserError
from lora_studio.core.export import verify as export_verify
from lora_studio.core.export.bundle import ServingBundle, saved_rank, vllm_max_lora_rank
from lora_studio.core.export.request import (
    WORKING_SET,
    ExportPlan,
    ExportRequest,
    ExportResult,
    adapter_reference,
)
from lora_studio.core.io.atomic import atomic_output_dir
from lora_studio.core.io.paths import check_output_apart, free_disk
from lora_studio.core.merge.plan import AdapterSpec, base_dtype, input_paths
from lora_studio.core.model.config import read_config, with_top_level_rope_theta
from lora_studio.core.model.estimate import read_footprint
from lora_studio.core.model.identity import hub_id
from lora_studio.core.model.loading import load_tokenizer
from lora_studio.core.system.child_process import run_in_child_process
from lora_studio.core.system.installer import run_installer
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from lora_studio.core.session import Session

MLX_STAGE = "verifying: running the adapter in mlx-lm"
INSTALL_HINT = "install mlx-lm: pip install 'lora-studio[mlx]' (on Linux it brings mlx's CPU build)"
# what the window installs: the versions of requirements.lock (mlx's CPU build off a Mac, its Metal build on one)
MLX_LM_PIN, MLX_PIN = "mlx-lm==0.32.2", "mlx==0.32.4"
_DTYPE_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # the thresholds of the base's precision


def mlx_lm_version() -> str | None:
    """The installed mlx-lm's version, when it and mlx can be imported here (None: not installed)."""
    if importlib.util.find_spec("mlx_lm") is None or importlib.util.find_spec("mlx") is None:
        return None
    try:
        return importlib.metadata.version("mlx-lm")
    except importlib.metadata.PackageNotFoundError:
        return None


def install_command() -> list[str]:
    """pip installing mlx-lm and mlx into this Python (what the window runs in the background)."""
    mlx = MLX_PIN if sys.platform == "darwin" else MLX_PIN.replace("mlx==", "mlx[cpu]==")
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", MLX_LM_PIN, mlx]


def install_mlx(*, cancel: CancelToken, report: Report = no_report) -> str:
    """Install mlx-lm (and mlx) with pip, as a long job (Cancel kills pip); its version. The check runs mlx-lm in
    a worker process, so it works at once, without a restart."""
    run_installer(install_command(), "mlx-lm", cancel=cancel, report=report)
    version = mlx_lm_version()
    if version is None:
        raise UserError("pip reported success but mlx-lm is not importable", "see the log file")
    return version


def plan_mlx(request: ExportRequest) -> ExportPlan:
    """What the export needs (a few MB), or why it cannot start."""
    version = mlx_lm_version()
    request = _from_origin(request)

    def refused(reason: str, hint: str = "") -> ExportPlan:
        return ExportPlan(request.format, "f32", 0, 0, 0, None, 0, False, None, reason, hint)

    if request.adapter is None:
        return refused(f"an {_format_name(request)} export needs an adapter", "pass --adapter PATH")
    if request.source.gguf_file is not None:
        return refused(
            "mlx-lm loads Hugging Face folders; this base is a GGUF file",
            "open the base's Hugging Face folder, or export the adapter as a GGUF for llama.cpp (gguf-lora)",
        )
    try:
        adapters = [AdapterSpec(request.adapter_label or "", request.adapter)]
        check_output_apart(request.out, input_paths(request.source, adapters))
        if request.format == "mlx":
            if is_mlx_adapter(request.adapter):
                return refused(f"{Path(request.adapter).name} is already an mlx-lm adapter", "use it as it is")
            if reason := mlx_refusal(request.adapter):
                return refused(reason, "merge it into a Hugging Face folder instead, which mlx-lm loads")
            size = adapter_files.stored_values(request.adapter) * 4
        else:
            if not is_mlx_adapter(request.adapter):
                return refused(
                    f"{Path(request.adapter).name} is not an mlx-lm adapter (adapters.safetensors)",
                    "the peft format converts an mlx-lm adapter folder",
                )
            size = (Path(request.adapter) / MLX_WEIGHTS).stat().st_size
    except UserError as exc:
        return refused(exc.message, exc.hint)
    # the adapter model in PEFT, then the base again in mlx-lm (its own process): one at a time
    peak = read_footprint(request.source).params * 4 + WORKING_SET if request.verify else size * 4 + WORKING_SET
    free = free_disk(request.out)
    plan = ExportPlan(request.format, "f32", size, peak, size, free, 0, False, None)
    if version is None and request.verify:
        plan = replace(plan, hint=f"mlx-lm is not installed: the adapter is written without its check; {INSTALL_HINT}")
    return plan


def export_mlx(
    request: ExportRequest,
    *,
    session: Session | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> ExportResult:
    """Write the adapter for mlx-lm (``mlx``) or from it (``peft``) into ``request.out`` (a folder, atomically), check
    it in mlx-lm, and put a README with its serving lines in it."""
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    request = _from_origin(request)
    plan = plan_mlx(request)
    if plan.refusal:
        raise UserError(plan.refusal, plan.hint)
    assert request.adapter is not None  # plan_mlx refuses an export without one
    if session is not None and session.quantize is not None:
        session = None  # the adapter applies to the base in full precision: the reference is that, not its 4-bit
    out = Path(request.out).absolute()
    details: dict[str, Any] = {"plan": plan.to_json()}
    report(Progress(0, None, f"writing the {_format_name(request)} adapter"))
    with atomic_output_dir(out, overwrite=request.overwrite) as tmp:
        if request.format == "mlx":
            layers = _decoder_layers(read_config(request.source))
            label = hub_id(request.source) or str(request.source.path)
            details["mlx"] = peft_to_mlx(request.adapter, tmp, layers, base_label=label).to_json()
            peft_folder, mlx_folder = Path(request.adapter), tmp
        else:
            details["peft"] = mlx_to_peft(request.adapter, tmp)
            peft_folder, mlx_folder = tmp, Path(request.adapter)
            session = None  # the reference is the PEFT folder just written, attached for the job
        cancel.raise_if_cancelled()
        verification = _verify(request, peft_folder, mlx_folder, session, cancel, report)
        commands = serving_commands(request, out, mlx_folder if request.format == "peft" else out, tmp)
        (tmp / "README.md").write_text(_card(request, out, verification, commands, details), "utf-8")
    report(Progress(1, 1, f"export {verification.status}", "steps"))
    bytes_written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return ExportResult(
        out,
        request.format,
        "f32",
        bytes_written,
        time.perf_counter() - started,
        verification,
        ServingBundle(out, None, [], commands),
        details=details,
    )


def _from_origin(request: ExportRequest) -> ExportRequest:
    """For ``peft``: an adapter attached from an mlx-lm folder is given as its converted copy; the folder it came
    from is what is converted and checked."""
    if request.format == "peft" and request.adapter is not None and (origin := mlx_origin(request.adapter)):
        return replace(request, adapter=origin)
    return request


def serving_commands(request: ExportRequest, out: Path, mlx_folder: Path, written: Path) -> dict[str, str]:
    """Each runnable as given: mlx-lm with the adapter, and for a PEFT output vLLM's way. ``written``: the output's
    files as they are now (its temporary folder, before it is renamed to ``out``)."""
    q = shlex.quote
    base = q(str(request.source.path))
    adapter = q(str(mlx_folder))
    lines = {
        "mlx-lm": f'mlx_lm.generate --model {base} --adapter-path {adapter} --prompt "Hello"',
        "mlx-lm server": f"mlx_lm.server --model {base} --adapter-path {adapter} --port 8080",
        "mlx-lm in Python": "python -c "
        + q(
            f"from mlx_lm import load, generate; model, tokenizer = load({json.dumps(str(request.source.path))}, "
            f'adapter_path={json.dumps(str(mlx_folder))}); print(generate(model, tokenizer, prompt="Hello"))'
        ),
    }
    peft = out if request.format == "peft" else Path(request.adapter or out)
    merged = out.with_name(f"{out.name}-merged")
    lines["merged, for mlx_lm.load"] = (
        f"lora-studio merge {base} --adapter {q(str(peft))} --out {q(str(merged))} && "
        f'mlx_lm.generate --model {q(str(merged))} --prompt "Hello"'
    )
    if request.format == "peft":
        rank = vllm_max_lora_rank(saved_rank(written))
        lines["vllm"] = (
            f"vllm serve {hub_id(request.source) or base} --enable-lora --lora-modules "
            f"{q(request.adapter_label or out.name)}={q(str(out))} --max-lora-rank {rank}"
        )
    return lines


def _verify(
    request: ExportRequest,
    peft_folder: Path,
    mlx_folder: Path,
    session: Session | None,
    cancel: CancelToken,
    report: Report,
) -> export_verify.GgufVerification:
    type_name = _DTYPE_TYPES.get(base_dtype(request.source), "f32")
    if not request.verify:
        return export_verify.skipped(type_name, "not asked (--no-verify)")
    version = mlx_lm_version()
    if version is None:
        return export_verify.skipped(type_name, f"mlx-lm is not installed; {INSTALL_HINT}")
    reference = adapter_reference(replace(request, adapter=peft_folder), session, cancel, report)
    cancel.raise_if_cancelled()
    sequences = [[int(t) for t in seq] for seq in reference.sequences]
    first = reference.prompt_lengths[0]
    try:
        ran = run_in_child_process(
            run_in_mlx_lm,
            str(request.source.path),
            str(mlx_folder),
            sequences,
            first,
            len(sequences[0]) - first,
            cancel=cancel,
            report=report,
            name="lora-studio-mlx-check",
        )
    except UserError as exc:  # mlx-lm refused the base or the adapter: the check fails, saying why
        return export_verify.GgufVerification(
            "fail", type_name, runtime=f"mlx-lm ({version})", reason=exc.message, prompts=len(sequences)
        )
    runner = _Recorded(ran["logits"], ran["greedy"])
    outputs = export_verify.compare_outputs(runner, reference, cancel, report, MLX_STAGE)
    tokenizer = session.tokenizer if session is not None else load_tokenizer(request.source)
    sample = export_verify.sample_continuations(runner, reference, tokenizer, key="mlx_lm")
    verification = export_verify.verdict(type_name, outputs, None, len(sequences), f"mlx-lm ({version})", sample)
    if verification.status != "pass" and (hint := _config_hint(request)):
        verification = replace(verification, reason=f"{verification.reason}; {hint}".lstrip("; "))
    return verification


def run_in_mlx_lm(
    base: str,
    adapter: str,
    sequences: list[list[int]],
    prompt_length: int,
    new_tokens: int,
    *,
    cancel: CancelToken,
    report: Report,
) -> dict:
    """In a worker process: mlx-lm's logits of each sequence with the adapter, and its greedy continuation of the
    first prompt. mlx-lm's own refusals come back as one line."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    report(Progress(0, len(sequences), "verifying: loading the base and adapter in mlx-lm", "prompts"))
    try:
        model = load(base, adapter_path=adapter)[0]
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise UserError(f"mlx-lm could not load it: {' '.join(str(exc).split())[:300]}", "") from exc
    logits = []
    for done, seq in enumerate(sequences):
        cancel.raise_if_cancelled()
        report(Progress(done, len(sequences), MLX_STAGE, "prompts"))
        logits.append(np.array(model(mx.array([seq]))[0].astype(mx.float32)))
    tokens = list(sequences[0][:prompt_length])
    for _ in range(new_tokens):
        step = model(mx.array([tokens]))[0, -1]
        tokens.append(int(np.array(mx.argmax(step))))
    return {"logits": logits, "greedy": tokens[prompt_length:]}


class _Recorded:
    """mlx-lm's outputs, answered as the GGUF check's runner answers (core/export/verify.compare_outputs)."""

    def __init__(self, logits: list[Any], greedy: list[int]) -> None:
        self._logits = logits
        self._greedy = greedy
        self._next = 0

    def logits(self, tokens: list[int]) -> Any:
        out = self._logits[self._next]  # asked in the order they were run
        self._next += 1
        return out

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        return self._greedy[:new_tokens]  # the first prompt's, run in the worker


def _config_hint(request: ExportRequest) -> str:
    """mlx-lm reads a model's rotary base from ``rope_theta`` at the top of config.json; transformers 5 saves it
    inside ``rope_parameters`` only, and mlx-lm then takes its own default: the outputs differ from the base's."""
    config = read_config(request.source)
    if with_top_level_rope_theta(config) is not config:
        return (
            "the base's config.json keeps rope_theta only inside rope_parameters (as transformers 5 saves it), "
            "which this mlx-lm does not read: it runs the base with its default rotary base"
        )
    return ""


def _decoder_layers(config: dict) -> int:
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(layers, int) or layers <= 0:
        raise UserError("the base's config.json does not say how many decoder layers it has", "check the base folder")
    return layers


def _format_name(request: ExportRequest) -> str:
    return "mlx-lm" if request.format == "mlx" else "PEFT"


def _card(
    request: ExportRequest,
    out: Path,
    verification: export_verify.GgufVerification,
    commands: dict[str, str],
    details: dict,
) -> str:
    badge = verification.status.upper()
    what = "an mlx-lm adapter" if request.format == "mlx" else "a PEFT adapter converted from an mlx-lm adapter"
    lines = [
        f"# {out.name}",
        "",
        f"**Verification: {badge}** — {verification.summary()}",
        "",
        f"- {what}, of {request.adapter_label or Path(request.adapter or out).name}",
        f"- base: {hub_id(request.source) or request.source.path}",
        f"- written by LoRA Studio {__version__}",
    ]
    if (mlx := details.get("mlx")) is not None:
        lines.append(
            f"- {mlx['fine_tune_type']}, rank {mlx['rank']}, scale {mlx['scale']:g}, the last {mlx['num_layers']} "
            f"layers' {', '.join(mlx['keys'])}"
            + (f"; {mlx['padded']} modules zero-padded to rank {mlx['rank']}" if mlx["padded"] else "")
            + (f"; {mlx['folded']} modules' scaling folded into lora_b" if mlx["folded"] else "")
        )
    if verification.sample:
        s = verification.sample
        lines += [
            "",
            f"Greedy continuation of “{s['prompt']}”:",
            "",
            f"- adapter model (transformers + PEFT): “{' '.join(s['adapter'].split())}”",
            f"- mlx-lm with the adapter: “{' '.join(s['mlx_lm'].split())}”",
        ]
    lines += ["", "## Commands", ""]
    for label, line in commands.items():
        lines += [f"{label}:", "", "```sh", line, "```", ""]
    return "\n".join(lines)
