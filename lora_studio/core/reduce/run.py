"""Writing a reduced adapter, and measuring what the cut costs.

For a module with ΔW = s·B·A: with Aᵀ = Q_a R_a and B = Q_b R_b, ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ; the SVD of the
r×r core, U Σ Vᵀ, gives ΔW's SVD (Q_b U) Σ (Q_a V)ᵀ without building ΔW. Rank k keeps the k largest singular
values, split evenly between the new factors: B' = Q_b U_k √(Σ_k/s'), A' = √(Σ_k/s') V_kᵀ Q_aᵀ, where s' is
the reduced adapter's own scaling (lora_alpha = the new r, no rsLoRA), so s'·B'A' is the truncated ΔW.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio import __version__
from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir
from lora_studio.core.io.card_format import front_matter
from lora_studio.core.io.hashing import file_sha256
from lora_studio.core.io.paths import check_output_apart, inside, regular_file
from lora_studio.core.reduce.spectrum import RankPlan, rank_text, read_plan
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import torch

    from lora_studio.core.evaluate.datasets import EvalSet
    from lora_studio.core.evaluate.run import EvaluationResult
    from lora_studio.core.session import Session

CARD_NAME = "README.md"
# files an adapter folder may carry besides its weights: the tokenizer when training changed the vocabulary
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ReducedAdapter:
    out: Path
    source: str
    source_path: Path
    mode: str  # "rank" | "energy"
    target: float  # the rank asked for, or the energy share
    ranks: dict[str, int]
    r_before: int
    r_after: int
    params_before: int
    params_after: int
    energy_kept: float  # share of the adapter's total energy (all modules)
    worst_module: tuple[str, float]  # the module keeping the least energy, and its share
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "reduction",
            "out": str(self.out),
            "source": self.source,
            "source_path": str(self.source_path),
            "mode": self.mode,
            "target": self.target,
            "r_before": self.r_before,
            "r_after": self.r_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "energy_kept": self.energy_kept,
            "worst_module": {"module": self.worst_module[0], "energy": self.worst_module[1]},
            "ranks": self.ranks,
            "files": self.files,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


def truncate(
    a: torch.Tensor, b: torch.Tensor, scaling: float, k: int, new_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') of rank k with new_scaling·B'·A' = the best rank-k approximation of scaling·B·A."""
    import torch

    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    q_a, r_a = torch.linalg.qr(a64.T, mode="reduced")
    q_b, r_b = torch.linalg.qr(b64, mode="reduced")
    u, sigma, vh = torch.linalg.svd(scaling * (r_b @ r_a.T))
    root = torch.sqrt(sigma[:k] / new_scaling)
    new_b = (q_b @ u[:, :k]) * root
    new_a = root[:, None] * (vh[:k] @ q_a.T)
    return new_a.to(a.dtype).contiguous(), new_b.to(b.dtype).contiguous()


def reduce_adapter(
    adapter: Path | RankPlan,
    out: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base_path: Path | None = None,
    overwrite: bool = False,
    inputs: Mapping[str, Path | None] | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> ReducedAdapter:
    """Write ``adapter`` cut to ``rank`` (every module, never above its own) or to the smallest per-module ranks
    keeping ``energy`` of each module's update, as the standard PEFT adapter folder ``out`` (never over the adapter,
    the base or the other ``inputs`` of the job, such as the data its cost is measured on)."""
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    plan = adapter if isinstance(adapter, RankPlan) else read_plan(Path(adapter))
    ranks = plan.ranks(rank=rank, energy=energy)
    check_output_apart(Path(out), {"adapter": plan.path, "base": base_path, **(inputs or {})})
    tensors = adapter_files.load_tensors(plan.path)
    r_after = max(ranks.values())
    by_module = {m.module: m for m in plan.modules}
    reduced: dict[str, Any] = {}
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        for i, (module, k) in enumerate(ranks.items()):
            cancel.raise_if_cancelled()
            report(Progress(i, len(ranks), f"cutting {module} to rank {k}", "modules"))
            keys = plan.keys[module]
            assert keys.a is not None and keys.b is not None
            spectrum = by_module[module]
            new_a, new_b = truncate(tensors[keys.a], tensors[keys.b], spectrum.scaling, k, r_after / k)
            reduced[keys.a], reduced[keys.b] = new_a, new_b
        for key, tensor in tensors.items():  # biases, modules_to_save, trainable tokens: unchanged
            reduced.setdefault(key, tensor)
        report(Progress(len(ranks), len(ranks), "saving the adapter", "modules"))
        from safetensors.torch import save_file

        save_file(
            {adapter_files.PEFT_PREFIX + k: v for k, v in reduced.items()},
            str(tmp / adapter_files.SAFETENSORS_NAME),
            metadata={"format": "pt"},
        )
        (tmp / adapter_files.CONFIG_NAME).write_text(
            json.dumps(_config(plan, ranks, r_after), indent=2, sort_keys=True) + "\n", "utf-8"
        )
        _copy_tokenizer(plan.path, tmp)
        result = ReducedAdapter(
            Path(out).absolute(),
            plan.name,
            plan.path,
            "rank" if rank is not None else "energy",
            float(rank if rank is not None else energy),  # type: ignore[arg-type]
            ranks,
            plan.r,
            r_after,
            plan.params,
            plan.params_kept(ranks),
            plan.energy_kept(ranks),
            plan.least_kept(ranks),
        )
        (tmp / adapter_files.SIDECAR_NAME).write_text(json.dumps(_sidecar(plan, result), indent=2) + "\n", "utf-8")
        (tmp / CARD_NAME).write_text(card(plan, result), "utf-8")
        result.files = sorted(p.name for p in tmp.iterdir())
        result.bytes_written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    result.seconds = time.perf_counter() - started
    return result


def _config(plan: RankPlan, ranks: dict[str, int], r_after: int) -> dict[str, Any]:
    config = dict(plan.config.raw)
    config.update(
        r=r_after,
        lora_alpha=r_after,  # scaling 1 at the new r; rank_pattern modules get r/k, folded into their factors
        use_rslora=False,
        rank_pattern={module: k for module, k in ranks.items() if k != r_after},
        alpha_pattern={},
        init_lora_weights=True,  # the factors are final: nothing to initialise (or convert) on load
        inference_mode=True,
    )
    for key in ("eva_config", "corda_config", "loftq_config"):
        config.pop(key, None)
    return config


def _copy_tokenizer(source: Path, tmp: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(regular_file(inside(source, name, "tokenizer file"), "tokenizer file"), tmp / name)


def _sidecar(plan: RankPlan, result: ReducedAdapter) -> dict[str, Any]:
    from lora_studio.core.evaluate.datasets import default_set_for

    record: dict[str, Any] = {
        "tool": f"lora-studio {__version__} reduce",
        "init_lora_weights": "default",
        "reduced_from": {
            "adapter": plan.name,
            "path": str(plan.path),
            "sha256": file_sha256(adapter_files.weights_file(plan.path)),
            "mode": result.mode,
            "target": result.target,
            "r_before": result.r_before,
            "energy_kept": result.energy_kept,
        },
    }
    val = default_set_for(plan.path)  # evaluations of the reduced adapter default to the original's data
    if val is not None:
        record["data"] = {"val_file": str(val.absolute())}
    return record


def card(plan: RankPlan, result: ReducedAdapter) -> str:
    """The reduced adapter's README: where it came from and what the cut kept."""
    if result.mode == "rank":
        cut = f"rank {int(result.target)}"
    else:
        cut = f"{100 * result.target:g} % of each module's energy"
    uniform = len(set(result.ranks.values())) == 1
    lines = front_matter(
        base_model=plan.config.base_model_name_or_path,
        library_name="peft",
        license=None,
        tags=["lora", "lora-studio", "rank-reduced"],
    )
    lines += [
        "",
        f"# {Path(result.out).name}",
        "",
        f"The LoRA adapter **{plan.name}** cut from rank {result.r_before} to "
        f"{'rank' if uniform else 'ranks up to'} {result.r_after}"
        f" ({cut}) by a truncated SVD of each module's update ΔW = s·B·A, with LoRA Studio {__version__}.",
        "",
        "| | original | reduced |",
        "|---|---|---|",
        f"| rank | {result.r_before} | {rank_text(result.ranks)} |",
        f"| parameters | {result.params_before:,} | {result.params_after:,} "
        f"({100 * result.params_after / max(1, result.params_before):.0f} %) |",
        f"| energy of ΔW kept | 100 % | {100 * result.energy_kept:.2f} % |",
        "",
        f"The module keeping the least: `{result.worst_module[0]}`, {100 * result.worst_module[1]:.2f} % of its energy "
        f"(relative error of its ΔW: {100 * max(0.0, 1 - result.worst_module[1]) ** 0.5:.1f} %).",
        "",
        "## Source",
        "",
        f"- adapter: `{plan.path}`",
        f"- weights sha256: `{file_sha256(adapter_files.weights_file(plan.path))}`",
        f"- base: `{plan.config.base_model_name_or_path or 'not recorded'}`",
        "",
        "It loads like any PEFT adapter (`PeftModel.from_pretrained(base, folder)`) on the same base; "
        "modules at other ranks than `r` are listed in `rank_pattern`.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ReductionCost:
    """What the cut costs on the data: the reduced adapter against the original (and the base, for scale)."""

    kl: float  # mean per-token KL(original ‖ reduced)
    delta_loss: float  # reduced − original, nats per token
    delta_ci: tuple[float, float] | None
    loss_original: float
    loss_reduced: float
    loss_base: float | None
    tokens: int

    @property
    def clear(self) -> bool:
        """Whether the Δloss interval excludes 0: the cut clearly changed the loss."""
        return self.delta_ci is not None and (self.delta_ci[0] > 0 or self.delta_ci[1] < 0)

    @property
    def gain_kept(self) -> float | None:
        """The share of the adapter's loss improvement over the base that the reduced adapter keeps."""
        if self.loss_base is None or abs(self.loss_base - self.loss_original) < 1e-9:
            return None
        return (self.loss_base - self.loss_reduced) / (self.loss_base - self.loss_original)

    @classmethod
    def of(cls, result: EvaluationResult, original: str, reduced: str) -> ReductionCost:
        cut, orig = result.overall(reduced), result.overall(original)
        base = next((s for s in result.summary if s.name == "base" and s.dataset is None), None)
        ci = cut.delta_ci
        return cls(
            float(cut.kl or 0.0),
            float(cut.delta_loss or 0.0),
            None if ci is None else (ci.low, ci.high),
            orig.loss,
            cut.loss,
            None if base is None else base.loss,
            cut.tokens,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "delta_loss": self.delta_loss,
            "delta_ci": None if self.delta_ci is None else list(self.delta_ci),
            "loss_original": self.loss_original,
            "loss_reduced": self.loss_reduced,
            "loss_base": self.loss_base,
            "gain_kept": self.gain_kept,
            "tokens": self.tokens,
        }

    def sentence(self) -> str:
        ci = "" if self.delta_ci is None else f" (95 % CI {self.delta_ci[0]:+.4f} … {self.delta_ci[1]:+.4f})"
        gain = ""
        if self.gain_kept is not None:
            gain = f"; keeps {100 * self.gain_kept:.0f} % of the adapter's gain over the base"
        return f"KL from the original {self.kl:.4f} nats/token, Δloss {self.delta_loss:+.4f}{ci}{gain}"


def reduction_cost(
    session: Session,
    original: str,
    reduced: str,
    sets: Sequence[EvalSet],
    *,
    with_base: bool = True,
    bootstrap_samples: int | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> EvaluationResult:
    """Score the original and the reduced adapter (both attached to ``session``), and the base, on ``sets`` in
    one mixed batch, with the original as the reference: the reduced column's KL and Δloss are what the cut
    costs."""
    from lora_studio.core.compare import Variant
    from lora_studio.core.evaluate import stats
    from lora_studio.core.evaluate.run import evaluate

    for name in (original, reduced):
        if name not in session.adapters:
            raise UserError(f"adapter {name!r} is not attached", "attach the original and the reduced adapter")
    columns = ([Variant.base()] if with_base else []) + [Variant.of_adapter(original), Variant.of_adapter(reduced)]
    return evaluate(
        session,
        columns,
        sets,
        reference=original,
        bootstrap_samples=stats.BOOTSTRAP_SAMPLES if bootstrap_samples is None else bootstrap_samples,
        cancel=cancel,
        report=report,
    )
