"""Side-by-side comparison: variants (base, adapters, combinations, merged folders) run on the same prompts in one mixed batch, and how far their outputs diverge."""
