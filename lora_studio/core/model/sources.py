"""Where a base model comes from: a local folder, the local Hugging Face cache, a GGUF file (or the demo, which
:mod:`lora_studio.core.demo.model` resolves and lists).

Nothing here touches the network: the cache is scanned on disk, offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_studio.core.errors import UserError
from lora_studio.core.io.paths import check_folder_contained
from lora_studio.core.model.file_reads import FileReads, file_key

GGUF_MAGIC = b"GGUF"


SourceKind = Literal["folder", "hf-cache", "gguf", "demo"]


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: Path  # the model folder; for GGUF the folder that holds the file
    label: str
    gguf_file: str | None = None  # file name inside ``path`` when kind == "gguf"
    repo_id: str | None = None

    @property
    def file(self) -> Path:
        """The file or folder the user would point at."""
        return self.path / self.gguf_file if self.gguf_file else self.path

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": str(self.file), "label": self.label, "repo_id": self.repo_id}


def is_export(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def is_adapter_gguf(path: Path) -> bool:
    """A GGUF that holds a LoRA adapter, not a model (``general.type = adapter``, as llama.cpp's LoRA converter
    writes); read from its header, once per file as it is (gguf's reader parses the whole vocabulary of a model's
    file, and the local list asks again at each refresh). False for anything unreadable: listing it is harmless,
    loading it says why."""
    try:
        key = file_key(path)
    except OSError:
        return False
    return _ADAPTER_GGUFS.get(key, lambda: _read_is_adapter_gguf(path))


_ADAPTER_GGUFS: FileReads[bool] = FileReads("gguf is an adapter")


def _read_is_adapter_gguf(path: Path) -> bool:
    try:
        import gguf

        from lora_studio.core._compat.gguf_reader import fast_gguf_reads

        with fast_gguf_reads():
            field = gguf.GGUFReader(str(path)).fields.get("general.type")
        return field is not None and bytes(field.parts[field.data[0]]).decode("utf-8", "replace") == "adapter"
    except Exception:  # noqa: BLE001 - a damaged or foreign file is not an adapter we know of
        return False


def check_gguf_file(path: Path, what: str = "GGUF") -> Path:
    """``path`` when it is a plain file that starts like a GGUF, before llama.cpp is asked to load it (a folder or a
    file of something else would fail deep in llama.cpp, after the work before it)."""
    from lora_studio.core.io.paths import regular_file

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist", f"check the path given for the {what}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a .gguf file", f"give the {what}'s .gguf file")
    regular_file(path, what)
    if not is_export(path):
        raise UserError(f"{path.name} is not a GGUF file (its first bytes are not 'GGUF')", f"give the {what}'s file")
    return path


def _folder_source(
    path: Path, kind: SourceKind = "folder", label: str | None = None, repo_id: str | None = None
) -> ModelSource:
    return ModelSource(kind, path, label or path.name, repo_id=repo_id)


def resolve_source(spec: str | Path) -> ModelSource:
    """Turn what the user typed or picked into a ModelSource, or say clearly why not."""
    text = str(spec)
    if not text.strip():
        raise UserError("no base model given", "pass a model folder, a .gguf file, a cached repo id, or --demo")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or is_export(path):
            if not is_export(path):
                raise UserError(
                    f"{path.name} is not a GGUF file (its first bytes are not 'GGUF')", "pick a real .gguf model file"
                )
            return ModelSource("gguf", path.parent.absolute(), path.name, gguf_file=path.name)
        if path.name == "config.json":
            return resolve_source(path.parent)
        raise UserError(f"{path} is a file, not a model", "pick a model folder (with config.json) or a .gguf file")
    if path.is_dir():
        path = path.absolute()
        if (path / "config.json").is_file():
            check_folder_contained(path)
            return _folder_source(path)
        if (path / "adapter_config.json").is_file():
            raise UserError(
                f"{path.name} is a LoRA adapter folder, not a base model",
                "load a base model first, then attach this folder as an adapter",
            )
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return resolve_source(ggufs[0])
        if len(ggufs) > 1:
            raise UserError(
                f"{path.name} holds {len(ggufs)} .gguf files",
                "pick one of them: " + ", ".join(p.name for p in ggufs[:5]),
            )
        if not any(path.iterdir()):
            raise UserError(
                f"{path} is an empty folder", "pick a model folder with config.json and .safetensors weights"
            )
        raise UserError(
            f"{path} has no config.json",
            "pick a Hugging Face model folder (config.json + .safetensors) or a .gguf file",
        )
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        cached = find_in_hf_cache(text)
        if cached is not None:
            return cached
        raise UserError(
            f"{text} is not in the local Hugging Face cache",
            "LoRA Studio never downloads; fetch it with your usual tools first, or pick a folder",
        )
    raise UserError(f"{text} does not exist", "check the path")


def hf_cache_dir() -> Path:
    """The hub cache folder huggingface_hub would use (HF_HUB_CACHE, HF_HOME, or ~/.cache)."""
    try:
        import huggingface_hub.constants as hub_constants

        return Path(hub_constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - huggingface_hub missing or broken: fall back to its documented default
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def hf_cache_models(cache_dir: Path | None = None) -> list[ModelSource]:
    """Causal-LM-looking repos in the local Hugging Face cache (offline scan).

    Walks ``models--owner--name/snapshots/<rev>`` directly rather than huggingface_hub's
    scan_cache_dir, which gives up on a whole repo for one oddity (a copied snapshot, a
    missing blobs folder) that does not stop the model from loading.
    """
    root = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    try:
        repos = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("models--"))
    except OSError:  # no cache folder yet, or an unreadable one: nothing to list
        return []
    found = []
    for repo_path in repos:
        repo_id = repo_path.name[len("models--") :].replace("--", "/")
        snapshots = repo_path / "snapshots"
        try:
            revisions = [p for p in snapshots.iterdir() if p.is_dir()]
        except OSError:
            continue
        # Prefer what refs/main points at, then the newest snapshot.
        main_ref = repo_path / "refs" / "main"
        preferred = main_ref.read_text().strip() if main_ref.is_file() else ""
        revisions.sort(key=lambda p: (p.name != preferred, -p.stat().st_mtime))
        for snap in revisions:
            if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
                found.append(_folder_source(snap, "hf-cache", repo_id, repo_id=repo_id))
                break
    return found


def find_in_hf_cache(repo_id: str) -> ModelSource | None:
    for source in hf_cache_models():
        if source.repo_id == repo_id:
            return source
    return None


def models_in_folders(roots: tuple[Path, ...]) -> list[ModelSource]:
    """The model folders (``*/config.json``) and GGUF files directly under each of ``roots``."""
    found: list[ModelSource] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for config in sorted(root.glob("*/config.json")):
            found.append(_folder_source(config.parent.absolute()))
        for gguf in sorted(root.glob("*.gguf")):
            if is_export(gguf) and not is_adapter_gguf(gguf):  # an adapter-only file is served on a model, not one
                found.append(ModelSource("gguf", gguf.parent.absolute(), gguf.name, gguf_file=gguf.name))
    return found
