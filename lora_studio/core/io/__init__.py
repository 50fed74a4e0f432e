"""Files on disk, below every concept that uses them.

The safetensors format (headers, one tensor at a time), the streaming shard writer (direct I/O, background writes,
index), the page cache around checkpoints (read-ahead, warm-up), atomic output folders, and where LoRA Studio keeps
its own files (paths).
"""
