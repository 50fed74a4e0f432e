"""Base models: where one comes from (folder, HF cache, GGUF), its config, how big it is and whether it fits, and loading it with its tokenizer."""
