"""The Merge tab: adapters merged into their base (or exported as GGUF), planned first, verified after."""
