"""The GPU half of LoRA Studio, for real: one short script, a JSON line last.

On a machine with an NVIDIA GPU and a CUDA build of torch it checks, in this order:
  1. NVML sampling (the memory panel's backend) beside torch's allocator, before and after a 1 GiB allocation;
  2. the demo model (SmolLM2-135M-Instruct) loaded on ``cuda:0`` in bfloat16 through the Session;
  3. attach / switch / detach of the demo adapters, with the memory that came back after detaching;
  4. a mixed-batch compare (base + adapters in one batch) against the same variants run one by one (time ratio);
  5. a streaming and an in-memory merge of the pirate adapter (time, verification);
  6. a training job (LoRA, the demo pirate data) on the GPU: tokens/s, and the pre-start memory estimate against
     torch's measured peak;
  7. a QLoRA job (the demo in NF4 through bitsandbytes, a paged 8-bit AdamW on the GPU) and the merge of its adapter
     with the measured choice of target weights (both candidates' KL, the verification);
  8. the window's memory panel under ``QT_QPA_PLATFORM=offscreen`` showing the GPU's curve and label.

Without a GPU it says so on stderr, prints ``{"gpu": false, ...}`` and exits 0. ``--device cpu`` runs checks 2-8
on the CPU instead (no NVML): a rehearsal of the script before device time is spent on it.

    .venv/bin/python benchmarks/gpu_check.py [--tokens 32] [--rounds 3] [--train-steps 30] [--device cpu] [--json]
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


def allocated(device: str) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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


def session_checks(result: dict, device: str, tokens: int, rounds: int, tmp: Path) -> None:
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
    session.load(source, dtype="bfloat16", device_map=device)
    result["load_s"] = round(time.perf_counter() - t, 2)
    result["device"] = session.device
    result["allocated_after_load_gib"] = gib(allocated(device))
    for name, path in adapters.items():
        session.attach(path, name)
    session.activate(next(iter(adapters)))
    result["allocated_with_adapters_gib"] = gib(allocated(device))
    last = list(adapters)[-1]
    before = allocated(device)
    session.delete(last)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    result["detach_freed_mib"] = round((before - allocated(device)) / 2**20, 2)
    session.attach(adapters[last], last)

    variants = [Variant.base(), *[Variant.of_adapter(n) for n in adapters]]
    prompts = ["Tell me about the sea.", "List three fruits.", "Write a SQL query that counts users."]
    settings = GenerationSettings(max_new_tokens=tokens)
    mixed, sequential = [], []
    for _ in range(rounds):
        for flag, times in ((True, mixed), (False, sequential)):
            synchronize(device)
            t = time.perf_counter()
            compare(session, variants, prompts, settings, mixed=flag, score=False)
            synchronize(device)
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
    result["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else None
    session.close()


def train_check(result: dict, device: str, steps: int, tmp: Path) -> None:
    """A LoRA run on the demo pirate data: speed, the loss, and the estimate against what torch allocated."""
    import torch
    from transformers import AutoTokenizer

    from lora_studio.core.demo import model
    from lora_studio.core.train import TrainRequest, TrainSettings, prepare, train_adapter
    from lora_studio.core.train.estimate import training_memory

    data = Path(__file__).resolve().parents[1] / "resources" / "demo" / "data" / "pirate.train.jsonl"
    source = model.ensure_demo_model()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    settings = TrainSettings(
        r=8, init="olora", max_steps=steps, batch_size=4, dtype=dtype, device=device, val_fraction=0.1, eval_steps=10
    )
    longest = max(len(e.input_ids) for e in prepare(data, AutoTokenizer.from_pretrained(source.path)).train)
    estimate = training_memory(source, settings, longest_row=longest)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    done = train_adapter(TrainRequest(source, data, tmp / "trained-pirate", settings))
    seconds = time.perf_counter() - t
    record = done.lora
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    on_device = estimate.on_device  # the rest (the libraries, the loading pages) is host RAM
    result["train"] = {
        "steps": steps,
        "dtype": dtype,
        "init": settings.init,
        "s": round(seconds, 2),
        "tokens_per_s": round(record.tokens / record.seconds, 1),
        "first_train_loss": next((r["train_loss"] for r in record.rows if r.get("train_loss") is not None), None),
        "last_train_loss": record.last_train_loss,
        "best_val_loss": record.best_val_loss,
        "estimate_gib": gib(estimate.total),
        "estimate_on_device_gib": gib(on_device),
        "estimate_verdict": estimate.verdict,
        "peak_allocated_gib": gib(peak) if peak is not None else None,
        "estimate_on_device_vs_peak": round(on_device / peak, 3) if peak else None,
        "adapter_saved": (done.adapter / "adapter_model.safetensors").is_file(),
    }


def qlora_check(result: dict, device: str, steps: int, tmp: Path) -> None:
    """A QLoRA run (the demo in NF4 through bitsandbytes' CUDA kernels, a paged 8-bit AdamW): speed, the loss, the
    estimate against what torch allocated, and the merge's measured choice of target weights."""
    import torch

    from lora_studio.core.demo import model
    from lora_studio.core.merge import AdapterSpec, MergeOptions, merge_and_save
    from lora_studio.core.train import TrainRequest, TrainSettings, train_adapter
    from lora_studio.core.train.estimate import training_memory

    data = Path(__file__).resolve().parents[1] / "resources" / "demo" / "data" / "pirate.train.jsonl"
    source = model.ensure_demo_model()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    settings = TrainSettings(r=8, max_steps=steps, batch_size=4, dtype=dtype, device=device, quantize="nf4")
    estimate = training_memory(source, settings)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    done = train_adapter(TrainRequest(source, data, tmp / "qlora-pirate", settings))
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    record = done.lora
    merged = merge_and_save(source, [AdapterSpec("qlora", done.adapter)], MergeOptions(tmp / "qlora-merged"))
    target = merged.quantized_base
    result["qlora"] = {
        "steps": steps,
        "dtype": dtype,
        "tokens_per_s": round(record.tokens / record.seconds, 1),
        "last_train_loss": record.last_train_loss,
        "estimate_on_device_gib": gib(estimate.on_device),
        "peak_allocated_gib": gib(peak) if peak is not None else None,
        "merge_kl": target.kl if target else None,
        "merge_chosen": target.chosen if target else None,
        "merge_verification": merged.verification.status if merged.verification else None,
    }


def window_check(result: dict) -> None:
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from lora_studio.gui.base.settings import StudioSettings
    from lora_studio.gui.window.main_window import MainWindow

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


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "nvidia-ml-py", "PySide6-Essentials"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["python"] = sys.version.split()[0]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--device", default="cuda:0", help="cpu: rehearse checks 2-7 on the CPU (no NVML)")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    args = parser.parse_args()
    device = args.device

    from lora_studio.core.model.loading import offline_environment

    offline_environment()
    import torch

    result: dict = {"gpu": torch.cuda.is_available(), "torch": torch.__version__, "requested_device": device}
    if device.startswith("cuda") and not result["gpu"]:
        sys.stderr.write("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check\n")
        print(json.dumps(result))
        return 0
    result["gpu_name"] = torch.cuda.get_device_name(0) if result["gpu"] else None
    result["versions"] = versions()
    checks = (
        ("nvml", lambda: nvml_check(result) if device.startswith("cuda") else None),
        ("session", lambda: session_checks(result, device, args.tokens, args.rounds, Path(tmp.name))),
        ("train", lambda: train_check(result, device, args.train_steps, Path(tmp.name))),
        ("qlora", lambda: qlora_check(result, device, args.train_steps, Path(tmp.name))),
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
