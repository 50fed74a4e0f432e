"""LoraConfig's field list, copied for the locked PEFT, so that reading adapter_config.json does not import PEFT.

Importing peft only to list LoraConfig's fields costs ~3 s and ~110 MB (it imports transformers), which
the streaming merge otherwise never needs. :data:`LORA_FIELDS` is a fast path only: it is used when
exactly :data:`LOCKED_PEFT_VERSION` is installed and the config has no other key; any other key (or
another PEFT, with a warning once) is checked against the installed LoraConfig itself, so a setting
from a newer PEFT is still refused.
"""

from __future__ import annotations

import dataclasses
import functools

from lora_studio.core._compat import ACTIVE
from lora_studio.core._compat.swap import warn_inactive

HOOK = "PEFT config field list"
# Keys PEFT writes to adapter_config.json besides LoraConfig's own fields.
# fmt: off
EXTRA_CONFIG_KEYS = frozenset({"auto_mapping", "base_model_name_or_path", "revision", "peft_type", "task_type",
                               "inference_mode", "peft_version"})
# The PEFT in requirements.lock, and its LoraConfig's fields (tests compare the two).
LOCKED_PEFT_VERSION = "0.21.2"
LORA_FIELDS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core", "modules_to_save",
    "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices", "use_bdlora",
    "use_dora", "use_qalora", "use_rslora", "velora_config",
}) | EXTRA_CONFIG_KEYS
# fmt: on


@functools.cache  # read once: the metadata lookup scans sys.path (~5 ms), and every adapter config check asks
def installed_peft_version() -> str | None:
    """The installed PEFT's version from its metadata (does not import peft)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:  # pragma: no cover
        return None


def peft_config_fields() -> set[str]:
    """LoraConfig's fields in the installed PEFT, and the keys PEFT adds when saving (imports peft)."""
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)} | set(EXTRA_CONFIG_KEYS)


def unknown_config_keys(raw: dict) -> list[str]:
    """Keys of ``raw`` that the installed PEFT's LoraConfig does not have (imports peft only when it must)."""
    if set(raw) <= LORA_FIELDS:
        installed = installed_peft_version()
        if installed == LOCKED_PEFT_VERSION:
            return []
        warn_inactive(HOOK, f"PEFT {installed} is installed, the list is for {LOCKED_PEFT_VERSION}")
    return sorted(set(raw) - peft_config_fields())


def checks() -> dict[str, str]:
    installed = installed_peft_version()
    if installed != LOCKED_PEFT_VERSION:
        reason = f"PEFT {installed} is installed, the list is for {LOCKED_PEFT_VERSION}"
    else:
        actual = peft_config_fields()
        missing, gone = sorted(actual - LORA_FIELDS), sorted(LORA_FIELDS - actual)
        reason = f"LoraConfig's fields differ: missing {missing}, gone {gone}" if actual != LORA_FIELDS else ""
    return {"peft.LoraConfig fields": reason or ACTIVE}
