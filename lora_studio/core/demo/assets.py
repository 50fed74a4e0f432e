"""The files LoRA Studio ships beside its code: demo adapters, demo prompts, the icon.

They live in the repository's ``resources/`` folder. Where that folder is depends
on how the app runs, so :func:`resources_dir` looks, in order, at:

1. ``LORA_STUDIO_RESOURCES`` (an explicit override: tests, portable installs),
2. a PyInstaller bundle (``sys._MEIPASS/resources``),
3. ``lora_studio/resources`` inside the package (vendored copies),
4. the source checkout or an editable install (``<repo>/resources``),
5. a wheel install, which puts it in ``<prefix>/share/lora-studio/resources``
   (``[tool.setuptools.data-files]`` in pyproject.toml).

A folder counts only if it holds ``demo/prompts.json``, so an unrelated
``resources`` folder is never picked up.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lora_studio.core.errors import UserError

RESOURCES_ENV = "LORA_STUDIO_RESOURCES"
DATA_FILES_SUBDIR = Path("share") / "lora-studio" / "resources"
PROMPTS_FILE = Path("demo") / "prompts.json"


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    path: Path
    title: str
    kind: str  # style / format / task
    description: str
    prompt: str
    loss_csv: Path | None
    init: str | None  # the init it was trained with, from lora_studio.json


def candidate_dirs() -> list[Path]:
    """Where the resources folder may be, most specific first."""
    out: list[Path] = []
    override = os.environ.get(RESOURCES_ENV)
    if override:
        out.append(Path(override))
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        out.append(Path(bundle) / "resources")
    package = Path(__file__).resolve().parents[2]  # lora_studio/
    out.append(package / "resources")
    out.append(package.parent / "resources")
    prefixes = [sys.prefix, sysconfig.get_path("data")]
    user_base = getattr(sys, "base_prefix", None)
    if user_base:
        prefixes.append(user_base)
    for prefix in dict.fromkeys(p for p in prefixes if p):
        out.append(Path(prefix) / DATA_FILES_SUBDIR)
    return out


def resources_dir() -> Path:
    """The shipped resources folder; UserError when this install has none."""
    for path in candidate_dirs():
        if (path / PROMPTS_FILE).is_file():
            return path
    override = os.environ.get(RESOURCES_ENV)
    if override:
        raise UserError(
            f"{RESOURCES_ENV}={override} has no {PROMPTS_FILE.as_posix()}",
            "point it at the resources folder of a LoRA Studio checkout",
        )
    raise UserError(
        "the demo resources are not installed",
        f"run from a source checkout, reinstall LoRA Studio, or set {RESOURCES_ENV}",
    )


def demo_dir() -> Path:
    return resources_dir() / "demo"


def icon_path(suffix: str = "svg") -> Path | None:
    """The app icon (``svg`` or ``png``), or None if this install lacks it."""
    try:
        path = resources_dir() / "icons" / f"lora-studio.{suffix}"
    except UserError:
        return None
    return path if path.is_file() else None


def _read_prompts(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text("utf-8"))
        prompts = data["prompts"]
        if not isinstance(prompts, list) or not all(
            isinstance(p, dict) and p.get("adapter") and p.get("prompt") for p in prompts
        ):
            raise ValueError("every entry needs 'adapter' and 'prompt'")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({exc})", "reinstall LoRA Studio or restore the file") from exc
    return prompts


def demo_prompts() -> dict[str, str]:
    """Adapter name -> its demo prompt, in the order the comparison panel shows them."""
    return {p["adapter"]: p["prompt"] for p in _read_prompts(demo_dir() / PROMPTS_FILE.name)}


def demo_adapters() -> list[DemoAdapter]:
    """The trained demo adapters that are present, with their prompt and loss log."""
    from lora_studio.core.adapters.files import CONFIG_NAME, SIDECAR_NAME
    from lora_studio.core.adapters.training_log import find_loss_csv

    root = demo_dir()
    out = []
    for entry in _read_prompts(root / PROMPTS_FILE.name):
        name = str(entry["adapter"])
        folder = root / "adapters" / name
        if not (folder / CONFIG_NAME).is_file():
            continue  # not trained in this checkout: list what exists, the caller says what is missing
        init = None
        sidecar = folder / SIDECAR_NAME
        if sidecar.is_file():
            try:
                init = json.loads(sidecar.read_text("utf-8")).get("init_lora_weights")
            except (OSError, ValueError, AttributeError):
                init = None
        out.append(
            DemoAdapter(
                name=name,
                path=folder,
                title=str(entry.get("title", name)),
                kind=str(entry.get("kind", "")),
                description=str(entry.get("description", "")),
                prompt=str(entry["prompt"]),
                loss_csv=find_loss_csv(folder),
                init=None if init is None else str(init),
            )
        )
    return out
