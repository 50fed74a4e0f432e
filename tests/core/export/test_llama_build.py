"""The portable llama.cpp build: its own wheel folder, built once, installed from the file (pip itself replaced)."""

from __future__ import annotations

from pathlib import Path

from lora_studio.core.export import llama_build


def fake_pip(calls: list[tuple[list[str], dict | None]], build_code: int = 0):
    def call(command: list[str], env: dict | None = None) -> int:
        calls.append((command, env))
        if "wheel" in command:
            if build_code == 0:
                out = Path(command[command.index("-w") + 1])
                (out / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
            return build_code
        return 0

    return call


def test_the_wheel_is_built_portable_past_pips_cache_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE_DIR", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(llama_build.subprocess, "call", fake_pip(calls))
    assert llama_build.main(["-c", "requirements.lock"]) == 0
    (build, env), (install, _), (replace, _) = calls
    assert "--no-cache-dir" in build and "--no-binary" in build and env["CMAKE_ARGS"].startswith("-DGGML_NATIVE=OFF")
    wheel = llama_build.built_wheel(llama_build.wheel_folder())
    assert wheel is not None and "native-off" in wheel.parent.name and str(wheel) == install[-1] == replace[-1]
    assert install[-3:-1] == ["-c", "requirements.lock"] and "--force-reinstall" in replace
    assert [p.name for p in wheel.parent.parent.iterdir()] == [wheel.parent.name]  # no partial folder left
    calls.clear()
    assert llama_build.main([]) == 0
    assert not any("wheel" in command for command, _ in calls)  # reused


def test_a_failed_build_leaves_nothing_to_reuse(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_STUDIO_CACHE_DIR", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(llama_build.subprocess, "call", fake_pip(calls, build_code=1))
    assert llama_build.main([]) == 1
    assert len(calls) == 1 and "building llama-cpp-python==0.3.36 failed" in capsys.readouterr().err
    assert llama_build.built_wheel(llama_build.wheel_folder()) is None
    assert list((tmp_path / "wheels").iterdir()) == []
