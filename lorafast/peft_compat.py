"""Swap-in for PEFT models: ``patch_peft`` runs PEFT's own LoRA ``Linear`` layers through lorafast's fused op.

Each patched layer gets an instance ``forward`` (PEFT's class is not touched) that calls
``lorafast.ops.lora_linear(x, W, bias, lora_A.weight, lora_B.weight, scaling, p)`` with PEFT's own
parameters, no copies, whenever the layer is in the plain state PEFT computes as
``base(x) + lora_B(lora_A(dropout(x))) · scaling``: not merged, adapters enabled, exactly one active
adapter without a LoRA variant, no per-call arguments. In every other state it calls PEFT's
forward, so ``set_adapter``, ``disable_adapter``, ``merge_adapter``, ``merge_and_unload``,
``save_pretrained`` and HF ``Trainer`` behave as without the patch. The only visible difference
is the dropout mask (lorafast draws its own; same distribution).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from lorafast import ops
from lorafast.layer import is_linear_like, unfusable_reason


def patch_peft(peft_model: nn.Module) -> nn.Module:
    """Route every PEFT LoRA ``Linear`` of ``peft_model`` through lorafast's fused op, in place; returns it.

    Layers it cannot accelerate (DoRA and other LoRA variants, ``lora_bias``, quantized or
    non-linear bases, LoRA on embeddings or convolutions) keep PEFT's forward and are listed in
    one warning, as are layers that currently have several active adapters (those run PEFT's
    forward until a single adapter is active). Patching twice is a no-op; ``unpatch_peft`` reverts.
    """
    peft_layers = _peft_lora_layers(peft_model)
    on_peft: dict[str, list[str]] = {}
    for name, layer in peft_layers:
        reason = _unsupported_reason(layer)
        if reason is None:
            if not is_patched(layer):
                layer.forward = functools.partial(_fused_forward, layer)
            if len(_active_adapters(layer)) > 1:
                reason = "several active adapters"
        if reason is not None:
            on_peft.setdefault(reason, []).append(name)
    if on_peft:
        count = sum(len(names) for names in on_peft.values())
        detail = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in on_peft.items())
        warnings.warn(
            f"lorafast.patch_peft: {count} PEFT LoRA layer(s) run PEFT's own forward ({detail})", stacklevel=2
        )
    return peft_model


def unpatch_peft(peft_model: nn.Module) -> nn.Module:
    """Give every patched layer back PEFT's own forward, in place; returns the model."""
    for _, layer in _peft_lora_layers(peft_model):
        if is_patched(layer):
            del layer.forward
    return peft_model


def is_patched(layer: nn.Module) -> bool:
    """Whether ``patch_peft`` routed this PEFT layer through the fused op."""
    forward = layer.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _fused_forward


def _peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as error:
        raise ImportError(f"lorafast.patch_peft needs the peft package: {error}") from error
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no PEFT LoRA layers to patch")
    return layers


def _unsupported_reason(layer: nn.Module) -> str | None:
    """Why this PEFT layer can never run the fused op, or None if it can."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear:
        return f"{type(layer).__name__} layers are not accelerated"
    base = layer.get_base_layer()
    if not is_linear_like(base):
        return f"base layer {type(base).__name__} (quantized or not a plain linear)"
    if unfusable_reason(base) is not None:
        return f"base layer: {unfusable_reason(base)}"
    if type(base.weight) is not nn.Parameter or not base.weight.dtype.is_floating_point:
        return "quantized base weight"
    if layer.lora_variant:
        return f"LoRA variant ({', '.join(sorted(type(v).__name__ for v in layer.lora_variant.values()))})"
    if any(layer.lora_bias.values()):
        return "lora_bias"
    return None


def _active_adapters(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _fused_adapter(layer: nn.Module, x: torch.Tensor, has_call_arguments: bool) -> str | None:
    """The one adapter the fused op can compute for this call, or None when PEFT's forward must run."""
    if has_call_arguments or layer.disable_adapters or layer.merged:
        return None
    active = _active_adapters(layer)
    if len(active) != 1 or active[0] in layer.lora_variant or layer.lora_bias.get(active[0], False):
        return None
    if not isinstance(layer.lora_dropout[active[0]], nn.Dropout | nn.Identity):
        return None
    weight = layer.get_base_layer().weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None
    return active[0]


def _fused_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``Linear.forward`` computed by ``lorafast.ops.lora_linear`` when the layer state allows it."""
    adapter = _fused_adapter(layer, x, bool(args or kwargs))
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.get_base_layer()
    weight = base.weight if isinstance(base, nn.Linear) else base.weight.t()  # Conv1D stores [in, out]
    dropout = layer.lora_dropout[adapter]
    dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return ops.lora_linear(
        x,
        weight,
        base.bias,
        layer.lora_A[adapter].weight,
        layer.lora_B[adapter].weight,
        layer.scaling[adapter],
        dropout_p,
    )
