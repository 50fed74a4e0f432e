"""Merged GGUF export: LoRA Studio's streaming export vs the seed recipe followed by llama.cpp's converter.

The model is bench_merge.py's synthetic TinyLlama-shaped one (~1.1B parameters, bfloat16, random weights)
with its rank-16 adapter on every linear layer, but with the demo model's tokenizer (SmolLM2's, 49152
tokens), because llama.cpp's converter refuses a tokenizer it does not recognise. Each path runs in its own
child processes, in the same run, interleaved over ``--repeat`` rounds:

* seed + convert: bench_merge's seed recipe (PEFT ``merge_and_unload``, ``save_pretrained``), then llama.cpp's
  own ``convert_hf_to_gguf.py --outtype TYPE`` on the saved folder, from the llama-cpp-python source
  distribution (taken from pip's cache, or downloaded once); its time is the sum of both, its peak RSS the
  larger of the two;
* studio: ``lora_studio.core.export.export_gguf`` (streaming, no verification).

``identical``: both GGUFs hold the same tensors (names, types, shapes and bytes), per output type.

Last line (JSON): {"type", "seed_convert_s", "seed_convert_peak_rss_mb", "studio_s", "studio_peak_rss_mb",
"time_ratio", "rss_ratio", "identical", "spread", "rounds", "params", ...}. Targets: time_ratio <= 0.5,
rss_ratio <= 0.25, identical for f16 and q8_0.

    .venv/bin/python benchmarks/bench_export.py [--small] [--json] [--keep DIR] [--repeat N] [--type q8_0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge

ROOT = bench_merge.ROOT
SDIST = "llama-cpp-python==0.3.36"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def log(msg: str) -> None:
    sys.stderr.write(f"[bench_export] {msg}\n")
    sys.stderr.flush()


def converter(work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, vendored in the llama-cpp-python source distribution."""
    script = work / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = work / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", download],
        check=True,
    )
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(download, filter="data")
    vendored = next(download.glob("llama_cpp_python-*/vendor/llama.cpp"))
    shutil.move(str(vendored), work / "llama.cpp")
    return script


CONVERT = (
    bench_merge.PEAK
    + """
import json, os, runpy, sys, time
script, folder, out, outtype = sys.argv[1:5]
sys.argv = [script, folder, "--outtype", outtype, "--outfile", out]
sys.path.insert(0, os.path.dirname(script))  # its conversion package and vendored gguf-py, as `python script` has
t = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": peak_rss_mb()}))
"""
)

STUDIO = (
    bench_merge.PEAK
    + """
import json, sys, time
from pathlib import Path
from lora_studio.core.model.loading import offline_environment
offline_environment()
import torch, gguf  # imported before timing, as the seed recipe's are
from lora_studio.core.export import ExportRequest, export_gguf
from lora_studio.core.model.sources import resolve_source
base, adapter, out, type_name = sys.argv[1:5]
t = time.perf_counter()
r = export_gguf(ExportRequest(resolve_source(base), Path(out), "gguf", type_name, adapter=Path(adapter), verify=False))
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": peak_rss_mb(), "bytes": r.bytes_written}))
"""
)


def same_tensors(a: Path, b: Path) -> bool:
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    if set(ta) != set(tb):
        log(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
        return False
    for name, x in ta.items():
        y = tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape) or bytes(x.data) != bytes(y.data):
            log(f"tensor {name} differs ({x.tensor_type.name} {list(x.shape)} vs {y.tensor_type.name} {list(y.shape)})")
            return False
    return True


def demo_tokenizer() -> Path:
    from lora_studio.core.demo.model import ensure_demo_model

    return ensure_demo_model().path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~50M-parameter model, for a quick smoke run")
    ap.add_argument("--json", action="store_true", help="only the JSON line on stdout (it is printed last either way)")
    ap.add_argument("--keep", help="build in this folder and keep it (reused by later runs with the same DIR)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of both paths, interleaved (default 3)")
    ap.add_argument("--type", default="q8_0", help="the timed output type (default q8_0)")
    ap.add_argument("--identity-types", default="f16,q8_0", help="types whose tensors are compared between both paths")
    args = ap.parse_args()
    dims = dict(bench_merge.SMALL if args.small else bench_merge.FULL, vocab_size=49152)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    rounds = []
    identical: dict[str, bool] = {}
    try:
        script = converter(work)
        marker = work / "built.json"
        if args.keep and marker.is_file() and json.loads(marker.read_text()).get("dims") == dims:
            base, adapter, params = work / "base", work / "adapter", json.loads(marker.read_text())["params"]
        else:
            for sub in ("base", "adapter"):
                shutil.rmtree(work / sub, ignore_errors=True)
            t = time.perf_counter()
            base, adapter, params = bench_merge.build(work, dims, (50 if args.small else 500) * 1024**2)
            tokenizer = demo_tokenizer()
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copy(tokenizer / name, base / name)
            marker.write_text(json.dumps({"dims": dims, "params": params}))
            log(f"built {params / 1e9:.3f}B params in {time.perf_counter() - t:.1f} s at {work}")

        def seed_convert(type_name: str) -> dict:
            shutil.rmtree(work / "seed", ignore_errors=True)
            (work / f"ref.{type_name}.gguf").unlink(missing_ok=True)
            seed = bench_merge.child(bench_merge.SEED, base, adapter, work / "seed")
            conv = bench_merge.child(CONVERT, script, work / "seed", work / f"ref.{type_name}.gguf", type_name)
            return {
                "s": seed["s"] + conv["s"],
                "rss_mb": max(seed["rss_mb"], conv["rss_mb"]),
                "seed": seed,
                "convert": conv,
            }

        def studio(type_name: str) -> dict:
            (work / f"studio.{type_name}.gguf").unlink(missing_ok=True)
            return bench_merge.child(STUDIO, base, adapter, work / f"studio.{type_name}.gguf", type_name)

        for i in range(max(1, args.repeat)):
            ref = seed_convert(args.type)
            log(f"round {i + 1}: seed+convert {ref}")
            ours = studio(args.type)
            log(f"round {i + 1}: studio {ours}")
            rounds.append({"ref": ref, "studio": ours})
        identical[args.type] = same_tensors(work / f"ref.{args.type}.gguf", work / f"studio.{args.type}.gguf")
        for type_name in args.identity_types.split(","):
            if type_name and type_name not in identical:
                seed_convert(type_name)
                studio(type_name)
                identical[type_name] = same_tensors(work / f"ref.{type_name}.gguf", work / f"studio.{type_name}.gguf")
                for p in (work / f"ref.{type_name}.gguf", work / f"studio.{type_name}.gguf"):
                    p.unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    time_ratios = [r["studio"]["s"] / r["ref"]["s"] for r in rounds]
    rss_ratios = [r["studio"]["rss_mb"] / r["ref"]["rss_mb"] for r in rounds]
    result = {
        "type": args.type,
        "params": params,
        "seed_convert_s": round(statistics.median(r["ref"]["s"] for r in rounds), 2),
        "seed_convert_peak_rss_mb": round(statistics.median(r["ref"]["rss_mb"] for r in rounds)),
        "seed_s": round(statistics.median(r["ref"]["seed"]["s"] for r in rounds), 2),
        "convert_s": round(statistics.median(r["ref"]["convert"]["s"] for r in rounds), 2),
        "studio_s": round(statistics.median(r["studio"]["s"] for r in rounds), 2),
        "studio_peak_rss_mb": round(statistics.median(r["studio"]["rss_mb"] for r in rounds)),
        "time_ratio": round(statistics.median(time_ratios), 3),
        "rss_ratio": round(statistics.median(rss_ratios), 3),
        "spread": {
            "time_ratio": [round(min(time_ratios), 3), round(max(time_ratios), 3)],
            "rss_ratio": [round(min(rss_ratios), 3), round(max(rss_ratios), 3)],
        },
        "identical": identical,
        "rounds": len(rounds),
        "targets_met": statistics.median(time_ratios) <= 0.5
        and statistics.median(rss_ratios) <= 0.25
        and all(identical.values()),
    }
    if not args.json:
        log(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
