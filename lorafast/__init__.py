"""lorafast: fused Triton LoRA layers for PyTorch and transformers.

Quick start::

    import lorafast
    model = lorafast.apply_lora(model, lorafast.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...train...
    lorafast.merge_and_unload(model)
"""

from lorafast.adapters import load_adapter, save_adapter
from lorafast.config import LoraConfig
from lorafast.inject import (
    apply_lora,
    count_parameters,
    find_target_modules,
    lora_layers,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    unmerge,
)
from lorafast.layer import LoraLinear
from lorafast.ops import get_backend, set_backend
from lorafast.peft_compat import patch_peft, unpatch_peft

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "count_parameters",
    "find_target_modules",
    "get_backend",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "patch_peft",
    "print_trainable_parameters",
    "save_adapter",
    "set_backend",
    "unmerge",
    "unpatch_peft",
]
