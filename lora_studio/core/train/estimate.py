"""How much memory a training run needs, before it starts, with the same verdict as loading.

The parts on the training device: the base's weights (in the training dtype; for QLoRA its linear weights in 4 or
8 bits), the adapter with its
gradients and AdamW's two states (float32), the activations the backward pass keeps for the chosen
batch × length (with gradient checkpointing, TRL's default which the job keeps: each layer's input, plus
one layer's activations while it is recomputed), and the logits in the training dtype with the float32
copy the loss takes (for small models with a large vocabulary the largest part). In host RAM: the
libraries a run imports. On the CPU all of it is RAM; on a GPU the device part is judged against the
GPU's free memory and the host part against free RAM. The checkpoint's pages, mapped while the weights
load, show in the process's RSS but are page cache the system can take back: reported, not required.
The sizes come from the checkpoint's headers and config.json; nothing is loaded.
``benchmarks/bench_train.py`` compares the estimate with the measured peak (RSS on the CPU, torch's peak
allocation on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lora_studio.core.io.safetensors_format import read_headers
from lora_studio.core.model.config import read_config
from lora_studio.core.model.dtypes import DTYPE_BYTES
from lora_studio.core.model.estimate import Verdict, free_memory, judge, quantized_weight_bytes, read_footprint
from lora_studio.core.model.sources import ModelSource
from lora_studio.core.system.memory import format_bytes
from lora_studio.core.train.run import ATTENTION_WORDS
from lora_studio.core.train.settings import TrainSettings

# bytes one layer keeps per token for its backward pass, in units of hidden size × dtype bytes: the inputs
# of the attention and MLP blocks, their norms, projections and activations (Korthikanti et al.'s 34·h for
# a 16-bit transformer block, counted here per dtype byte). With gradient checkpointing only the layer
# being recomputed holds them; every other layer keeps its input (1·h).
ACTIVATION_FACTOR = 17
LOGIT_LOSS_BYTES = 4  # the float32 copy of the logits that the loss takes, beside the logits themselves
# Host RAM of the process around a run: Python, torch, transformers, PEFT, TRL and datasets imported
# (435 MiB measured on the CPU) and the Python objects of a run.
RUNTIME_BYTES = 450 * 1024**2


@dataclass(frozen=True)
class TrainingMemory:
    weights: int
    adapter_params: int
    adapter_state: int  # adapter weights + gradients + AdamW states
    activations: int
    logits: int
    runtime: int  # host RAM: the imported libraries and the run's Python objects
    # the checkpoint's pages, mapped while the weights load: counted in the process's RSS, but page cache the
    # system takes back under pressure, so not part of what must be free
    loading: int
    device: str
    verdict: Verdict
    explanation: str

    @property
    def on_device(self) -> int:
        """What the training device holds: weights, adapter state, activations, logits."""
        return self.weights + self.adapter_state + self.activations + self.logits

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def host(self) -> int:
        """The RAM the run needs free: the runtime, plus everything on the device when that is the CPU."""
        return self.runtime + (0 if self.on_gpu else self.on_device)

    @property
    def total(self) -> int:
        """Everything, the loading pages included: on the CPU, what the process's peak RSS should come to."""
        return self.on_device + self.runtime + self.loading

    def summary(self) -> str:
        parts = (
            f"weights {format_bytes(self.weights)}, adapter + gradients + optimizer "
            f"{format_bytes(self.adapter_state)}, activations {format_bytes(self.activations)}, "
            f"logits {format_bytes(self.logits)}"
        )
        if self.on_gpu:  # the libraries are the RAM in brackets
            where = f"on {self.device} (+ {format_bytes(self.host)} RAM)"
            return f"needs about {format_bytes(self.on_device)} {where}: {parts}"
        return f"needs about {format_bytes(self.host)}: {parts}, libraries {format_bytes(self.runtime)}"

    def to_json(self) -> dict:
        return {
            "total_bytes": self.total,
            "on_device_bytes": self.on_device,
            "host_bytes": self.host,
            "device": self.device,
            "loading_bytes": self.loading,
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
    gguf_hidden, gguf_layers, gguf_vocab = footprint.gguf_sizes  # a GGUF base's, from its metadata
    hidden = int(text.get("hidden_size") or text.get("n_embd") or gguf_hidden)
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or gguf_layers)
    vocab = int(text.get("vocab_size") or gguf_vocab)
    width = DTYPE_BYTES.get(settings.dtype, 4)
    length = min(settings.max_length, longest_row) if longest_row else settings.max_length
    tokens = settings.batch_size * length
    weights = footprint.params * width
    if settings.quantize and not source.gguf_file:
        weights = quantized_weight_bytes(footprint.params, config, settings.dtype, settings.quantize)
    adapter = adapter_parameters(source, settings) or footprint.params // 100
    adapter_state = adapter * 4 * 4  # weights, gradients, two AdamW moments, float32
    activations = (layers + ACTIVATION_FACTOR) * hidden * tokens * width
    logits = tokens * vocab * (width + LOGIT_LOSS_BYTES)
    loading = footprint.checkpoint_bytes
    parts = (weights, adapter, adapter_state, activations, logits, RUNTIME_BYTES, loading)
    memory = TrainingMemory(*parts, device=settings.device, verdict="fits", explanation="")
    free_ram, free_gpu = free_memory(free_ram_bytes)
    if memory.on_gpu:
        verdict, _where, why = judge(settings.device, memory.on_device, free_ram, free_gpu)
        if verdict == "fits" and memory.host > free_ram:
            verdict = "does_not_fit"
            why = f"needs {format_bytes(memory.host)} RAM beside the GPU but only {format_bytes(free_ram)} is free"
    else:
        verdict, _where, why = judge(settings.device, memory.host, free_ram, free_gpu)
    # the summary already says what the run needs; the line adds what is free ("needs X, Y free" said X twice)
    for needed in (memory.on_device, memory.host):
        why = why.replace(f"needs {format_bytes(needed)}, ", "").replace(f"needs {format_bytes(needed)} but ", "but ")
    if verdict != "fits":
        why += ": lower the batch size or the max length"
    return replace(memory, verdict=verdict, explanation=why)
