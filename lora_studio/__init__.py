"""LoRA Studio: load a base causal LM, attach and compare LoRA adapters, merge and save."""

__version__ = "0.1.0"
