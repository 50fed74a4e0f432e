"""How many adapters of one rank vLLM can serve beside the model on a GPU of a given size.

vLLM's multi-LoRA serving keeps ``--max-loras`` adapter *slots* on the GPU, allocated when the server starts, whether
or not adapters fill them (``vllm/lora/layers``: each LoRA-capable linear layer allocates ``lora_a_stacked``
``[max_loras, 1, max_lora_rank, in]`` and ``lora_b_stacked`` ``[max_loras, 1, out, max_lora_rank]`` in the LoRA
dtype, the base's by default; ``vllm/config/lora.py``). Without ``target_modules`` every supported module of every
layer gets its slot, so for a Llama-style decoder one slot costs

    layers × max_lora_rank × dtype bytes
           × ((hidden + q) + 2·(hidden + kv) + (q + hidden) + 2·(hidden + ffn) + (ffn + hidden))

with q = heads × head_dim and kv = kv_heads × head_dim (q, k, v, o, gate, up, down: A is r × in, B is out × r).
Adapters beyond the slots wait in a CPU cache of ``--max-cpu-loras`` (each at its own size; it must be ≥
``--max-loras``). vLLM gives the GPU's ``--gpu-memory-utilization`` share (0.9 by default) to the weights, the LoRA
slots, activations and then the KV cache; the plan keeps a KV cache for ``KV_SEQUENCES`` sequences of
``KV_TOKENS`` tokens and a working margin, and fills what is left with slots, at most ``MAX_SUGGESTED_LORAS``
(the multi-LoRA kernels' cost grows with the slots a batch may use).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lora_studio.core.system.memory import format_bytes

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
KV_SEQUENCES = 8
KV_TOKENS = 4096
WORKING_MARGIN = 1024**3  # activations, CUDA graphs and the allocator's slack
MAX_SUGGESTED_LORAS = 16
CPU_CACHE_FACTOR = 4  # adapters kept in CPU memory per GPU slot
DEFAULT_GPU_GIB = 24.0
SOURCE = "docs/serving.md#vllm-multi-lora-slots"


@dataclass(frozen=True)
class ServingPlan:
    gpu_bytes: int
    max_lora_rank: int
    slot_bytes: int  # one adapter slot on the GPU
    weights_bytes: int  # the model served in the LoRA dtype
    kv_bytes: int  # the KV cache kept for KV_SEQUENCES × KV_TOKENS
    fit: int  # slots that fit beside the model
    max_loras: int  # the suggested --max-loras (0: the model leaves no room)
    max_cpu_loras: int
    adapter_bytes: int  # this adapter in the CPU cache

    def to_json(self) -> dict:
        return asdict(self)

    def flags(self) -> str:
        """The vLLM flags of the plan ("" when no slot fits)."""
        if self.max_loras < 1:
            return ""
        return f" --max-loras {self.max_loras} --max-cpu-loras {self.max_cpu_loras}"

    def lines(self) -> list[str]:
        """The plan as the bundle's README says it."""
        gpu = format_bytes(self.gpu_bytes)
        if self.max_loras < 1:
            return [
                f"On a {gpu} GPU at vLLM's defaults the model ({format_bytes(self.weights_bytes)}) and a KV cache for "
                f"{KV_SEQUENCES} × {KV_TOKENS} tokens ({format_bytes(self.kv_bytes)}) leave no room for an adapter "
                f"slot of rank {self.max_lora_rank} ({format_bytes(self.slot_bytes)}): pick a larger GPU."
            ]
        return [
            f"On a {gpu} GPU (vLLM's --gpu-memory-utilization {GPU_MEMORY_UTILIZATION}): the model "
            f"{format_bytes(self.weights_bytes)}, a KV cache for {KV_SEQUENCES} × {KV_TOKENS} tokens "
            f"{format_bytes(self.kv_bytes)}, and {self.fit} adapter slots of rank {self.max_lora_rank} at "
            f"{format_bytes(self.slot_bytes)} each would fit.",
            f"Suggested: --max-loras {self.max_loras} (adapters in one batch) and --max-cpu-loras "
            f"{self.max_cpu_loras} (kept in CPU memory, {format_bytes(self.adapter_bytes)} each).",
            f"Formula and source: {SOURCE}.",
        ]


def _dimensions(config: dict) -> tuple[int, int, int, int, int]:
    """(layers, hidden, q, kv, ffn) of a decoder config: q = heads × head_dim, kv = kv_heads × head_dim."""
    hidden = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // max(1, heads))
    ffn = int(config.get("intermediate_size") or 4 * hidden)
    return int(config.get("num_hidden_layers") or 0), hidden, heads * head_dim, kv_heads * head_dim, ffn


def slot_bytes(config: dict, max_lora_rank: int, dtype_bytes: int = 2) -> int:
    """One vLLM adapter slot: every LoRA-capable linear of every layer at ``max_lora_rank`` (see the module doc)."""
    layers, hidden, q, kv, ffn = _dimensions(config)
    per_rank = (hidden + q) + 2 * (hidden + kv) + (q + hidden) + 2 * (hidden + ffn) + (ffn + hidden)
    return layers * max_lora_rank * per_rank * dtype_bytes


def kv_bytes(config: dict, dtype_bytes: int = 2) -> int:
    """The KV cache for KV_SEQUENCES × KV_TOKENS tokens (keys and values of every layer)."""
    layers, _, _, kv, _ = _dimensions(config)
    return 2 * layers * kv * dtype_bytes * KV_SEQUENCES * KV_TOKENS


def serving_plan(
    config: dict, params: int, adapter_params: int, max_lora_rank: int, gpu_gib: float = DEFAULT_GPU_GIB
) -> ServingPlan:
    """The plan for serving the adapter (``adapter_params`` values, max rank ``max_lora_rank``) on the base
    (``config``, ``params`` values) in 16-bit on a GPU of ``gpu_gib`` GiB."""
    gpu = int(gpu_gib * 1024**3)
    weights = params * 2
    kv = kv_bytes(config)
    slot = max(1, slot_bytes(config, max_lora_rank))
    room = gpu * GPU_MEMORY_UTILIZATION - weights - kv - WORKING_MARGIN
    fit = max(0, int(room // slot))
    max_loras = min(fit, MAX_SUGGESTED_LORAS)
    return ServingPlan(
        gpu, max_lora_rank, slot, weights, kv, fit, max_loras, max_loras * CPU_CACHE_FACTOR, adapter_params * 2
    )
