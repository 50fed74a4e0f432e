"""How much memory a training run needs, before it starts, with the same verdict as loading.

The parts: the base's weights (in the training dtype), the adapter with its gradients and AdamW's two
states (float32), the activations the backward pass keeps for the chosen batch × length, and the logits
with their float32 softmax and gradient (for small models with a large vocabulary the largest part).
The sizes come from the checkpoint's headers and config.json; nothing is loaded.
``benchmarks/bench_train.py`` compares the estimate with the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_studio.core.io.safetensors_format import read_headers
from lora_studio.core.model.config import read_config
from lora_studio.core.model.dtypes import DTYPE_BYTES
from lora_studio.core.model.estimate import Verdict, free_memory, judge, read_footprint
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.train.run import ATTENTION_WORDS
from lora_studio.core.train.settings import TrainSettings

# bytes kept per token per layer for the backward pass, in units of hidden size × dtype bytes: the
# inputs of the attention and MLP blocks, their norms, projections and activations (Korthikanti et al.'s
# 34·h for a 16-bit transformer block, counted here per dtype byte)
ACTIVATION_FACTOR = 17
LOGIT_COPIES = 3  # logits, their float32 log-softmax, and its gradient
RUNTIME_BYTES = 350 * 1024**2  # torch, transformers, TRL and the Python objects around a run


@dataclass(frozen=True)
class TrainingMemory:
    weights: int
    adapter_params: int
    adapter_state: int  # adapter weights + gradients + AdamW states
    activations: int
    logits: int
    runtime: int
    verdict: Verdict
    explanation: str

    @property
    def total(self) -> int:
        return self.weights + self.adapter_state + self.activations + self.logits + self.runtime

    def summary(self) -> str:
        return (
            f"needs about {format_bytes(self.total)}: weights {format_bytes(self.weights)}, adapter + gradients + "
            f"optimizer {format_bytes(self.adapter_state)}, activations {format_bytes(self.activations)}, "
            f"logits {format_bytes(self.logits)}"
        )

    def to_json(self) -> dict:
        return {
            "total_bytes": self.total,
            "weights_bytes": self.weights,
            "adapter_params": self.adapter_params,
            "adapter_state_bytes": self.adapter_state,
            "activations_bytes": self.activations,
            "logits_bytes": self.logits,
            "runtime_bytes": self.runtime,
            "verdict": self.verdict,
            "explanation": self.explanation,
        }


def adapter_parameters(source: ModelSource, settings: TrainSettings) -> int:
    """r·(in + out) for every weight the targets select, from the checkpoint's headers."""
    shapes = {} if source.gguf_file else {n: t.shape for h in read_headers(source.path) for n, t in h.tensors.items()}
    total = 0
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2 or "embed" in name or "lm_head" in name:
            continue
        module = name[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        targets = settings.targets
        if targets == ("attention",):
            chosen = any(w in module.lower() for w in ATTENTION_WORDS)
        else:
            chosen = targets == ("all-linear",) or leaf in targets
        if chosen:
            total += settings.r * (shape[0] + shape[1]) + (shape[0] if settings.dora else 0)
    return total


def training_memory(
    source: ModelSource,
    settings: TrainSettings,
    *,
    longest_row: int | None = None,
    free_ram_bytes: int | None = None,
) -> TrainingMemory:
    """The memory a run needs. Batches are padded to their longest row: ``longest_row`` (when the data is
    known) bounds the length, else ``max_length`` does."""
    footprint = read_footprint(source)
    config = read_config(source, missing_ok=True)
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    vocab = int(text.get("vocab_size") or 0)
    width = DTYPE_BYTES.get(settings.dtype, 4)
    length = min(settings.max_length, longest_row) if longest_row else settings.max_length
    tokens = settings.batch_size * length
    weights = footprint.params * width
    adapter = adapter_parameters(source, settings) or footprint.params // 100
    adapter_state = adapter * 4 * 4  # weights, gradients, two AdamW moments, float32
    activations = ACTIVATION_FACTOR * hidden * layers * tokens * width
    logits = LOGIT_COPIES * tokens * vocab * 4
    needed = weights + adapter_state + activations + logits + RUNTIME_BYTES
    free_ram, free_gpu = free_memory(free_ram_bytes)
    verdict, _where, why = judge(settings.device, needed, free_ram, free_gpu)
    if verdict != "fits":
        why += ": lower the batch size or the max length"
    return TrainingMemory(weights, adapter, adapter_state, activations, logits, RUNTIME_BYTES, verdict, why)
