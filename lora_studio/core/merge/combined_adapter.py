"""Save a weighted combination of LoRA adapters as an adapter folder, without merging it into the base.

``save_combination`` builds the combination with PEFT's ``add_weighted_adapter`` (on a loaded
session, or on a session loaded for the job from a base and adapter folders) and writes it
with PEFT's own ``save_pretrained``: a standard adapter folder that ``PeftModel.from_pretrained``
loads on the plain base. Like a merge it is written into a temporary sibling folder that
replaces ``out`` only at the end (core/io/atomic.py).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_studio.core.adapters import files as adapter_files
from lora_studio.core.adapters.combinations import (
    check_combination,
    check_members,
    member_from_config,
)
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_dir
from lora_studio.core.io.paths import check_output_apart
from lora_studio.core.merge.plan import AdapterSpec, base_dtype, input_paths
from lora_studio.core.merge.run import COMBINED_NAME
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    from lora_studio.core.session import Session

STEPS = 3  # load (or nothing, with a session), combine, save


@dataclass
class SavedCombination:
    out: Path
    combination: str
    rank: int
    adapters: list[tuple[str, float]]
    files: list[str]
    bytes_written: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "combination": self.combination,
            "rank": self.rank,
            "adapters": [{"name": n, "weight": w} for n, w in self.adapters],
            "files": self.files,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


def save_combination(
    session_or_source: Session | ModelSource,
    adapters: Sequence[str | AdapterSpec],
    weights: Sequence[float],
    combination_type: str,
    out: Path,
    *,
    density: float | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> SavedCombination:
    """Write the combination ``Σ weights × adapters`` (PEFT ``combination_type``) as the adapter folder ``out``.

    ``session_or_source``: a loaded Session holding the adapters by name (it is left as it was), or the base
    ModelSource, loaded for the job with the adapter folders of ``adapters`` (AdapterSpecs with paths) in
    ``dtype`` (default: the base's). Raises UserError before anything is loaded when the combination cannot work.
    """
    from lora_studio.core.session import Session

    cancel = cancel or CancelToken()
    started = time.perf_counter()
    names = [a if isinstance(a, str) else a.name for a in adapters]
    check_combination(names, list(weights), combination_type, density)
    if len(names) < 2:
        raise UserError("a combination needs two or more adapters", "tick two or more adapters")
    owned: Session | None = None
    if isinstance(session_or_source, Session):
        session = session_or_source
        missing = [n for n in names if n not in session.adapters]
        if missing:
            raise UserError(f"adapter {missing[0]!r} is not attached to the session", "attach it before combining")
        paths = [Path(session.adapters[n].path) for n in names]
    else:
        specs = [a for a in adapters if isinstance(a, AdapterSpec)]
        if len(specs) != len(names):
            raise UserError("adapter folders are needed to combine outside a session", "pass AdapterSpecs with paths")
        paths = [Path(a.path) for a in specs]
        session = None
    # a combination registered for Compare has no folder: PEFT checks it (add_combination checks the loaded configs)
    configs = [adapter_files.read_adapter_config(p) for p in paths] if all(p.is_dir() for p in paths) else []
    if configs:
        check_members([member_from_config(n, c) for n, c in zip(names, configs, strict=True)], combination_type)
    base = session_or_source if isinstance(session_or_source, ModelSource) else session_or_source.source
    members = [AdapterSpec(n, p) for n, p in zip(names, paths, strict=True)]
    check_output_apart(Path(out), input_paths(base, members))
    try:
        with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
            if session is None:
                source = session_or_source
                assert isinstance(source, ModelSource)
                owned = session = _load(source, list(zip(names, paths, strict=True)), dtype, cancel, report)
            cancel.raise_if_cancelled()
            report(Progress(1, STEPS, f"combining {len(names)} adapters ({combination_type})", "steps"))
            pairs = list(zip(names, (float(w) for w in weights), strict=True))
            with session.temporary_combination(COMBINED_NAME, pairs, combination_type, density) as name:
                cancel.raise_if_cancelled()
                report(Progress(2, STEPS, "saving the adapter", "steps"))
                with session.lock:
                    rank = int(session.model.peft_config[name].r)
                    scratch = tmp / ".peft"
                    # a non-default adapter is saved into scratch/<name>/; the embedding check stays off the network
                    session.model.save_pretrained(
                        str(scratch),
                        selected_adapters=[name],
                        save_embedding_layers=session.tokenizer_source is not None,
                    )
            saved = scratch / name if (scratch / name).is_dir() else scratch
            for f in saved.iterdir():
                shutil.move(str(f), tmp / f.name)
            shutil.rmtree(scratch)
            _note_base(tmp, configs)
            cancel.raise_if_cancelled()
            files = sorted(p.name for p in tmp.iterdir())
            written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
            report(Progress(STEPS, STEPS, "saved the adapter", "steps"))
    finally:
        if owned is not None:
            owned.close()
    return SavedCombination(
        Path(out).absolute(),
        combination_type,
        rank,
        pairs,
        files,
        written,
        time.perf_counter() - started,
    )


def _load(
    source: ModelSource, adapters: list[tuple[str, Path]], dtype: str | None, cancel: CancelToken, report: Report
) -> Session:
    from lora_studio.core.session import Session

    session = Session()
    try:
        dtype = dtype or base_dtype(source)
        report(Progress(0, STEPS, f"loading {source.label} in {dtype}", "steps"))
        session.load(source, dtype=dtype, cancel=cancel, report=report)
        for name, path in adapters:
            session.attach(path, name, cancel=cancel, report=report)
    except BaseException:
        session.close()
        raise
    return session


def _note_base(tmp: Path, configs: Sequence[adapter_files.AdapterConfig]) -> None:
    """The saved config names the base the adapters name (their hub id) when they agree, not a local path."""
    names = {c.base_model_name_or_path for c in configs}
    if len(names) != 1 or not configs:
        return
    (base,) = names
    path = tmp / "adapter_config.json"
    cfg = json.loads(path.read_text("utf-8"))
    if base and cfg.get("base_model_name_or_path") != base:
        cfg["base_model_name_or_path"] = base
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", "utf-8")
