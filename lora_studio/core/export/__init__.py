"""Shipping an adapter: GGUF files llama.cpp, Ollama and their kin load, proven in llama.cpp itself.

``run`` plans and runs an export (``plan_export``, ``export_gguf``); ``merged`` streams a merged
GGUF, ``adapter`` writes an adapter-only GGUF; ``architecture`` and ``vocab`` follow llama.cpp's
converter for tensor names, hyperparameters and the tokenizer; ``gguf_types`` lists the output
types and their verification thresholds; ``runtime`` is llama.cpp (quantiser and runner, optional);
``verify`` compares llama.cpp with the adapter model and checks the chat template and stop tokens;
``bundle`` writes the Ollama / llama-server / vLLM lines beside the file; ``mlx`` writes an adapter for mlx-lm (or
a PEFT adapter from one), checked in mlx-lm itself; ``request`` holds what every export is asked and gives.
"""

from lora_studio.core.export.gguf_types import DEFAULT_TYPE, OUTPUT_TYPES, OutputType
from lora_studio.core.export.request import (
    FORMATS,
    GGUF_FORMATS,
    MLX_FORMATS,
    ExportPlan,
    ExportRequest,
    ExportResult,
    Format,
)
from lora_studio.core.export.run import export_gguf, plan_export
from lora_studio.core.export.verify import GgufVerification, TemplateCheck

__all__ = [
    "DEFAULT_TYPE",
    "FORMATS",
    "GGUF_FORMATS",
    "MLX_FORMATS",
    "OUTPUT_TYPES",
    "ExportPlan",
    "ExportRequest",
    "ExportResult",
    "Format",
    "GgufVerification",
    "OutputType",
    "TemplateCheck",
    "export_gguf",
    "plan_export",
]
