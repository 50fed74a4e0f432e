"""The GGUF output types: which ones llama.cpp's converter writes, which its quantiser makes from the converter's
f16 file, and how closely each must agree with the adapter model to pass verification.

Thresholds (llama.cpp's output against the adapter model in transformers, teacher-forced on the
adapter model's greedy continuations of the verification prompts; "agreement" is the share of
generated positions where llama.cpp's greedy choice is the adapter model's, "KL" the mean
KL(adapter ‖ llama.cpp) over the adapter model's top-k next-token distribution):

=========  ==========  =========
type       agreement   mean KL
=========  ==========  =========
f32        100 %       1e-4
f16        95 %        2e-3
bf16       90 %        1e-2
q8_0       85 %        1e-2
q6_k       85 %        3e-2
q5_k_m     80 %        6e-2
q5_0/1     80 %        6e-2
q4_k_m     70 %        0.15
q4_0/1     65 %        0.2
=========  ==========  =========

Within both: "pass"; within twice the KL and 10 points less agreement: "warn"; else "fail".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lora_studio.core.errors import UserError

if TYPE_CHECKING:
    import gguf

Writer = Literal["converter", "llama.cpp"]


@dataclass(frozen=True)
class OutputType:
    name: str
    writer: Writer  # "converter": convert_hf_to_gguf's types; "llama.cpp": llama_model_quantize from an f16 file
    bits_per_weight: float  # for the size prediction (2-D weights; norms and biases stay float32)
    agreement: float
    kl: float
    description: str


OUTPUT_TYPES: dict[str, OutputType] = {
    t.name: t
    for t in (
        OutputType("f32", "converter", 32.0, 1.0, 1e-4, "float32: lossless, largest"),
        OutputType("f16", "converter", 16.0, 0.95, 2e-3, "float16: near-lossless"),
        OutputType("bf16", "converter", 16.0, 0.90, 1e-2, "bfloat16: a bf16 model's own precision"),
        OutputType("q8_0", "converter", 8.5, 0.85, 1e-2, "8-bit: close to f16 at half the size"),
        OutputType("q5_0", "llama.cpp", 5.5, 0.80, 6e-2, "5-bit (legacy; llama.cpp's quantiser)"),
        OutputType("q5_1", "llama.cpp", 6.0, 0.80, 6e-2, "5-bit with offsets (legacy; llama.cpp's quantiser)"),
        OutputType("q4_0", "llama.cpp", 4.5, 0.65, 0.2, "4-bit (legacy; llama.cpp's quantiser)"),
        OutputType("q4_1", "llama.cpp", 5.0, 0.65, 0.2, "4-bit with offsets (legacy; llama.cpp's quantiser)"),
        OutputType("q6_k", "llama.cpp", 6.56, 0.85, 3e-2, "6-bit K-quant (llama.cpp's quantiser)"),
        OutputType("q5_k_m", "llama.cpp", 5.7, 0.80, 6e-2, "5-bit K-quant, medium (llama.cpp's quantiser)"),
        OutputType("q4_k_m", "llama.cpp", 4.9, 0.70, 0.15, "4-bit K-quant, medium: the usual choice"),
    )
}
DEFAULT_TYPE = "q8_0"
# llama.cpp's quantiser reads this intermediate type (written by the converter) and writes the K-quant or legacy type
K_QUANT_SOURCE = "f16"


def output_type(name: str) -> OutputType:
    try:
        return OUTPUT_TYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown GGUF type {name!r}", f"choose one of {', '.join(OUTPUT_TYPES)}") from None


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    """gguf's GGMLQuantizationType for a type the Python path writes."""
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def llama_file_type(name: str) -> int:
    """The ``general.file_type`` value (gguf.LlamaFileType) of an output type."""
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
    return int(gguf.LlamaFileType[names.get(name, "MOSTLY_" + name.upper())])
