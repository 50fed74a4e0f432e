"""``lora-studio reduce ADAPTER --rank K|--energy 0.95 --out DIR``: cut an adapter's rank by a truncated SVD.

``--plan`` prints each module's spectrum summary and the suggested ranks without writing anything. With a base
(``--base`` or ``--demo``) the reduced adapter is scored against the original on the data (``--data``, default:
the adapter's validation set or the demo sets): KL, Δloss with its 95 % interval, and the share of the
adapter's gain over the base that is kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.cli.common import (
    SubParsers,
    add_max_memory_argument,
    add_quantize_argument,
    load_base,
    output_path,
    print_json,
    stderr_progress,
    table,
)
from lora_studio.core.errors import UserError
from lora_studio.core.model.dtypes import DTYPES

if TYPE_CHECKING:
    from lora_studio.core.evaluate.datasets import EvalSet
    from lora_studio.core.reduce import RankPlan, ReducedAdapter, ReductionCost
    from lora_studio.core.session import Session
    from lora_studio.core.tasks import Report


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("reduce", help="cut an adapter to a lower rank (truncated SVD) and measure what it costs")
    p.add_argument("adapter", help="the LoRA adapter folder")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--rank", type=int, metavar="K", help="one rank for every module (never above its own)")
    what.add_argument(
        "--energy", type=float, metavar="E", help="per module, the smallest rank keeping this share, e.g. 0.95"
    )
    what.add_argument("--plan", action="store_true", help="print the spectra and suggested ranks; write nothing")
    p.add_argument("--out", metavar="DIR", help="the reduced adapter's folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--base", metavar="PATH", help="the base model, to measure the cost on data")
    p.add_argument("--demo", action="store_true", help="the embedded demo model is the base")
    p.add_argument("--data", action="append", default=[], metavar="FILE", help="data to measure on (repeatable)")
    p.add_argument("--limit", type=int, metavar="N", help="the first N rows of each file only")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to measure in (default float32)")
    add_quantize_argument(p, "measure on the base")
    add_max_memory_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lora_studio.core.reduce import read_plan, reduce_adapter
    from lora_studio.core.session import adapter_name_for

    adapter = Path(args.adapter).expanduser()
    if args.plan and args.out:
        raise UserError("--plan writes nothing", "drop --out, or drop --plan to write the reduced adapter")
    if args.data and not (args.base or args.demo):
        raise UserError("--data measures the cost on a base model", "add --base PATH or --demo, or drop --data")
    plan = read_plan(adapter, name=adapter_name_for(adapter))
    if args.plan:
        if args.json:
            print_json({"kind": "rank_plan", **plan.to_json()})
        else:
            print(render_plan(plan.to_json()))
        return 0
    if args.rank is None and args.energy is None:
        raise UserError("say how far to cut: --rank K or --energy E", f"e.g. --energy 0.95; --plan shows {plan.name}'s")
    if not args.out:
        raise UserError("no --out folder given", "name the reduced adapter's folder, e.g. --out bullets-r4")
    out = output_path(args.out)
    if args.base and args.demo:
        raise UserError("give either --base or --demo, not both", "drop one of them")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1", "e.g. --limit 32")
    base_path = Path(args.base).expanduser() if args.base else None
    progress = stderr_progress()
    from lora_studio.core.session import Session

    session: Session | None = Session() if (args.base or args.demo) else None
    try:
        # what the cost is measured on is loaded and checked first: a wrong base or data is said before the
        # reduced adapter is written
        sets = _measured_on(args, plan, session, progress) if session is not None else None
        result = reduce_adapter(
            plan,
            out,
            rank=args.rank,
            energy=args.energy,
            base_path=base_path,
            overwrite=args.overwrite,
            inputs={f"data file {n + 1}": Path(d).expanduser() for n, d in enumerate(args.data)},
            report=progress,
        )
        cost = _measure(session, plan, result, sets, progress) if session is not None and sets else None
    finally:
        progress.done()
        if session is not None:
            session.close()
    doc: dict[str, Any] = result.to_json()
    doc["suggestions"] = [s.to_json() for s in plan.suggestions()]
    doc["cost"] = None if cost is None else cost.to_json()
    if args.json:
        print_json(doc)
    else:
        print(render_result(doc, cost))
        if cost is None:
            print("(give --base or --demo to measure the cost on data)")
    return 0


def _measured_on(args: argparse.Namespace, plan: RankPlan, session: Session, progress: Report) -> list[EvalSet]:
    """The base loaded, the data read and the adapter attached to it: every check of the measurement's inputs."""
    from lora_studio.cli.common import resolve_base
    from lora_studio.core.evaluate import datasets

    data = [Path(d).expanduser() for d in args.data] or datasets.default_sets([plan.path])
    source = resolve_base(args, report=progress)
    load_base(session, source, args, progress)
    sets = datasets.load_eval_sets(
        data, session.tokenizer, limit=args.limit, max_length=datasets.max_length_for(session.model)
    )
    session.attach(plan.path, plan.name, report=progress)
    return sets


def _measure(
    session: Session, plan: RankPlan, result: ReducedAdapter, sets: list[EvalSet], progress: Report
) -> ReductionCost:
    from lora_studio.core.reduce import ReductionCost, reduction_cost

    reduced = f"{plan.name}-reduced"
    session.attach(result.out, reduced, report=progress)
    return ReductionCost.of(reduction_cost(session, plan.name, reduced, sets, report=progress), plan.name, reduced)


def render_plan(doc: dict[str, Any]) -> str:
    out = [f"{doc['name']}: rank {doc['r']}, {len(doc['modules'])} modules, {doc['params']:,} parameters", ""]
    rows = [
        [
            f"{100 * s['energy']:g} %",
            str(s["uniform_rank"]),
            f"{s['uniform_params']:,}",
            f"≤ {s['per_module_max_rank']}",
            f"{s['per_module_params']:,}",
        ]
        for s in doc["suggestions"]
    ]
    out.append(table(rows, ["energy kept", "one rank", "parameters", "per-module ranks", "parameters"]))
    out.append("")
    curve = ", ".join(f"{k}: {100 * e:.1f}%" for k, e in enumerate(doc["uniform_energy"], start=1))
    out.append(f"energy kept at each uniform rank — {curve}")
    return "\n".join(out)


def render_result(doc: dict[str, Any], cost: ReductionCost | None) -> str:
    from lora_studio.core.reduce.spectrum import rank_text

    worst = doc["worst_module"]
    out = [
        f"{doc['source']}: rank {doc['r_before']} → {rank_text(doc['ranks'])}, "
        f"{doc['params_before']:,} → {doc['params_after']:,} parameters "
        f"({100 * doc['params_after'] / max(1, doc['params_before']):.0f} %)",
        f"energy of ΔW kept: {100 * doc['energy_kept']:.2f} % "
        f"(least: {worst['module']}, {100 * worst['energy']:.2f} %)",
        f"saved: {doc['out']}",
    ]
    if cost is not None:
        out.append(f"on {cost.tokens} answer tokens: {cost.sentence()}")
    return "\n".join(out)
