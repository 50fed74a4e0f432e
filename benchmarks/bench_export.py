"""Merged GGUF export: LoRA Studio's export vs the seed recipe followed by llama.cpp's converter, on three shapes.

Shapes (``--shapes``, default all three), each a synthetic model with random bfloat16 weights and the demo model's
SmolLM2 tokenizer (49,152 tokens; llama.cpp's converter refuses a tokenizer it does not recognise), so every
vocabulary is 49,152 unless ``--real-vocab``:

* ``llama``: TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads, untied ``lm_head``);
* ``qwen3``: Qwen3-0.6B's (``Qwen3Config``: hidden 1024, MLP 3072, 28 layers, 16 heads, 8 KV heads, head_dim 128,
  q/k norms, tied embeddings);
* ``gemma3``: Gemma-3-1B's (``Gemma3TextConfig``: hidden 1152, MLP 6912, 26 layers, 4 heads, 1 KV head,
  head_dim 256, sliding window 512, tied embeddings).

``--size`` scales them: ``full`` (the real layer counts: 1170M, 491M and 755M parameters), ``small`` (the default: the
real widths with 6 layers, 466M, 145M and 218M), ``tiny`` (narrow, 2 layers: a smoke run of the script). ``--layers N``
sets the layer count of every shape. On a 2-core machine a default run takes 5 to 7.5 minutes, ``--size full`` 8.5 to 14
(both depending on other load), ``--size tiny`` a few (mostly child processes starting). The ratios depend on the size:
what every child pays whatever the model (imports, ~400 MB and a few seconds; the tokenizer) weighs most on small
models, so the targets are meant for ``--size full``. ``--real-vocab`` gives Qwen3 and Gemma 3 their real vocabularies
(151,936 and 262,144; the converter pads the token list with ``[PAD]`` tokens, and for Gemma 3 cuts the embedding back
to the tokenizer's rows): a much larger embedding, the largest tensor of both.

Each model and its adapter (PEFT LoRA, r=16, alpha 32, random A and B, on every linear layer of the decoder: q, k,
v, o, gate, up, down) are built tensor by tensor once in ``--cache`` (default
``~/.cache/lora-studio/bench-export``) and reused by later runs with the same dimensions. Then, per shape, each path
runs in its own child processes, interleaved over ``--repeat`` rounds (studio, seed, studio, seed, ...), with a
``sync`` (untimed) before each child:

* seed: bench_merge's seed recipe (``AutoModelForCausalLM.from_pretrained(bf16)``, PEFT ``merge_and_unload``,
  ``save_pretrained`` + the tokenizer), then llama.cpp's own ``convert_hf_to_gguf.py --outtype TYPE`` on the saved
  folder, run as a script from the pinned converter LoRA Studio uses
  (``lora_studio.core.export.converter.converter_folder()``); its time is the sum of both children's, its peak RSS
  the larger of the two;
* studio: ``lora_studio.core.export.export_gguf`` (no verification; the file is fsynced before its rename, which
  neither seed step does).

Times are the work inside each child after its imports (torch and gguf; the seed recipe's transformers and PEFT too;
llama.cpp's ``conversion`` package, and transformers for the tokenizer, load inside the timed part of both the
converter's child and LoRA Studio's); peak RSS is the child's VmHWM, imports included. ``cpu_s`` (CPU seconds of all the
child's threads) and ``cpu_ratio`` are reported beside them (not targets): wall times on a shared machine move with
other work (each round's 1-minute load average is in ``load``), CPU time less so. ``identical``: after the last round,
both GGUFs of the shape hold the same tensors (names, types, shapes and bytes, read with ``gguf.GGUFReader``);
``--identity-types f16`` checks more types (one extra untimed run of each path per type).

Per shape the report gives each side's median, min, max and every round's value, and the ratios studio / seed of each
round (both paths of a round run back to back) with their median, min and max; targets: time ratio <= 0.5, RSS ratio <=
0.25, identical. The last line on stdout is one JSON object: {"type", "size", "shapes": {NAME: {"params", "studio":
{"s", "cpu_s", "rss_mb"}, "seed": {"s", "cpu_s", "rss_mb", "merge_s", "convert_s", ...}, "time_ratio", "rss_ratio",
"cpu_ratio", "load", "identical", "pass": {...}}}, "all_pass", "wall_s"}, each number {"median", "min", "max", "runs"}.

    .venv/bin/python benchmarks/bench_export.py [--size tiny|small|full] [--layers N] [--shapes llama,qwen3,gemma3]
        [--repeat N] [--type q8_0] [--identity-types f16] [--real-vocab] [--cache DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge

ROOT = bench_merge.ROOT
sys.path.insert(0, str(ROOT / "tests"))

TIME_TARGET, RSS_TARGET = 0.5, 0.25
TARGETS = bench_merge.TARGETS  # q, k, v, o, gate, up, down
TOKENIZER_VOCAB = 49152  # SmolLM2's
# family (tests/arch_zoo.py), config overrides at full size, the family's real vocabulary
SHAPES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        TOKENIZER_VOCAB,  # TinyLlama's 32000 is smaller than the tokenizer
    ),
    "qwen3": (
        "qwen3",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
        ),
        151936,
    ),
    "gemma3": (
        "gemma3",
        dict(
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
        262144,
    ),
}
SMALL_LAYERS = 6
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def log(msg: str) -> None:
    sys.stderr.write(f"[bench_export] {msg}\n")
    sys.stderr.flush()


def shape_dims(shape: str, size: str, layers: int | None, real_vocab: bool) -> dict[str, Any]:
    _, full, vocab = SHAPES[shape]
    dims = dict(full)
    if size == "tiny":
        dims.update(TINY)
        for key in ("head_dim", "query_pre_attn_scalar"):
            if key in dims:
                dims[key] = TINY["hidden_size"] // TINY["num_attention_heads"]
    elif size == "small":
        dims["num_hidden_layers"] = SMALL_LAYERS
    if layers:
        dims["num_hidden_layers"] = layers
    dims["vocab_size"] = vocab if real_vocab else TOKENIZER_VOCAB
    return dims


def build(folder: Path, shape: str, dims: dict[str, Any]) -> int:
    """``folder``/base (config, tokenizer, safetensors shards written tensor by tensor) and ``folder``/adapter.

    Returns the parameter count."""
    import arch_zoo
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from lora_studio.core.io.shard_writer import write_state_dict

    family = SHAPES[shape][0]
    base, adapter = folder / "base", folder / "adapter"
    for sub in (base, adapter):
        shutil.rmtree(sub, ignore_errors=True)
    base.mkdir(parents=True)
    arch_zoo._save_smollm2_tokenizer(base, family)
    config = arch_zoo.family_config(family, **dims)
    config.dtype = "bfloat16"
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    del model
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, s in shapes.items():
            if len(s) == 1:  # norms: around 1 (Gemma's are offsets: any value will do)
                yield name, (1 + 0.1 * torch.randn(s, generator=gen)).to(torch.bfloat16)
            else:
                yield name, (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)

    write_state_dict(base, tensors(), {k: ("BF16", s) for k, s in shapes.items()}, max_shard_bytes=500 * 1024**2)
    LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(adapter)
    lora = {}
    for name, (out_f, *rest) in shapes.items():
        module = name.removesuffix(".weight")
        if rest and module.split(".")[-1] in TARGETS:
            for part, s in (("lora_A", (16, rest[0])), ("lora_B", (out_f, 16))):
                lora[f"base_model.model.{module}.{part}.weight"] = (torch.randn(s, generator=gen) * 0.02).to(
                    torch.bfloat16
                )
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(int(torch.tensor(s).prod()) for s in shapes.values())


def converter_script() -> Path:
    from lora_studio.core.export.converter import converter_folder, converter_refusal

    if reason := converter_refusal():
        raise SystemExit(f"{reason} (make llama-cpp)")
    return converter_folder() / "convert_hf_to_gguf.py"


# bench_merge's seed recipe, with the child's CPU time (all its threads) beside the wall time
SEED = (
    bench_merge.PEAK
    + """
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
t, cpu = time.perf_counter(), time.process_time()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
print(json.dumps({"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu, "rss_mb": peak_rss_mb()}))
"""
)

CONVERT = (
    bench_merge.PEAK
    + """
import json, os, runpy, sys, time
script, folder, out, outtype = sys.argv[1:5]
sys.argv = [script, folder, "--outtype", outtype, "--outfile", out]
sys.path.insert(0, os.path.dirname(script))  # its conversion package and gguf-py, as `python script` has
import torch, gguf  # imported before timing, as the seed recipe's and LoRA Studio's are
t, cpu = time.perf_counter(), time.process_time()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print(json.dumps({"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu, "rss_mb": peak_rss_mb()}))
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
t, cpu = time.perf_counter(), time.process_time()
r = export_gguf(ExportRequest(resolve_source(base), Path(out), "gguf", type_name, adapter=Path(adapter), verify=False))
print(json.dumps({"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu, "rss_mb": peak_rss_mb()}))
"""
)


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether both GGUFs hold the same tensors (names, types, shapes, bytes), and how many ``a`` holds."""
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    if set(ta) != set(tb):
        log(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
        return False, len(ta)
    for name, x in ta.items():
        y = tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape) or bytes(x.data) != bytes(y.data):
            log(f"tensor {name} differs ({x.tensor_type.name} {list(x.shape)} vs {y.tensor_type.name} {list(y.shape)})")
            return False, len(ta)
    return True, len(ta)


def spread(values: list[float], digits: int = 2) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def bench_shape(shape: str, dims: dict, cache: Path, work: Path, script: Path, args: argparse.Namespace) -> dict:
    folder = cache / shape
    marker = folder / "built.json"
    if marker.is_file() and json.loads(marker.read_text()).get("dims") == dims:
        params = json.loads(marker.read_text())["params"]
        log(f"{shape}: reusing the {params / 1e6:.0f}M-parameter model at {folder}")
    else:
        t = time.perf_counter()
        marker.unlink(missing_ok=True)
        params = build(folder, shape, dims)
        marker.write_text(json.dumps({"dims": dims, "params": params}))
        log(f"{shape}: built {params / 1e6:.0f}M params in {time.perf_counter() - t:.1f} s at {folder}")
    base, adapter = folder / "base", folder / "adapter"

    def seed(type_name: str) -> dict:
        shutil.rmtree(work / "seed", ignore_errors=True)
        out = work / f"seed.{type_name}.gguf"
        out.unlink(missing_ok=True)
        merge = bench_merge.child(SEED, base, adapter, work / "seed")
        conv = bench_merge.child(CONVERT, script, work / "seed", out, type_name)
        shutil.rmtree(work / "seed", ignore_errors=True)
        return {
            "s": merge["s"] + conv["s"],
            "cpu_s": merge["cpu_s"] + conv["cpu_s"],
            "rss_mb": max(merge["rss_mb"], conv["rss_mb"]),
            "merge_s": merge["s"],
            "merge_rss_mb": merge["rss_mb"],
            "convert_s": conv["s"],
            "convert_rss_mb": conv["rss_mb"],
        }

    def studio(type_name: str) -> dict:
        out = work / f"studio.{type_name}.gguf"
        out.unlink(missing_ok=True)
        return bench_merge.child(STUDIO, base, adapter, out, type_name)

    rounds = []
    for i in range(max(1, args.repeat)):
        load = os.getloadavg()[0]  # other work on the machine (this benchmark's children run one at a time)
        ours = studio(args.type)
        ref = seed(args.type)
        log(
            f"{shape} round {i + 1} (load {load:.1f}): studio {ours['s']:.1f} s (cpu {ours['cpu_s']:.1f}) "
            f"{ours['rss_mb']:.0f} MB | seed {ref['s']:.1f} s (cpu {ref['cpu_s']:.1f}; merge {ref['merge_s']:.1f} + "
            f"convert {ref['convert_s']:.1f}) {ref['rss_mb']:.0f} MB "
            f"(merge {ref['merge_rss_mb']:.0f}, convert {ref['convert_rss_mb']:.0f})"
        )
        rounds.append({"studio": ours, "seed": ref, "load": load})
    identical: dict[str, bool] = {}
    tensors = 0
    for type_name in [args.type, *(t for t in args.identity_types.split(",") if t and t != args.type)]:
        if type_name != args.type:
            studio(type_name)
            seed(type_name)
        identical[type_name], tensors = same_tensors(work / f"seed.{type_name}.gguf", work / f"studio.{type_name}.gguf")
        for side in ("seed", "studio"):
            (work / f"{side}.{type_name}.gguf").unlink(missing_ok=True)
    time_ratios = [r["studio"]["s"] / r["seed"]["s"] for r in rounds]
    rss_ratios = [r["studio"]["rss_mb"] / r["seed"]["rss_mb"] for r in rounds]
    cpu_ratios = [r["studio"]["cpu_s"] / r["seed"]["cpu_s"] for r in rounds]
    time_ratio, rss_ratio = statistics.median(time_ratios), statistics.median(rss_ratios)
    passed = {"time": time_ratio <= TIME_TARGET, "rss": rss_ratio <= RSS_TARGET, "identical": all(identical.values())}
    return {
        "params": params,
        "dims": dims,
        "tensors": tensors,
        "studio": {
            "s": spread([r["studio"]["s"] for r in rounds]),
            "cpu_s": spread([r["studio"]["cpu_s"] for r in rounds]),
            "rss_mb": spread([r["studio"]["rss_mb"] for r in rounds], 0),
        },
        "seed": {
            key: spread([r["seed"][key] for r in rounds], 0 if "rss" in key else 2)
            for key in ("s", "cpu_s", "rss_mb", "merge_s", "convert_s", "merge_rss_mb", "convert_rss_mb")
        },
        "time_ratio": spread(time_ratios, 3),
        "rss_ratio": spread(rss_ratios, 3),
        "cpu_ratio": spread(cpu_ratios, 3),  # not a target: CPU seconds (all threads), less sensitive to other load
        "load": [round(r["load"], 2) for r in rounds],
        "identical": identical,
        "pass": {**passed, "all": all(passed.values())},
    }


def table(result: dict) -> str:
    """The per-shape numbers as a text table: median (min-max) over the rounds."""

    def cell(d: dict, digits: int = 1) -> str:
        return f"{d['median']:.{digits}f} ({d['min']:.{digits}f}-{d['max']:.{digits}f})"

    mark = {True: "ok", False: "MISS"}
    rows = [
        (
            "shape",
            "params",
            "studio s",
            "seed s",
            "time ratio",
            "studio MB",
            "seed MB",
            "RSS ratio",
            "identical",
            "CPU ratio",
        )
    ]
    for name, r in result["shapes"].items():
        rows.append(
            (
                name,
                f"{r['params'] / 1e6:.0f}M",
                cell(r["studio"]["s"]),
                cell(r["seed"]["s"]),
                f"{cell(r['time_ratio'], 3)} {mark[r['pass']['time']]}",
                cell(r["studio"]["rss_mb"], 0),
                cell(r["seed"]["rss_mb"], 0),
                f"{cell(r['rss_ratio'], 3)} {mark[r['pass']['rss']]}",
                ", ".join(f"{t} {mark[v]}" for t, v in r["identical"].items()),
                cell(r["cpu_ratio"], 3),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main() -> int:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "small", "full"), default="small", help="model size (default small)")
    ap.add_argument("--layers", type=int, help="decoder layers of every shape (overrides --size's)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of both paths per shape, interleaved (default 3)")
    ap.add_argument("--type", default="q8_0", help="the timed output type (default q8_0)")
    ap.add_argument("--identity-types", default="", help="more types whose tensors are compared (e.g. f16)")
    ap.add_argument("--real-vocab", action="store_true", help="Qwen3's and Gemma 3's real vocabulary sizes")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lora-studio" / "bench-export"))
    ap.add_argument("--json", action="store_true", help="only the JSON line on stdout (it is printed last either way)")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if unknown := set(shapes) - set(SHAPES):
        ap.error(f"unknown shapes {sorted(unknown)}")
    script = converter_script()
    variant = args.size + (f"-{args.layers}l" if args.layers else "") + ("-real-vocab" if args.real_vocab else "")
    cache = Path(args.cache).expanduser() / variant
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    result: dict[str, Any] = {"type": args.type, "size": args.size, "rounds": args.repeat, "shapes": {}}
    try:
        for shape in shapes:
            dims = shape_dims(shape, args.size, args.layers, args.real_vocab)
            result["shapes"][shape] = bench_shape(shape, dims, cache, work, script, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["targets"] = {"time_ratio": TIME_TARGET, "rss_ratio": RSS_TARGET}
    result["all_pass"] = all(r["pass"]["all"] for r in result["shapes"].values())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.json:
        sys.stderr.write(table(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
