"""The model a window benchmark drives: the demo with its pirate adapter when installed, else a random Llama."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_or_random(tmp: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, use_demo: bool = True):
    """(base folder, adapter folder, description). The random model and its r=8 adapter are written under ``tmp``."""
    if use_demo:
        from lora_studio.core.demo import assets as demo_assets
        from lora_studio.core.demo import model as demo

        adapters = {a.name: a.path for a in demo_assets.demo_adapters()}
        if demo.demo_source_if_available() is not None and "pirate" in adapters:
            source = demo.ensure_demo_model()  # converts the GGUF once, then finds the folder
            return str(source.path), str(adapters["pirate"]), "demo SmolLM2-135M + pirate"
    sys.path.insert(0, str(REPO / "tests"))
    import factories

    base = factories.make_llama(
        tmp / "bench-llama",
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    adapter = factories.make_adapter(base, tmp / "bench-adapter", r=8, lora_alpha=16)
    return str(base), str(adapter), f"random Llama {layers}x{hidden} + r=8 adapter"
