"""The portable llama.cpp build: its own wheel folder, built once from a kept source distribution, installed from
the file, and that source's converter unpacked (pip itself replaced)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from lora_studio.core.export import llama_build

VENDORED = {
    "convert_hf_to_gguf.py": b"# converter",
    "convert_lora_to_gguf.py": b"# lora converter",
    "conversion/__init__.py": b"",
    "gguf-py/pyproject.toml": b"[project]\nname='gguf'\n",
    "LICENSE": b"MIT",
    "src/llama.cpp": b"// not part of the converter",
}


def write_sdist(folder: Path) -> None:
    with tarfile.open(folder / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as archive:
        for name, data in VENDORED.items():
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(autouse=True)
def converter_target(tmp_path, monkeypatch):
    """The converter is unpacked into a test folder, not this Python's prefix."""
    target = tmp_path / "prefix" / "llama.cpp-converter"
    monkeypatch.setattr(llama_build, "converter_folder", lambda: target)
    return target


def fake_pip(calls: list[tuple[list[str], dict | None]], build_code: int = 0):
    def call(command: list[str], env: dict | None = None) -> int:
        calls.append((command, env))
        if "download" in command:
            write_sdist(Path(command[command.index("-d") + 1]))
            return 0
        if "wheel" in command:
            if build_code == 0:
                out = Path(command[command.index("-w") + 1])
                (out / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
            return build_code
        return 0

    return call


def test_the_wheel_is_built_portable_past_pips_cache_once_then_reused(tmp_path, monkeypatch, converter_target):
    monkeypatch.setenv("LORA_STUDIO_CACHE_DIR", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(llama_build.subprocess, "call", fake_pip(calls))
    assert llama_build.main(["-c", "requirements.lock"]) == 0
    (download, _), (build, env), (install, _), (replace, _), (gguf_py, _) = calls
    sdist = llama_build.source_folder() / "llama_cpp_python-0.3.36.tar.gz"
    assert "--no-binary" in download and sdist.is_file() and build[-1] == str(sdist)  # built from the kept source
    assert "--no-cache-dir" in build and "--no-binary" in build and env["CMAKE_ARGS"].startswith("-DGGML_NATIVE=OFF")
    wheel = llama_build.built_wheel(llama_build.wheel_folder())
    assert wheel is not None and "native-off" in wheel.parent.name and str(wheel) == install[-1] == replace[-1]
    assert install[-3:-1] == ["-c", "requirements.lock"] and "--force-reinstall" in replace
    # the converter of that very source, and its gguf-py installed as the gguf package
    assert sorted(p.name for p in converter_target.iterdir()) == sorted(llama_build.CONVERTER_FILES)
    assert not (converter_target / "src").exists() and gguf_py[-1] == str(converter_target / "gguf-py")
    folders = sorted(p.name for p in wheel.parent.parent.iterdir())
    assert folders == sorted([wheel.parent.name, sdist.parent.name])  # no partial folder left
    calls.clear()
    assert llama_build.main([]) == 0
    assert not any("wheel" in command or "download" in command for command, _ in calls)  # reused


def test_a_failed_build_leaves_nothing_to_reuse(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_STUDIO_CACHE_DIR", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(llama_build.subprocess, "call", fake_pip(calls, build_code=1))
    assert llama_build.main([]) == 1
    assert len(calls) == 2 and "building llama-cpp-python==0.3.36 failed" in capsys.readouterr().err
    assert llama_build.built_wheel(llama_build.wheel_folder()) is None
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [llama_build.source_folder().name]
