"""Where LoRA Studio keeps its own files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def data_dir(*, create: bool = True) -> Path:
    """The user's data directory (the converted demo model lives here), created unless ``create`` is False.

    ``LORA_STUDIO_DATA_DIR`` overrides it, for tests and portable installs.
    """
    override = os.environ.get("LORA_STUDIO_DATA_DIR")
    if override:
        path = Path(override)
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("lora-studio", appauthor=False))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def free_path(
    parent: Path, stem: str, suffix: str = "", taken: Callable[[Path], bool] = lambda path: path.exists()
) -> Path:
    """``parent/<stem><suffix>``, else ``<stem>-2<suffix>``, ``<stem>-3<suffix>``…: the first name not ``taken``
    (a suggested output never names what an earlier run left there)."""
    path, n = parent / f"{stem}{suffix}", 2
    while taken(path):
        path, n = parent / f"{stem}-{n}{suffix}", n + 1
    return path


def owned_by_a_cache(path: Path) -> bool:
    """Whether ``path`` lies in a folder a cache or an installer manages: the user's cache folder (``XDG_CACHE_HOME``,
    where the Hugging Face cache and downloaded packages' data live) or this Python environment. Outputs are not
    suggested there: they would be lost to a cache clean or a reinstall."""
    import sys

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    resolved = Path(os.path.abspath(path))
    return any(resolved.is_relative_to(Path(os.path.abspath(root))) for root in (cache, sys.prefix))


def is_utf8_path(path: Path) -> bool:
    try:
        os.fsencode(str(path)).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@contextmanager
def utf8_path(path: Path) -> Iterator[Path]:
    """A UTF-8 path to the same file or folder.

    safetensors' Rust core (and so transformers and PEFT) rejects paths that are not
    valid UTF-8, which Linux allows. Such a path is reached through a symlink in a
    temporary folder instead: nothing is copied, however big the model.
    """
    path = Path(path)
    if is_utf8_path(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lora-studio-link-") as tmp:
        link = Path(tmp) / (path.name.encode("utf-8", "replace").decode("utf-8", "replace") or "model")
        link = Path(tmp) / "".join(c if c.isprintable() and c != "\ufffd" else "_" for c in link.name)
        os.symlink(os.path.abspath(path), link)
        yield link


def free_disk(path: Path) -> int | None:
    """Free bytes on the disk that holds ``path`` (or would: its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def containment_root(folder: Path) -> Path:
    """The folder a model's files must stay inside: the folder itself, or for a snapshot in the Hugging Face
    cache (``models--org--name/snapshots/REV``, whose files are links into ``../../blobs``) the repo's cache folder."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return folder


def inside(folder: Path, name: str | Path, what: str = "file") -> Path:
    """``folder/name``, refused (UserError) when it lies outside ``folder`` once links are followed.

    Model and adapter folders come from anywhere: an index or a link must not make LoRA Studio read (or copy
    into an output) a file the user did not choose."""
    from lora_studio.core.errors import UserError

    folder = Path(folder)
    candidate = folder / name
    root = containment_root(folder)
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise UserError(
            f"{folder.name}: the {what} {str(name)!r} points outside the folder ({resolved})",
            "LoRA Studio reads only files inside the folders you choose; the folder may be hostile",
        )
    return candidate


def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` when it is a regular file (links followed); a FIFO or device would block or never end."""
    import stat

    from lora_studio.core.errors import UserError

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Path(path)  # missing: the caller's own message says so
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UserError(
            f"{Path(path).name} is not a regular file (a pipe, socket or device)",
            f"the {what} must be a plain file; the folder may be hostile",
        )
    return Path(path)


def check_output_apart(out: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse an output that is, contains or lies in one of the inputs (the inputs would be replaced, mixed into
    the output or changed), the working folder, or a mount point (it cannot be replaced in one step)."""
    from lora_studio.core.errors import UserError

    if not str(out).strip():
        raise UserError("the output path is empty", "give a folder or file name for the output")
    target = Path(os.path.abspath(out))
    if len(os.fsencode(target.name)) > 200:  # its temporary sibling adds a suffix: the file system takes 255 bytes
        raise UserError(f"the output's name is {len(os.fsencode(target.name))} bytes long", "choose a shorter name")
    for folder in target.parents:  # an output "under" a regular file cannot be created
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{folder} is a file, so {target} cannot be written", "choose an output in a folder")
            break
    resolved = target.resolve()
    for label, source in inputs.items():
        if source is None:
            continue
        src = Path(source).resolve()
        if resolved == src or src.is_relative_to(resolved):
            raise UserError(
                f"the output {target} is or contains the {label} ({src}); it would be replaced",
                "choose an output outside the input folders",
            )
        if resolved.is_relative_to(src) and (target.exists() or src.is_dir()):
            # a new name inside an input folder changes that folder too: an adapter folder gains a model, a base
            # folder a report that the next load or scan would meet
            raise UserError(
                f"the output {target} is inside the {label} ({src}); writing it would change the {label}",
                "choose an output outside the input folders",
            )
    if resolved == Path.cwd().resolve() or Path.cwd().resolve().is_relative_to(resolved):
        raise UserError(
            f"the output {target} is the current folder (or holds it)",
            "choose an output folder of its own",
        )
    if target.exists() and os.path.ismount(target):
        raise UserError(f"{target} is a mount point; it cannot be replaced", "choose a folder inside it")


def check_folder_contained(folder: Path, what: str = "model folder") -> None:
    """Every entry of a model or adapter folder must be what it looks like: no link out of the folder (a library
    that loads from it would read the outside file), no pipe or device (a read would block for ever)."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # unreadable: the caller's read says so
    for entry in entries:
        if entry.is_symlink():
            inside(folder, entry.name, "link")
        regular_file(Path(entry.path), f"{what}'s {entry.name}")
