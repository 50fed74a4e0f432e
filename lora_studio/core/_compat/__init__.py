"""The one place where LoRA Studio patches library internals (transformers, PEFT, tokenizers, gguf, bitsandbytes).

Each hook is its own module, named after what it hooks:

- :mod:`.tqdm_progress`: the module-level ``tqdm`` of transformers' weight-loading loops, so that a load
  reports each tensor and can be cancelled;
- :mod:`.tokenizer_swap`: ``TokenizerFast`` in transformers' tokenizer module, so that a tokenizer.json is
  parsed in steps short enough for the window to keep drawing;
- :mod:`.peft_mixed_batch`: PEFT LoRA ``Linear._mixed_batch_forward``, so that a comparison batch grouped by
  adapter adds each update to a contiguous slice instead of a gather/scatter;
- :mod:`.shared_prefix`: forward pre-hooks on the decoder layers, so that an evaluation batch of several
  variants runs the layers below the first adapted one once per example;
- :mod:`.peft_config`: LoraConfig's field list copied for the locked PEFT, so that reading an adapter
  config does not import PEFT;
- :mod:`.gguf_progress`: the tensors gguf's ``GGUFWriter.write_tensors_to_file`` writes, so that a GGUF export
  reports each tensor as it is computed and written, and can be cancelled between tensors;
- :mod:`.gguf_reader`: gguf's ``GGUFReader._get``, so that a GGUF's metadata (a vocabulary of 262k tokens) is
  parsed from a plain view of the file's mapping, without numpy's per-slice ``memmap`` overhead (~2.6× faster);
- :mod:`.ggml_quantize`: gguf's ``quants.quantize``, so that the converter's Q8_0 and BF16 tensors are quantised by
  ggml's own C quantiser of the installed llama.cpp, on every core (byte for byte gguf-py's output);
- :mod:`.bnb_cpu_unpack`: bitsandbytes' ``_convert_weight_packed_for_cpu_inverse`` as ``Linear4bit`` calls it, so
  that reading the state dict of a 4-bit base that ran on the CPU (PEFT's ``load_adapter`` does) leaves its block
  scales in order; and its ``_convert_weight_packed_for_cpu`` during QLoRA training, so that an evaluation does not
  pack the layers for an inference kernel that has no backward;
- :mod:`.peft_offload`: the ``os`` of PEFT's ``peft_model`` module while an adapter attaches to a model with layers
  offloaded to disk, so that PEFT's copies of those checkpoint files go to the session's offload folder, not under
  the working directory;
- :mod:`.peft_init_progress`: PEFT ``LoraModel._create_and_replace``, so that an adapter's init (OLoRA's QR, PiSSA's
  SVD of every layer) reports each layer and can be cancelled between layers;
- :mod:`.hf_placement`: (no patch) transformers' own placement functions in the order its ``from_pretrained`` runs
  them, so that a planned device map is the one the load makes.

Policy, the same for every hook: a patch is swapped in only for the duration of a call and only for the
calling thread (:func:`.swap.swapped`); before it is applied its target is checked, and if the target is
missing or changed (a module moved, an attribute gone, a signature different) the plain library path is
used and a warning is logged once (:func:`.swap.warn_inactive`). A feature may get slower or lose its
progress detail; it never breaks. :func:`self_check` says, for every hook, whether it applies to the
installed libraries. Only this package imports private modules of those libraries (an import-linter
contract in pyproject.toml). It depends on nothing in the core but ``errors`` and ``tasks``.

Importing this package is cheap: the libraries are imported only when a hook is used or checked.
"""

from __future__ import annotations

import importlib

ACTIVE = "active"
HOOK_MODULES = (
    "tqdm_progress",
    "tokenizer_swap",
    "peft_mixed_batch",
    "shared_prefix",
    "peft_config",
    "gguf_progress",
    "gguf_reader",
    "ggml_quantize",
    "bnb_cpu_unpack",
    "peft_offload",
    "hf_placement",
    "peft_init_progress",
)


def self_check() -> dict[str, str]:
    """For every hook, ``"active"`` or the reason it is inactive with the installed libraries."""
    report: dict[str, str] = {}
    for name in HOOK_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        report.update(module.checks())
    return report
