"""Which Hugging Face architectures become which llama.cpp architecture, and how their tensors are named.

Follows llama.cpp's own converter (``convert_hf_to_gguf.py``, classes ``LlamaModel`` and
``Qwen2Model``): the hyperparameters it writes, its tensor names (gguf's
``TensorNameMap``) and the Llama rotary permutation of the q/k projections (Hugging
Face stores them in the "half-split" rotary order, llama.cpp in the interleaved one).
Anything else is refused with the reason, before a byte is written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_studio.core.errors import UserError

if TYPE_CHECKING:
    import gguf
    import torch

# HF architecture -> (llama.cpp architecture name, whether q/k are permuted)
SUPPORTED: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),  # llama.cpp runs Mistral as "llama"
    "Qwen2ForCausalLM": ("qwen2", False),
}
SUPPORTED_FAMILIES = "Llama (incl. SmolLM2), Mistral, Qwen2"
# a config without "architectures" (written by a bare PretrainedConfig) names its family by model_type
BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    gguf_name: str  # "llama", "qwen2"
    permute_qk: bool
    config: dict
    n_blocks: int
    n_head: int
    n_head_kv: int

    def tensor_map(self) -> gguf.TensorNameMap:
        return _tensor_map(self.gguf_name, self.n_blocks)

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        import gguf

        return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.gguf_name)

    def gguf_name_of(self, hf_name: str) -> str | None:
        """llama.cpp's name of a checkpoint tensor; None for the ones llama.cpp does not load (rotary caches)."""
        if hf_name.endswith(SKIPPED_SUFFIXES):
            return None
        name = self.tensor_map().get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(
                f"the checkpoint tensor {hf_name} has no llama.cpp name for {self.gguf_name}",
                "this checkpoint has parts llama.cpp's architecture does not have; it cannot be exported to GGUF",
            )
        return name

    def permutation(self, hf_name: str) -> int | None:
        """Heads to permute by for a q/k projection (weight or bias, or its LoRA B); None otherwise."""
        if not self.permute_qk:
            return None
        module = hf_name.removesuffix(".weight").removesuffix(".bias")
        if module.endswith("q_proj"):
            return self.n_head
        if module.endswith("k_proj"):
            return self.n_head_kv
        return None


@functools.lru_cache(maxsize=8)
def _tensor_map(gguf_name: str, n_blocks: int) -> gguf.TensorNameMap:
    """gguf's name map (building one takes ~10 ms: once per architecture and depth, not once per tensor)."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_name)
    return gguf.get_tensor_name_map(arch, n_blocks)


def permute_rows(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the first axis (the output rows of a q/k projection)."""
    rows = tensor.shape[0]
    return tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def architecture(config: dict) -> Architecture:
    """The llama.cpp architecture of a Hugging Face config, or a UserError saying why it is refused."""
    names = config.get("architectures") or []
    model_type = str(config.get("model_type", "?"))
    hf_name = names[0] if names else BY_MODEL_TYPE.get(model_type, model_type)
    if hf_name not in SUPPORTED:
        raise UserError(
            f"GGUF export supports {SUPPORTED_FAMILIES} models; this base is {hf_name}",
            "export a merged Hugging Face folder instead, and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    if config.get("quantization_config"):
        raise UserError(
            "the base checkpoint is quantised; GGUF export needs the original float weights",
            "pick the unquantised model folder",
        )
    gguf_name, permute = SUPPORTED[hf_name]
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    return Architecture(hf_name, gguf_name, permute, config, int(config["num_hidden_layers"]), n_head, n_head_kv)


def rope_parameters(config: dict) -> dict:
    """RoPE settings from either config layout (transformers 5's ``rope_parameters`` or the older keys)."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def add_hyperparameters(writer: gguf.GGUFWriter, arch: Architecture) -> None:
    """The hyperparameters llama.cpp reads, as its converter writes them (``TextModel.set_gguf_parameters``)."""
    import gguf

    cfg = arch.config
    writer.add_block_count(arch.n_blocks)
    if (n_ctx := cfg.get("max_position_embeddings")) is not None:
        writer.add_context_length(int(n_ctx))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    rope = rope_parameters(cfg)
    rope_type = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is the rope_freqs tensor (extra_tensors)
        raise UserError(
            f"the base uses RoPE scaling {rope_type!r}, which this GGUF export does not write",
            "export a merged Hugging Face folder and convert it with llama.cpp's converter",
        )
    if (theta := rope.get("rope_theta")) is not None:
        writer.add_rope_freq_base(float(theta))
    if (eps := cfg.get("rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    if (head_dim := cfg.get("head_dim")) is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if arch.gguf_name == "llama":
        writer.add_vocab_size(int(cfg["vocab_size"]))
        writer.add_rope_dimension_count(int(head_dim or cfg["hidden_size"] // arch.n_head))


def extra_tensors(arch: Architecture) -> list[tuple[str, Any]]:
    """Tensors llama.cpp needs that the checkpoint lacks: Llama 3's rope_freqs (its converter's
    ``LlamaModel.generate_extra_tensors``)."""
    rope = rope_parameters(arch.config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    cfg = arch.config
    base = float(rope.get("rope_theta", 10000.0))
    dim = int(cfg.get("head_dim") or cfg["hidden_size"] // arch.n_head)
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    import torch

    # the same float32 torch arithmetic as llama.cpp's converter, so the tensor has the same bits
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors: list[float] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())]
