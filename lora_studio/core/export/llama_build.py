"""Build and install llama.cpp's Python binding, portably: ``python -m lora_studio.core.export.llama_build``.

llama-cpp-python is a source distribution. Built with its defaults, llama.cpp is tuned to the building CPU
(``GGML_NATIVE``), and such a build crashed (SIGSEGV in ``decode``) on a virtual CPU that advertises AVX-512. pip's
wheel cache is keyed on the source alone, not on the build flags, so a wheel built once with other flags would be
reused by every later install. So the wheel is built here with ``GGML_NATIVE=OFF``, past pip's cache, into a folder
of LoRA Studio's own cache named for the version and the flags; later installs (a fresh checkout, CI) reuse that file.

Arguments after the command go to ``pip install`` (``-c requirements.lock`` from the Makefile). The output is pip's,
line by line, which the window's installer reads for its progress.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def build_wheel(folder: Path) -> int:
    """pip's exit code; the wheel lands in ``folder`` only when the build completed."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    env = {**os.environ, "CMAKE_ARGS": f"{PORTABLE_CMAKE_ARGS} {os.environ.get('CMAKE_ARGS', '')}".strip()}
    print(f"Building wheel for {PINNED} (portable: {PORTABLE_CMAKE_ARGS}; several minutes, once)", flush=True)
    command = [*PIP, "wheel", "--progress-bar", "off", "--no-cache-dir", "--no-deps"]
    code = subprocess.call([*command, "--no-binary", "llama-cpp-python", "-w", str(partial), PINNED], env=env)
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
    return code or subprocess.call([*install, "--no-deps", "--force-reinstall", str(wheel)])


if __name__ == "__main__":
    sys.exit(main())
