"""A merge says what it is doing at every stage: the write, then each verification step, prompt by prompt."""

from __future__ import annotations

import pytest

from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
from lora_studio.core.merge import verify as verification
from lora_studio.core.model.sources import resolve_source
from lora_studio.core.session import Session
from lora_studio.core.tasks import Progress


def stages(reports: list[Progress]) -> list[str]:
    """The stages in the order they began."""
    return list(dict.fromkeys(p.stage for p in reports))


@pytest.mark.parametrize("engine", ["streaming", "in-memory"])
def test_verification_reports_each_prompt_with_its_stage(tiny_llama, llama_adapters, tmp_path, engine):
    reports: list[Progress] = []
    prompts = ("one", "two", "three")
    session = None
    if engine == "in-memory":
        session = Session()
        session.load(resolve_source(tiny_llama))
        session.attach(llama_adapters["alpha"], "alpha")
    try:
        merge_and_save(
            resolve_source(tiny_llama),
            [AdapterSpec("alpha", llama_adapters["alpha"])],
            MergeOptions(out=tmp_path / "out", engine=engine, verify_prompts=prompts, verify_tokens=2),
            session=session,
            report=reports.append,
        )
    finally:
        if session is not None:
            session.close()
    order = stages(reports)
    merging = order.index("merging tensor")
    reference = order.index(verification.REFERENCE_STAGE)
    loading = order.index(verification.LOADING_STAGE)
    merged = order.index(verification.MERGED_STAGE)
    assert merging < reference < loading < merged < order.index("verification pass") < order.index("finishing")
    for stage in (verification.REFERENCE_STAGE, verification.MERGED_STAGE):
        counted = [(p.done, p.total, p.unit) for p in reports if p.stage == stage and p.total is not None]
        assert counted == [(i, 3, "prompts") for i in range(4)]  # "verifying: running …: 2/3 prompts", prompt by prompt
    if engine == "streaming":  # the reference model is loaded for the check: said as part of verifying
        loads = [p.message for p in reports[reports.index(next(p for p in reports if p.stage == "merging tensor")) :]]
        assert any(m.startswith("verifying: loading") for m in loads)
