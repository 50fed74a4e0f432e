"""The headless core: models, adapters, generation, merging, memory.

Nothing in this package imports Qt (an import-linter contract in pyproject.toml
enforces it), so the window, the CLI, tests and benchmarks all drive the same code.
Heavy libraries (torch, transformers, peft) are imported inside functions so that
importing the core stays cheap for the window's start-up.
"""
