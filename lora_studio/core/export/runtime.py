"""llama.cpp itself, through the ``llama-cpp-python`` package: K-quantisation and running an exported GGUF.

The package is optional: it is built from its source distribution (minutes, once; pip keeps
the built wheel), so a new user's window opens without it. Exports work without it; the
K-quant types and the verification in llama.cpp then say what is missing and how to add it.

Quantisation runs llama.cpp's ``llama_model_quantize`` in a child process: one C call that
cannot be interrupted, so Cancel kills the child, and progress is the output file's growth.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_studio.core.errors import Cancelled, UserError
from lora_studio.core.system.installer import run_installer
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report

if TYPE_CHECKING:
    import llama_cpp
    import numpy as np

logger = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
PINNED = "llama-cpp-python==0.3.36"  # the release whose vendored llama.cpp the export follows
INSTALL_HINT = (
    f"install llama.cpp's Python binding: `make llama-cpp` (or Install llama.cpp… in the window's Merge tab); "
    f"it builds {PINNED} from source once, 6-9 minutes on 2 cores"
)
QUANTISE_STAGE = "quantising with llama.cpp"


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, without importing it (None: not installed)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_llama_cpp(purpose: str) -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(f"{purpose} needs llama.cpp, which is not installed", INSTALL_HINT) from exc
    return llama_cpp


def install_command() -> list[str]:
    """The command that installs llama.cpp's binding into this Python (what the window runs in the background).

    A portable build (see ``llama_build``): pip's own install would reuse a CPU-tuned wheel from its cache.
    """
    return [sys.executable, "-m", "lora_studio.core.export.llama_build"]


def install_llama_cpp(*, cancel: CancelToken, report: Report = no_report) -> str:
    """Install llama.cpp's binding into this Python with pip (a long job: Cancel kills pip); its version."""
    run_installer(
        install_command(),
        "llama.cpp",
        building="building llama.cpp from source (several minutes, once)",
        hint="the log file has pip's output; a C++ compiler and cmake are needed to build it",
        cancel=cancel,
        report=report,
    )
    version = llama_cpp_version()
    if version is None:
        raise UserError(f"pip reported success but {PACKAGE} is not importable", "see the log file")
    if "gguf" in sys.modules:  # this process keeps the gguf it imported; the converter needs the one just installed
        _restart.needed = True
    return version


class _restart:
    needed = False


def restart_needed() -> bool:
    """True when llama.cpp (and its gguf-py) was installed after this process imported gguf: GGUF export then
    waits for a restart, so the converter never runs on another version of gguf than its own."""
    return _restart.needed


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp prints to file descriptor 2 from C; keep it off the user's terminal (logged at debug)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                logger.debug("llama.cpp: %s", text[-4000:])


def quantise_file(
    source: Path,
    out: Path,
    type_name: str,
    expected_bytes: int,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> None:
    """llama.cpp's quantiser, ``source`` (an f16/bf16 GGUF) -> ``out`` of ``type_name`` (e.g. q4_k_m)."""
    llama_cpp = require_llama_cpp(f"the {type_name} type")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise UserError(f"this llama.cpp cannot write {type_name}", f"update {PACKAGE}")
    cancel = cancel or CancelToken()
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {int(ftype)}\n"
        f"p.nthread = {max(1, os.cpu_count() or 1)}\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )
    report(Progress(0, expected_bytes, QUANTISE_STAGE, "bytes"))
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(source), str(out)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while child.poll() is None:
                if cancel.cancelled:
                    child.kill()
                    child.wait()
                    raise Cancelled()
                with contextlib.suppress(OSError):
                    report(Progress(min(out.stat().st_size, expected_bytes), expected_bytes, QUANTISE_STAGE, "bytes"))
                time.sleep(0.2)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode != 0:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"llama.cpp could not quantise to {type_name}: {tail[0]}", "see the log file for more")
    report(Progress(expected_bytes, expected_bytes, QUANTISE_STAGE, "bytes"))


class LlamaCppCannotRun(UserError):
    """The installed llama.cpp build dies when it evaluates a model on this machine (a CPU it was not built for)."""


# llama-cpp-python version -> None (its build evaluated a model here) or the error it died with
_build_checked: dict[str, LlamaCppCannotRun | None] = {}
_PROBE = (
    "import sys, llama_cpp\n"
    "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, n_batch=32, n_threads=1, verbose=False)\n"
    "llm.eval(llm.tokenize(b'Hello there', add_bos=True))\n"
)


def check_build_runs(model: Path, timeout_s: float = 120.0) -> None:
    """Evaluate a few tokens of ``model`` in a child process, once per llama.cpp version and process.

    A build tuned to another CPU dies in ``decode`` (SIGSEGV, SIGILL), and in this process it would take the
    window, or a test run, down with it; in a child it becomes one clear error. A child that merely fails (an
    unreadable file) says nothing about the build: the real load reports that.
    """
    version = llama_cpp_version() or "?"
    if version in _build_checked:
        known = _build_checked[version]
        if known is not None:
            raise known
        return
    quiet = subprocess.DEVNULL  # llama.cpp's own chatter; only the exit status says anything here
    child = subprocess.Popen([sys.executable, "-c", _PROBE, str(model)], stdout=quiet, stderr=quiet)
    try:
        code = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return  # slow, not dead: let the real run go ahead
    if code >= 0:
        _build_checked[version] = None
        return
    import signal

    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    error = LlamaCppCannotRun(
        f"llama.cpp (llama-cpp-python {version}) crashes on this machine ({name} running a model)",
        "it was built for another CPU; rebuild it portable: `python -m lora_studio.core.export.llama_build`",
    )
    logger.warning("%s", error)
    _build_checked[version] = error
    raise error


class GgufRunner:
    """A GGUF loaded in llama.cpp (optionally with an adapter GGUF on top), for scoring and tokenising."""

    def __init__(
        self,
        model: Path,
        lora: Path | None = None,
        n_ctx: int = 512,
        lora_scale: float = 1.0,
        float32_cache: bool = False,
    ) -> None:
        """``float32_cache``: keys and values kept in float32 (llama.cpp's default, float16, rounds them)."""
        from lora_studio.core.io.paths import regular_file

        for path in (model, lora):
            if path is not None:  # llama.cpp would block for ever reading a pipe
                regular_file(Path(path), "GGUF file")
        require_llama_cpp("checking the export in llama.cpp")
        check_build_runs(model)
        from llama_cpp import Llama

        kwargs: dict[str, Any] = {}
        if lora is not None:
            kwargs.update(lora_path=str(lora), lora_scale=lora_scale)
        if float32_cache:
            kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32
        with quiet_stderr():
            try:
                self.llm = Llama(
                    model_path=str(model),
                    logits_all=True,
                    n_ctx=n_ctx,
                    n_batch=n_ctx,
                    n_threads=max(1, os.cpu_count() or 1),
                    verbose=False,
                    **kwargs,
                )
            except (ValueError, RuntimeError) as exc:
                raise UserError(f"llama.cpp cannot load {Path(model).name}: {exc}", "the export is not usable") from exc

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> GgufRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position of ``tokens`` (float32, [len, vocab])."""
        import numpy as np

        self.llm.reset()
        with quiet_stderr():
            self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """llama.cpp's own greedy continuation of ``prompt`` (its KV cache, one token at a time)."""
        self.llm.reset()
        out: list[int] = []
        with quiet_stderr():
            self.llm.eval(prompt)
            for _ in range(new_tokens):
                token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
                out.append(token)
                self.llm.eval([token])
        return out

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def bos(self) -> int:
        return int(self.llm.token_bos())

    def eos(self) -> int:
        return int(self.llm.token_eos())

    def _vocab(self) -> llama_cpp.llama_vocab_p:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)  # the C API's vocabulary of the loaded model
        assert vocab is not None  # a loaded model has one
        return vocab

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab(), token))

    def token_text(self, token: int) -> str:
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self._vocab(), token).decode("utf-8", "replace")
