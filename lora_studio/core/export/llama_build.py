"""Build and install llama.cpp's Python binding, portably: ``python -m lora_studio.core.export.llama_build``.

llama-cpp-python is a source distribution. Built with its defaults, llama.cpp is tuned to the building CPU
(``GGML_NATIVE``), and such a build crashed (SIGSEGV in ``decode``) on a virtual CPU that advertises AVX-512. pip's
wheel cache is keyed on the source alone, not on the build flags, so a wheel built once with other flags would be
reused by every later install. So the wheel is built here with ``GGML_NATIVE=OFF``, past pip's cache, into a folder
of LoRA Studio's own cache named for the version and the flags; later installs (a fresh checkout, CI) reuse that file.

The source distribution is kept beside the wheel: it carries the llama.cpp the binding runs, and with it that
llama.cpp's own converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion`` package and
``gguf-py``), which GGUF export uses as its library. After the binding, the converter is unpacked into this Python's
prefix (``converter.converter_folder``) and its ``gguf-py`` installed as the ``gguf`` package, so the converter, the
writer and the runtime that checks the file are one llama.cpp version.

Arguments after the command go to ``pip install`` (``-c requirements.lock`` from the Makefile). The output is pip's,
line by line, which the window's installer reads for its progress.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from lora_studio.core.export.converter import CONVERTER_FILES, converter_folder
from lora_studio.core.export.runtime import PINNED

PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def wheel_folder() -> Path:
    """Where the portable wheel of the pinned version is kept (``LORA_STUDIO_CACHE_DIR`` overrides the cache root)."""
    override = os.environ.get("LORA_STUDIO_CACHE_DIR")
    if override:
        root = Path(override)
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("lora-studio", appauthor=False))
    version = PINNED.split("==", 1)[1]
    return root / "wheels" / f"llama-cpp-python-{version}-native-off"


def built_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("llama_cpp_python-*.whl")) if folder.is_dir() else []
    return wheels[0] if wheels else None


def source_folder() -> Path:
    """Where the pinned source distribution is kept, beside the wheel's folder."""
    version = PINNED.split("==", 1)[1]
    return wheel_folder().parent / f"llama-cpp-python-{version}-source"


def source_distribution(kept: Path) -> Path | None:
    """The pinned source distribution kept in ``kept``, downloaded once (None: pip could not fetch it)."""
    found = sorted(kept.glob("llama_cpp_python-*.tar.gz")) if kept.is_dir() else []
    if found:
        return found[0]
    partial = kept.with_name(f"{kept.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"Downloading the source of {PINNED} (llama.cpp and its converter)", flush=True)
    command = [*PIP, "download", "--progress-bar", "off", "--no-deps", "--no-binary", ":all:", "-d", str(partial)]
    code = subprocess.call([*command, PINNED])
    got = sorted(partial.glob("llama_cpp_python-*.tar.gz"))
    if code != 0 or not got:
        shutil.rmtree(partial, ignore_errors=True)
        return None
    shutil.rmtree(kept, ignore_errors=True)
    os.replace(partial, kept)
    return kept / got[0].name


def unpack_converter(sdist: Path, target: Path) -> None:
    """llama.cpp's converter and its gguf-py from ``sdist`` into ``target`` (complete or not there at all)."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            parts = Path(member.name).parts
            # <name>-<version>/vendor/llama.cpp/<path>
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                continue
            inner = Path(*parts[3:])
            if inner.parts[0] in CONVERTER_FILES and (member.isfile() or member.isdir()):
                member.name = str(inner)
                members.append(member)
        archive.extractall(partial, members=members, filter="data")
    missing = [name for name in CONVERTER_FILES if not (partial / name).exists()]
    if missing:
        shutil.rmtree(partial, ignore_errors=True)
        raise FileNotFoundError(f"{sdist.name} lacks llama.cpp's {', '.join(missing)}")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)


def install_converter() -> int:
    """Unpack the converter of the pinned version and install its gguf-py; pip's exit code."""
    sdist = source_distribution(source_folder())
    if sdist is None:
        print(f"lora-studio: downloading the source of {PINNED} failed", file=sys.stderr)
        return 1
    target = converter_folder()
    unpack_converter(sdist, target)
    print(f"llama.cpp's converter unpacked to {target}", flush=True)
    install = [*PIP, "install", "--progress-bar", "off", "--no-deps", "--force-reinstall"]
    return subprocess.call([*install, str(target / "gguf-py")])


def build_wheel(folder: Path) -> int:
    """pip's exit code; the wheel lands in ``folder`` only when the build completed."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    env = {**os.environ, "CMAKE_ARGS": f"{PORTABLE_CMAKE_ARGS} {os.environ.get('CMAKE_ARGS', '')}".strip()}
    print(f"Building wheel for {PINNED} (portable: {PORTABLE_CMAKE_ARGS}; several minutes, once)", flush=True)
    command = [*PIP, "wheel", "--progress-bar", "off", "--no-cache-dir", "--no-deps"]
    sdist = source_distribution(source_folder())
    source = str(sdist) if sdist is not None else PINNED
    code = subprocess.call([*command, "--no-binary", "llama-cpp-python", "-w", str(partial), source], env=env)
    if code == 0 and built_wheel(partial) is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    else:
        shutil.rmtree(partial, ignore_errors=True)
    return code or (0 if built_wheel(folder) else 1)


def main(argv: list[str] | None = None) -> int:
    pip_install_args = sys.argv[1:] if argv is None else argv
    folder = wheel_folder()
    wheel = built_wheel(folder)
    if wheel is None:
        code = build_wheel(folder)
        wheel = built_wheel(folder)
        if code != 0 or wheel is None:
            print(f"lora-studio: building {PINNED} failed (pip exit code {code})", file=sys.stderr)
            return code or 1
    else:
        print(f"Using the portable wheel built before: {wheel}", flush=True)
    install = [*PIP, "install", "--progress-bar", "off"]
    code = subprocess.call([*install, *pip_install_args, str(wheel)])  # the wheel and its dependencies
    # pip keeps an installed llama-cpp-python of the same version (say, a CPU-tuned build): replace it with this one
    code = code or subprocess.call([*install, "--no-deps", "--force-reinstall", str(wheel)])
    return code or install_converter()


if __name__ == "__main__":
    sys.exit(main())
