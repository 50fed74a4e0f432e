"""Base models.

Where one comes from (folder, HF cache, GGUF), its config.json (one reader, the tied-embedding rule), the dtypes it
is loaded and merged in, how big it is and whether it fits (estimate), and loading it with its tokenizer.
"""
