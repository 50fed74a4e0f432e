"""Files on disk: the safetensors format read and written as a stream, shard writing, the page cache, atomic output folders, and where LoRA Studio keeps its own files."""
