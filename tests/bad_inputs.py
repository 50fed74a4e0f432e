"""A corpus of broken inputs built from tiny real models, shared by the core, CLI and window tests.

Each case builds its input under a fresh folder and names the message a user must see.
``ok_for`` lists the front ends for which the input is legitimately fine (for example a
base whose .bin is malicious can still be *inspected*, because inspect reads no weights).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import factories


@dataclass(frozen=True)
class BadCase:
    id: str
    build: Callable[[Path, dict], dict]  # (workdir, fixtures) -> {"base": path, "adapter": path|None}
    message: str  # regex the one-line message must match
    ok_for: frozenset = field(default_factory=frozenset)  # front ends for which this input is valid


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _adapter_case(mutate: Callable[[Path], None]):
    def build(work: Path, fx: dict) -> dict:
        adapter = _copy(fx["adapter"], work / "adapter")
        mutate(adapter)
        return {"base": fx["base"], "adapter": adapter}

    return build


def _base_case(mutate: Callable[[Path], Path | None]):
    def build(work: Path, fx: dict) -> dict:
        base = _copy(fx["base"], work / "base")
        result = mutate(base)
        return {"base": result or base, "adapter": None}

    return build


def _config(text: str):
    return lambda a: (a / "adapter_config.json").write_text(text)


def _edit_config(**changes):
    return lambda a: factories.edit_adapter_config(a, **changes)


def _weights(mutate_bytes):
    def m(a: Path):
        p = a / "adapter_model.safetensors"
        p.write_bytes(mutate_bytes(p.read_bytes()))

    return m


def _nan_weights(a: Path):
    from safetensors.torch import load_file, save_file

    t = load_file(a / "adapter_model.safetensors")
    key = sorted(k for k in t if "lora_B" in k)[0]
    t[key][0, 0] = float("nan")
    save_file(t, a / "adapter_model.safetensors")


def _drop_tensor(a: Path):
    from safetensors.torch import load_file, save_file

    t = load_file(a / "adapter_model.safetensors")
    del t[sorted(k for k in t if "lora_B" in k)[0]]
    save_file(t, a / "adapter_model.safetensors")


def _weights_dir(a: Path):
    (a / "adapter_model.safetensors").unlink()
    (a / "adapter_model.safetensors").mkdir()


def _evil_pickle(a: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {a.parent / 'PWNED'}",))

    (a / "adapter_model.safetensors").unlink()
    with open(a / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)


def _empty_folder(work: Path, fx: dict) -> dict:
    (work / "adapter").mkdir()
    return {"base": fx["base"], "adapter": work / "adapter"}


def _base_remote_code(b: Path):
    cfg = json.loads((b / "config.json").read_text())
    cfg.update(model_type="totally_custom", auto_map={"AutoModelForCausalLM": "modeling_custom.M"})
    (b / "config.json").write_text(json.dumps(cfg))
    (b / "modeling_custom.py").write_text(f"open({str(b.parent / 'PWNED')!r}, 'w')\n")


def _base_missing_shard(b: Path):
    (b / "model.safetensors").rename(b / "model-00001-of-00002.safetensors")
    (b / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )


def _base_evil_bin(b: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {b.parent / 'PWNED'}",))

    (b / "model.safetensors").unlink()
    with open(b / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)


def _write(p: Path, text: str) -> None:
    p.write_text(text)


def _truncate(p: Path, n: int = 64):
    p.write_bytes(p.read_bytes()[:-n])


def _spaces_and_bytes_name(work: Path, fx: dict) -> dict:
    odd = os.fsdecode(b"my adapter \xff\xfe")
    adapter = _copy(fx["adapter"], work / odd)
    base = _copy(fx["base"], work / "base with spaces")
    return {"base": base, "adapter": adapter}


def _outside_copy(b: Path) -> Path:
    """A real shard outside the base folder: what a hostile index or link points at."""
    outside = b.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(b / "model.safetensors", outside / "x.safetensors")
    return outside / "x.safetensors"


def _index_to(target_of):
    def mutate(b: Path):
        target = target_of(b, _outside_copy(b))
        (b / "model.safetensors").unlink()
        (b / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": str(target)}})
        )

    return mutate


def _link_out(name: str):
    def mutate(b: Path):
        outside = b.parent / "outside"
        outside.mkdir(exist_ok=True)
        shutil.move(str(b / name), outside / name)
        (b / name).symlink_to(outside / name)

    return mutate


def _fifo(name: str):
    def mutate(folder: Path):
        (folder / name).unlink()
        os.mkfifo(folder / name)

    return mutate


def _metadata_list(data: bytes) -> bytes:
    """The same safetensors file with ``__metadata__`` turned into a list (the header keeps its length)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = ["format", "pt"]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _drop_base_tensor(name: str):
    def mutate(b: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(b / "model.safetensors"))
        del tensors[name]
        save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})

    return mutate


def _gguf(work: Path, *, tensors: bool = True, string_past_end: bool = False) -> Path:
    """A tiny GGUF, without tensors or with a string whose length runs past the end of the file."""
    import gguf
    import numpy as np

    path = work / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny")
    if tensors:
        writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if string_past_end:
        data = bytearray(path.read_bytes())
        at = data.find(b"tiny")
        struct.pack_into("<Q", data, at - 8, 10**6)  # the u64 length before the string
        path.write_bytes(bytes(data))
    return path


def _with_layers(config: Path, layers: int) -> str:
    data = json.loads(config.read_text())
    data["num_hidden_layers"] = layers
    return json.dumps(data)


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def _odd_adapter_name(work: Path, fx: dict) -> dict:
    """Real adapter folders have dots and spaces in their names: a valid name is derived, not refused."""
    return {"base": fx["base"], "adapter": _copy(fx["adapter"], work / "llama-3.1 lora")}


CASES: list[BadCase] = [
    # adapters
    BadCase(
        "adapter-config-missing",
        _adapter_case(lambda a: (a / "adapter_config.json").unlink()),
        r"has no adapter_config\.json",
    ),
    BadCase("adapter-config-empty", _adapter_case(_config("")), r"adapter_config\.json is empty"),
    BadCase("adapter-config-invalid-json", _adapter_case(_config("{'r': 4,")), r"is not valid JSON"),
    BadCase("adapter-config-not-object", _adapter_case(_config("[]")), r"is not a JSON object"),
    BadCase(
        "adapter-config-not-utf8",
        _adapter_case(lambda a: (a / "adapter_config.json").write_bytes(b"\xff\xfe{")),
        r"not UTF-8",
    ),
    BadCase(
        "adapter-peft-type-unknown",
        _adapter_case(_edit_config(peft_type="HYPERLORA")),
        r"unknown peft_type 'HYPERLORA'",
    ),
    BadCase(
        "adapter-peft-type-not-lora",
        _adapter_case(_edit_config(peft_type="IA3")),
        r"IA3 adapter; LoRA Studio handles LoRA adapters only",
    ),
    BadCase(
        "adapter-future-peft-keys",
        _adapter_case(_edit_config(quantum_rank=3, peft_version="1.9.0")),
        r"does not know: quantum_rank \(saved by PEFT 1\.9\.0\)",
    ),
    BadCase("adapter-r-zero", _adapter_case(_edit_config(r=0)), r"r is 0"),
    BadCase("adapter-r-not-number", _adapter_case(_edit_config(r="four")), r"r and lora_alpha must be numbers"),
    BadCase(
        "adapter-other-architecture",
        lambda w, fx: {"base": fx["base"], "adapter": fx["gpt2_adapter"]},
        r"another architecture|does not have",
    ),
    BadCase(
        "adapter-shape-mismatch",
        lambda w, fx: {"base": fx["base"], "adapter": fx["wide_adapter"]},
        r"model\.layers\.0\.self_attn\.q_proj: adapter expects in=64,out=64, base has in=32,out=32",
    ),
    BadCase("adapter-weights-truncated", _adapter_case(_weights(lambda b: b[:-40])), r"truncated"),
    BadCase(
        "adapter-weights-corrupt-header",
        _adapter_case(_weights(lambda b: struct.pack("<Q", 7) + b"{broken" + b[15:])),
        r"corrupt safetensors header",
    ),
    BadCase("adapter-weights-tiny-file", _adapter_case(_weights(lambda b: b[:3])), r"not a safetensors file"),
    BadCase("adapter-weights-is-directory", _adapter_case(_weights_dir), r"is a folder, not a weights file"),
    BadCase(
        "adapter-weights-missing",
        _adapter_case(lambda a: (a / "adapter_model.safetensors").unlink()),
        r"has no adapter weights",
    ),
    BadCase("adapter-weights-malicious-pickle", _adapter_case(_evil_pickle), r"refused: it is not a plain tensor file"),
    BadCase("adapter-weights-nan", _adapter_case(_nan_weights), r"has 1 NaN/Inf values"),
    BadCase("adapter-lora-b-missing", _adapter_case(_drop_tensor), r"lora_B missing"),
    BadCase("adapter-empty-folder", _empty_folder, r"is empty"),
    BadCase("adapter-does-not-exist", lambda w, fx: {"base": fx["base"], "adapter": w / "nowhere"}, r"does not exist"),
    BadCase(
        "adapter-is-a-file",
        lambda w, fx: {"base": fx["base"], "adapter": (w / "file.txt", (w / "file.txt").write_text("x"))[0]},
        r"is a file, not an adapter folder",
    ),
    BadCase(
        "adapter-is-a-full-model",
        lambda w, fx: {"base": fx["base"], "adapter": fx["base"]},
        r"is a full model, not a LoRA adapter",
    ),
    # bases
    BadCase("base-does-not-exist", lambda w, fx: {"base": w / "no-model", "adapter": None}, r"does not exist"),
    BadCase(
        "base-empty-folder",
        lambda w, fx: {"base": (w / "empty", (w / "empty").mkdir())[0], "adapter": None},
        r"is an empty folder",
    ),
    BadCase(
        "base-is-a-text-file",
        lambda w, fx: {"base": (w / "notes.txt", (w / "notes.txt").write_text("hi"))[0], "adapter": None},
        r"is a file, not a model",
    ),
    BadCase(
        "base-fake-gguf",
        lambda w, fx: {"base": (w / "m.gguf", (w / "m.gguf").write_bytes(b"GGML" + b"\0" * 64))[0], "adapter": None},
        r"is not a GGUF file",
    ),
    BadCase(
        "base-config-invalid-json",
        _base_case(lambda b: _write(b / "config.json", "{oops")),
        r"config\.json is not valid JSON",
    ),
    BadCase(
        "base-index-missing-shard",
        _base_case(_base_missing_shard),
        r"shard model-00002-of-00002\.safetensors but it is missing",
    ),
    BadCase("base-weights-truncated", _base_case(lambda b: _truncate(b / "model.safetensors")), r"truncated"),
    BadCase(
        "base-is-an-adapter",
        lambda w, fx: {"base": fx["adapter"], "adapter": None},
        r"LoRA adapter folder, not a base model",
    ),
    BadCase(
        "base-needs-remote-code",
        _base_case(_base_remote_code),
        r"needs its own Python code to load \(modeling_custom\.py\); it was not run",
        ok_for=frozenset({"inspect"}),
    ),
    BadCase(
        "base-malicious-pickle",
        _base_case(_base_evil_bin),
        r"refused because it is not plain tensors",
        ok_for=frozenset({"inspect"}),
    ),
    # hostile folders: nothing outside the chosen folder is read, nothing blocks
    BadCase(
        "base-index-points-outside",
        _base_case(_index_to(lambda b, target: "../outside/x.safetensors")),
        r"'\.\./outside/x\.safetensors' points outside the folder",
    ),
    BadCase(
        "base-index-absolute-path",
        _base_case(_index_to(lambda b, target: str(target))),
        r"x\.safetensors' points outside the folder",
    ),
    BadCase(
        "base-weights-link-outside",
        _base_case(_link_out("model.safetensors")),
        r"'model\.safetensors' points outside the folder",
    ),
    BadCase(
        "base-tokenizer-link-outside",
        _base_case(_link_out("tokenizer.json")),
        r"'tokenizer\.json' points outside the folder",
    ),
    BadCase("base-weights-fifo", _base_case(_fifo("model.safetensors")), r"is not a regular file"),
    BadCase("adapter-config-fifo", _adapter_case(_fifo("adapter_config.json")), r"is not a regular file"),
    BadCase("adapter-weights-fifo", _adapter_case(_fifo("adapter_model.safetensors")), r"is not a regular file"),
    # settings that PEFT refuses, or that would write non-finite weights
    BadCase("adapter-alpha-nan", _adapter_case(_edit_config(lora_alpha=float("nan"))), r"lora_alpha is nan"),
    BadCase("adapter-alpha-infinite", _adapter_case(_edit_config(lora_alpha=float("inf"))), r"lora_alpha is inf"),
    BadCase(
        "adapter-alpha-string", _adapter_case(_edit_config(lora_alpha="sixteen")), r"r and lora_alpha must be numbers"
    ),
    BadCase("adapter-r-float", _adapter_case(_edit_config(r=4.0)), r"r a whole number"),
    BadCase("adapter-r-huge", _adapter_case(_edit_config(r=10**9)), r"more than any LoRA rank"),
    BadCase("adapter-rank-pattern-zero", _adapter_case(_edit_config(rank_pattern={"q_proj": 0})), r"\['q_proj'\] is 0"),
    BadCase("adapter-rank-pattern-list", _adapter_case(_edit_config(rank_pattern=[4, 8])), r"not an object of module"),
    BadCase(
        "adapter-rank-pattern-bad-regex",
        _adapter_case(_edit_config(rank_pattern={"q_proj(": 4})),
        r"'q_proj\(' is not a valid pattern",
    ),
    BadCase("adapter-target-modules-number", _adapter_case(_edit_config(target_modules=7)), r"not module names"),
    BadCase(
        "adapter-weights-metadata-not-object",
        _adapter_case(_weights(_metadata_list)),
        r"__metadata__ is not an object",
    ),
    BadCase(
        "adapter-r-disagrees-with-tensors",
        _adapter_case(_edit_config(r=8)),
        r"has rank 4 in its tensors but rank 8 in adapter_config\.json \(r\)",
    ),
    BadCase(
        "adapter-rank-pattern-disagrees-with-tensors",
        _adapter_case(_edit_config(rank_pattern={"v_proj": 2})),
        r"v_proj has rank 4 in its tensors but rank 2 in adapter_config\.json \(rank_pattern\)",
    ),
    BadCase(
        "base-config-declares-more-layers",
        _base_case(lambda b: _write(b / "config.json", _with_layers(b / "config.json", 3))),
        r"config\.json declares 3 layers but the checkpoint has no weights for 1 of them \(from layer 2\)",
    ),
    BadCase(
        "base-checkpoint-lacks-a-weight",
        _base_case(_drop_base_tensor("model.norm.weight")),
        r"weights that config\.json declares are not in the checkpoint \(e\.g\. model\.norm\.weight\)",
        # inspect reads headers only; a streaming merge with --no-verify copies what the checkpoint holds (without
        # the model's code it cannot know the final norm is missing); a verified merge refuses (test below)
        ok_for=frozenset({"inspect", "merge"}),
    ),
    BadCase(
        "base-layer-lacks-a-weight",
        _base_case(_drop_base_tensor("model.layers.1.mlp.down_proj.weight")),
        r"layer 1 of the checkpoint lacks mlp\.down_proj\.weight, which the other layers have",
    ),
    BadCase(
        "base-gguf-no-tensors", lambda w, fx: {"base": _gguf(w, tensors=False), "adapter": None}, r"holds no tensors"
    ),
    BadCase(
        "base-gguf-string-past-the-end",
        lambda w, fx: {"base": _gguf(w, string_past_end=True), "adapter": None},
        r"is damaged or not a GGUF file",
    ),
    BadCase(
        "base-config-is-a-list", _base_case(lambda b: _write(b / "config.json", "[1, 2]")), r"is not a JSON object"
    ),
    BadCase("adapter-config-deeply-nested", _adapter_case(_config(_deep())), r"nested too deeply"),
    BadCase(
        "base-config-deeply-nested", _base_case(lambda b: _write(b / "config.json", _deep())), r"nested too deeply"
    ),
    # valid inputs with awkward names must simply work
    BadCase(
        "adapter-folder-name-with-dots-and-spaces",
        _odd_adapter_name,
        r"",
        ok_for=frozenset({"inspect", "attach", "compare", "merge", "window"}),
    ),
    BadCase(
        "paths-with-spaces-and-non-utf8",
        _spaces_and_bytes_name,
        r"",
        ok_for=frozenset({"inspect", "attach", "compare", "merge", "window"}),
    ),
]


def build(case: BadCase, work: Path, fixtures: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    return case.build(work, fixtures)
