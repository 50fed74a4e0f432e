"""The GPU half of LoRA Studio, for real: one short script, a JSON line last.

On a machine with an NVIDIA GPU and a CUDA build of torch it checks, in this order:
  1. NVML sampling (the memory panel's backend) beside torch's allocator, before and after a 1 GiB allocation;
  2. the demo model (SmolLM2-135M-Instruct) loaded on ``cuda:0`` in bfloat16 through the Session;
  3. attach / switch / detach of the demo adapters, with the memory that came back after detaching;
  4. a mixed-batch compare (base + adapters in one batch) against the same variants run one by one (time ratio);
  5. a streaming and an in-memory merge of the pirate adapter (time, verification);
  6. the window's memory panel under ``QT_QPA_PLATFORM=offscreen`` showing the GPU's curve and label.

Without a GPU it says so on stderr, prints ``{"gpu": false, ...}`` and exits 0.

    .venv/bin/python benchmarks/gpu_check.py [--tokens 32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def nvml_check(result: dict) -> None:
    import torch

    from lora_studio.core.system.memory import MemorySampler

    sampler = MemorySampler()
    result["nvml_gpus"] = sampler.gpu_names()
    before = sampler.sample()
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda:0")  # 1 GiB
    torch.cuda.synchronize()
    during = sampler.sample()
    del block
    torch.cuda.empty_cache()
    after = sampler.sample()
    result["nvml"] = {
        "gpu0_used_gib": [gib(s.gpus[0].used_bytes) for s in (before, during, after)] if before.gpus else None,
        "torch_allocated_gib": [gib(s.torch_cuda[0].allocated_bytes) for s in (before, during, after)]
        if before.torch_cuda
        else None,
        "saw_1gib": bool(before.gpus and during.gpus[0].used_bytes - before.gpus[0].used_bytes >= 0.9 * 2**30),
    }
    sampler.close()


def session_checks(result: dict, tokens: int, rounds: int, tmp: Path) -> None:
    import torch

    from lora_studio.core.compare import Variant, compare
    from lora_studio.core.demo import assets, model
    from lora_studio.core.generation.generate import GenerationSettings
    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
    from lora_studio.core.session import Session

    source = model.ensure_demo_model()
    adapters = {a.name: a.path for a in assets.demo_adapters()}
    session = Session()
    t = time.perf_counter()
    session.load(source, dtype="bfloat16", device_map="cuda:0")
    result["load_s"] = round(time.perf_counter() - t, 2)
    result["device"] = session.device
    result["allocated_after_load_gib"] = gib(torch.cuda.memory_allocated(0))
    for name, path in adapters.items():
        session.attach(path, name)
    session.activate(next(iter(adapters)))
    result["allocated_with_adapters_gib"] = gib(torch.cuda.memory_allocated(0))
    last = list(adapters)[-1]
    before = torch.cuda.memory_allocated(0)
    session.delete(last)
    torch.cuda.empty_cache()
    result["detach_freed_mib"] = round((before - torch.cuda.memory_allocated(0)) / 2**20, 2)
    session.attach(adapters[last], last)

    variants = [Variant.base(), *[Variant.of_adapter(n) for n in adapters]]
    prompts = ["Tell me about the sea.", "List three fruits.", "Write a SQL query that counts users."]
    settings = GenerationSettings(max_new_tokens=tokens)
    mixed, sequential = [], []
    for _ in range(rounds):
        for flag, times in ((True, mixed), (False, sequential)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            compare(session, variants, prompts, settings, mixed=flag, score=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    result["compare"] = {
        "variants": len(variants),
        "prompts": len(prompts),
        "tokens": tokens,
        "mixed_s": [round(x, 3) for x in mixed],
        "sequential_s": [round(x, 3) for x in sequential],
        "ratio_median": round(statistics.median(m / s for m, s in zip(mixed, sequential, strict=True)), 3),
    }

    merges = {}
    for engine in ("streaming", "in-memory"):
        out = tmp / f"merged-{engine}"
        t = time.perf_counter()
        merged = merge_and_save(
            source,
            [AdapterSpec("pirate", adapters["pirate"])],
            MergeOptions(out=out, engine=engine, dtype="bfloat16"),
            session=session,
        )
        verification = merged.verification
        merges[engine] = {
            "s": round(time.perf_counter() - t, 2),
            "engine": merged.engine,
            "verification": verification.summary() if verification else None,
            "verified": bool(verification and verification.status == "pass"),
            "bytes_written": merged.bytes_written,
        }
    result["merge"] = merges
    result["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(0))
    session.close()


def window_check(result: dict) -> None:
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from lora_studio.gui.main_window import MainWindow
    from lora_studio.gui.settings import StudioSettings

    with tempfile.TemporaryDirectory() as tmp:
        window = MainWindow(settings=StudioSettings(Path(tmp) / "window.ini"))
        window.show()
        loop = QEventLoop()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (window.memory_panel.plot is None or not window.runner.is_idle()):
            QTimer.singleShot(50, loop.quit)
            loop.exec()
        QTimer.singleShot(1500, loop.quit)  # a few samples
        loop.exec()
        curves = window.memory_panel.curve_names()
        result["window"] = {
            "platform": app.platformName(),
            "curves": curves,
            "gpu_curve": any("gpu" in c.lower() for c in curves),
        }
        window.shutdown()
        window.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    args = parser.parse_args()

    from lora_studio.core.model.loading import offline_environment

    offline_environment()
    import torch

    result: dict = {"gpu": torch.cuda.is_available(), "torch": torch.__version__}
    if not result["gpu"]:
        sys.stderr.write("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check\n")
        print(json.dumps(result))
        return 0
    result["gpu_name"] = torch.cuda.get_device_name(0)
    checks = (
        ("nvml", lambda: nvml_check(result)),
        ("session", lambda: session_checks(result, args.tokens, args.rounds, Path(tmp.name))),
        ("window", lambda: window_check(result)),
    )
    tmp = tempfile.TemporaryDirectory()
    failures = {}
    for name, check in checks:
        t = time.perf_counter()
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - report every check, then the JSON line
            failures[name] = f"{type(exc).__name__}: {exc}"[:500]
        sys.stderr.write(f"gpu_check: {name} {time.perf_counter() - t:.1f} s\n")
    tmp.cleanup()
    result["failures"] = failures
    result["passed"] = not failures
    print(json.dumps(result))
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
