"""Merge-and-save: the seed recipe vs LoRA Studio's streaming engine vs a plain copy.

Builds, in a temporary folder, a synthetic TinyLlama-shaped model (~1.1B parameters,
bfloat16, random weights, ~500 MB shards) written shard by shard with the streaming
writer (building it never holds the model in memory), and a rank-16 adapter on all
linear layers of the decoder (q, k, v, o, gate, up, down). Then, each in its own
child process, in the same run:

* seed: ``AutoModelForCausalLM.from_pretrained(bf16)`` -> ``PeftModel.from_pretrained``
  -> ``merge_and_unload`` -> ``save_pretrained`` + tokenizer ``save_pretrained``;
* stream: ``lora_studio.core.merge.merge_and_save`` (streaming engine, no verification);
* copy: copying the base folder file by file, each file fsynced (the streaming
  writer fsyncs its shards too, so both produce a folder that survives a power cut).

Times are the work inside each child, after its imports; peak RSS is the child's
VmHWM, imports included. Each child imports what its own path needs before the clock
starts: the seed recipe torch + transformers + PEFT (~350 MB resident), the streaming
engine torch only (~225 MB: it never imports transformers or PEFT; the child reports
``stream_imported_peft`` to prove it). ``bit_identical``: every tensor of the stream
output equals the seed output's, compared one tensor at a time.

Before each child the benchmark runs ``sync`` (untimed), so no child pays for the disk
writeback of the one before (the seed recipe does not fsync what it saves; copy and stream do).

``--repeat N`` (default 3) runs the three children N times, interleaved (copy, seed, stream, copy, ...),
so that every ratio compares runs made minutes apart on the same machine; the JSON then
holds the medians, each ratio's spread (min, max) and the per-round ratios.

Last line (JSON): {"seed_s", "seed_peak_rss_mb", "stream_s", "stream_peak_rss_mb", "copy_s",
"bit_identical", "params", "rss_ratio", "time_ratio_seed", "time_ratio_copy", ...}.

    .venv/bin/python benchmarks/bench_merge.py [--small] [--json] [--keep DIR] [--repeat N]

With ``--keep DIR`` the synthetic model is built once and reused by later runs with the same DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
SMALL = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=32000,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    sys.stderr.write(f"[bench_merge] {msg}\n")
    sys.stderr.flush()


def build(folder: Path, dims: dict, shard_bytes: int) -> tuple[Path, Path, int]:
    """Base model folder and adapter folder, written tensor by tensor."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    import factories

    from lora_studio.core.io.shard_writer import write_state_dict

    base = folder / "base"
    base.mkdir()
    config = LlamaConfig(
        **dims,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        dtype="bfloat16",
    )
    config.save_pretrained(base)
    factories.make_tokenizer().save_pretrained(base)
    h, inter, kv = (
        dims["hidden_size"],
        dims["intermediate_size"],
        dims["hidden_size"] // dims["num_attention_heads"] * dims["num_key_value_heads"],
    )
    shapes = {"model.embed_tokens.weight": (dims["vocab_size"], h)}
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (dims["vocab_size"], h)})
    plan = {k: ("BF16", s) for k, s in shapes.items()}
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    write_state_dict(base, tensors(), plan, max_shard_bytes=shard_bytes)
    params = sum(int(torch.tensor(s).prod()) for s in shapes.values())

    adapter = folder / "adapter"
    LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(adapter)
    lora = {}
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if module.split(".")[-1] in TARGETS:
            out_f, in_f = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(16, in_f, generator=gen) * 0.02).to(
                torch.bfloat16
            )
            lora[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, 16, generator=gen) * 0.02).to(
                torch.bfloat16
            )
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter, params


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
PEAK = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

SEED = (
    PEAK
    + """
import sys, time, resource, json, os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
s = time.perf_counter() - t
print(json.dumps({"s": s, "rss_mb": peak_rss_mb()}))
"""
)

STREAM = (
    PEAK
    + """
import sys, time, resource, json
from pathlib import Path
from lora_studio.core.model.loading import offline_environment
offline_environment()
import torch  # imported before timing, as the seed recipe's are; the streaming engine needs nothing else heavy
import lora_studio.core.merge as merge
from lora_studio.core.model.sources import resolve_source
base, adapter, out = sys.argv[1:4]
t = time.perf_counter()
r = merge.merge_and_save(
    resolve_source(base), [merge.AdapterSpec("bench", Path(adapter))], merge.MergeOptions(out=Path(out), verify=False)
)
assert r.engine == "streaming", r.engine
s = time.perf_counter() - t
print(json.dumps({"s": s, "rss_mb": peak_rss_mb(), "imported_peft": "peft" in sys.modules,
                  "imported_transformers": "transformers" in sys.modules}))
"""
)

COPY = (
    PEAK
    + """
import sys, time, resource, json, os, shutil
from pathlib import Path
base, out = Path(sys.argv[1]), Path(sys.argv[2])
t = time.perf_counter()
out.mkdir()
for p in sorted(base.iterdir()):
    shutil.copyfile(p, out / p.name)
    fd = os.open(out / p.name, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
s = time.perf_counter() - t
print(json.dumps({"s": s, "rss_mb": peak_rss_mb()}))
"""
)


def settle() -> None:
    """Flush every dirty page before the next child starts (untimed).

    The seed recipe's save_pretrained does not fsync: without this its ~2 GB of dirty pages are
    written back while the next child runs, and that child's own fsync waits behind them.
    """
    os.sync()
    time.sleep(1.0)


def child(code: str, *args) -> dict:
    settle()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bit_identical(a: Path, b: Path) -> bool:
    """Every tensor equal, read one tensor at a time from both folders."""
    import torch

    from lora_studio.core.io.safetensors_format import read_headers, read_tensor

    def index(folder):
        return {n: (h.path, info) for h in read_headers(folder) for n, info in h.tensors.items()}

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        log(f"tensor names differ: {sorted(set(ia) ^ set(ib))[:5]}")
        return False
    for name, (pa, info_a) in ia.items():
        pb, info_b = ib[name]
        ta, tb = read_tensor(info_a, pa), read_tensor(info_b, pb)
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            log(f"tensor {name} differs")
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~50M-parameter model, for a quick smoke run")
    ap.add_argument("--json", action="store_true", help="only the JSON line on stdout (it is printed last either way)")
    ap.add_argument(
        "--keep",
        help="build in this folder and keep it, or reuse what an earlier run built there "
        "(default: a temporary folder, removed)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="run copy, seed and stream this many times (default 3), interleaved; report medians",
    )
    args = ap.parse_args()
    dims = SMALL if args.small else FULL
    shard_bytes = (50 if args.small else 500) * 1024**2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    rounds = []
    try:
        t = time.perf_counter()
        marker = work / "built.json"
        if args.keep and marker.is_file() and json.loads(marker.read_text()).get("dims") == dims:
            base, adapter, params = work / "base", work / "adapter", json.loads(marker.read_text())["params"]
            log(f"reusing the {params / 1e9:.3f}B-parameter model built earlier at {work}")
        else:
            for sub in ("base", "adapter"):
                shutil.rmtree(work / sub, ignore_errors=True)
            base, adapter, params = build(work, dims, shard_bytes)
            marker.write_text(json.dumps({"dims": dims, "params": params}))
            log(f"built {params / 1e9:.3f}B params in {time.perf_counter() - t:.1f} s at {work}")
        for _ in range(max(1, args.repeat)):
            for sub in ("copy", "seed", "stream"):
                shutil.rmtree(work / sub, ignore_errors=True)
            copy = child(COPY, base, work / "copy")
            shutil.rmtree(work / "copy")
            log(f"copy   {copy}")
            seed = child(SEED, base, adapter, work / "seed")
            log(f"seed   {seed}")
            stream = child(STREAM, base, adapter, work / "stream")
            log(f"stream {stream}")
            rounds.append({"copy": copy, "seed": seed, "stream": stream})
        same = bit_identical(work / "seed", work / "stream")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def med(kind, key):
        return statistics.median(r[kind][key] for r in rounds)

    seed_s, stream_s, copy_s = med("seed", "s"), med("stream", "s"), med("copy", "s")
    seed_rss, stream_rss = med("seed", "rss_mb"), med("stream", "rss_mb")
    result = {
        "seed_s": round(seed_s, 2),
        "seed_peak_rss_mb": round(seed_rss),
        "stream_s": round(stream_s, 2),
        "stream_peak_rss_mb": round(stream_rss),
        "copy_s": round(copy_s, 2),
        "bit_identical": same,
        "params": params,
        "rss_ratio": round(stream_rss / seed_rss, 3),
        "time_ratio_seed": round(statistics.median(r["stream"]["s"] / r["seed"]["s"] for r in rounds), 3),
        "time_ratio_copy": round(statistics.median(r["stream"]["s"] / r["copy"]["s"] for r in rounds), 3),
        "stream_imported_peft": any(
            r["stream"].get("imported_peft") or r["stream"].get("imported_transformers") for r in rounds
        ),
        "rounds": len(rounds),
        # The spread of each ratio over the rounds (min, max): one round alone can be off by 2x on this disk.
        "spread": {
            name: [round(min(values), 3), round(max(values), 3)]
            for name, values in (
                ("time_ratio_seed", [r["stream"]["s"] / r["seed"]["s"] for r in rounds]),
                ("time_ratio_copy", [r["stream"]["s"] / r["copy"]["s"] for r in rounds]),
                ("rss_ratio", [r["stream"]["rss_mb"] / r["seed"]["rss_mb"] for r in rounds]),
            )
        },
    }
    if len(rounds) > 1:
        result["per_round"] = [
            {
                "seed_s": round(r["seed"]["s"], 2),
                "stream_s": round(r["stream"]["s"], 2),
                "copy_s": round(r["copy"]["s"], 2),
                "time_ratio_seed": round(r["stream"]["s"] / r["seed"]["s"], 3),
                "time_ratio_copy": round(r["stream"]["s"] / r["copy"]["s"], 3),
            }
            for r in rounds
        ]
    if not args.json:
        log(
            f"stream RSS {result['rss_ratio']}x seed (target <= 0.25), "
            f"time {result['time_ratio_seed']}x seed (<= 0.7), {result['time_ratio_copy']}x copy (<= 1.5); "
            f"bit identical: {same}"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
