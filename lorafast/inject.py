"""Model-wide LoRA: find the target modules, replace them with ``LoraLinear``, freeze, merge/unmerge."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from lorafast.config import DEFAULT_TARGET_MODULES, LoraConfig
from lorafast.layer import LoraLinear, is_linear_like, unfusable_reason


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (``get_output_embeddings()``), which ``"all-linear"`` leaves alone."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _matches(spec, name: str, module: nn.Module, head_names: set[str]) -> bool:
    """PEFT's matching rules for ``target_modules`` / ``exclude_modules`` (see ``LoraConfig``)."""
    if spec is None:
        return False
    if spec == "all-linear":
        return is_linear_like(module) and name not in head_names
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(
        (isinstance(module, item) if isinstance(item, type) else name == item or name.endswith("." + item))
        for item in spec
    )


def _resolve_targets(model: nn.Module, config: LoraConfig):
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        f"LoraConfig.target_modules is None and there is no default for model type {model_type!r}: "
        "name the modules to adapt (a list of names, a regex, 'all-linear' or module classes)"
    )


def modules_to_save_named(model: nn.Module, wanted: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules a ``modules_to_save`` entry names: PEFT's rule, every
    module whose full name ends with ``wanted`` (no dot needed: "classifier" also names
    DistilBERT's ``pre_classifier``, whose weights PEFT's sequence-classification adapters hold)."""
    return [(name, module) for name, module in model.named_modules() if name.endswith(wanted)]


def _in_modules_to_save(name: str, config: LoraConfig) -> bool:
    """Whether ``name`` is a ``modules_to_save`` module or inside one: PEFT's rule (its regex),
    under which such modules get no adapter (they are trained whole instead)."""
    return any(re.match(rf"(^|.*\.){wanted}($|\..*)", name) for wanted in config.modules_to_save or [])


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the linear modules the config adapts, in model order: matched by
    ``target_modules``, not by ``exclude_modules``, not in ``modules_to_save``."""
    targets = _resolve_targets(model, config)
    head_names = _output_head_names(model)
    matched, unsupported = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoraLinear) or _is_inside_lora(model, name):
            continue
        if _in_modules_to_save(name, config):
            continue
        if not _matches(targets, name, module, head_names) or _matches(config.exclude_modules, name, module, head_names):
            continue
        (matched if is_linear_like(module) else unsupported).append(name)
    if not matched:
        detail = f" (matched only unsupported modules: {unsupported[:5]})" if unsupported else ""
        raise ValueError(f"LoraConfig.target_modules {targets!r} matched no linear layer in the model{detail}")
    unfusable = {name: unfusable_reason(model.get_submodule(name)) for name in matched}
    unfusable = {name: reason for name, reason in unfusable.items() if reason is not None}
    if unfusable:
        listed = "; ".join(f"{name}: {reason}" for name, reason in list(unfusable.items())[:5])
        raise ValueError(
            f"lorafast cannot adapt {len(unfusable)} matched module(s), whose output is not x Wᵀ + b from "
            f"their weights ({listed}): leave them out with LoraConfig.exclude_modules, or apply LoRA "
            "before adding hooks or offloading"
        )
    return matched


def _is_inside_lora(model: nn.Module, name: str) -> bool:
    parent_name = name.rpartition(".")[0]
    return bool(parent_name) and isinstance(model.get_submodule(parent_name), LoraLinear)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def apply_lora(model: nn.Module, config, lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Adapt ``model`` in place and return it.

    Every matched ``nn.Linear`` / ``Conv1D`` becomes a ``LoraLinear`` that keeps the frozen base
    weight and bias (same storage) and owns ``lora_A`` / ``lora_B`` in ``lora_dtype`` (fp32 by
    default, as PEFT) on the base's device. Every other parameter is frozen except the biases the
    ``bias`` mode names and the modules in ``modules_to_save``. ``config`` may be a
    ``lorafast.LoraConfig``, a ``peft.LoraConfig`` or a dict.
    """
    config = LoraConfig.from_any(config)
    names = find_target_modules(model, config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        rank, alpha = config.rank_and_alpha(name)
        layer = LoraLinear(
            model.get_submodule(name),
            r=rank,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            lora_dtype=lora_dtype,
        )
        _set_submodule(model, name, layer)
    _unfreeze_kept_parameters(model, config)
    model.lora_config = config
    return model


def _unfreeze_kept_parameters(model: nn.Module, config: LoraConfig) -> None:
    for module in model.modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            is_lora = param_name in ("lora_A", "lora_B") and isinstance(module, LoraLinear)
            is_bias = param_name == "bias"
            keep = (
                is_lora
                or (is_bias and config.bias == "all")
                or (is_bias and config.bias == "lora_only" and isinstance(module, LoraLinear))
            )
            if keep:
                parameter.requires_grad_(True)
    for module_name in config.modules_to_save or []:
        kept = modules_to_save_named(model, module_name)
        if not kept:
            raise ValueError(f"LoraConfig.modules_to_save names {module_name!r}, which is not in the model")
        for _, module in kept:
            _untie_from_the_rest(model, module)
            module.requires_grad_(True)


def _untie_from_the_rest(model: nn.Module, module: nn.Module) -> None:
    """Give ``module`` its own copy of every parameter it shares with modules outside it, so
    training it leaves them alone: PEFT trains a copy of a ``modules_to_save`` module, so with
    tied embeddings (``lm_head`` sharing ``embed_tokens.weight``) the input embeddings stay frozen."""
    inside = {id(m) for m in module.modules()}
    outside = {id(p) for m in model.modules() if id(m) not in inside for p in m.parameters(recurse=False)}
    for owner in module.modules():
        for param_name, parameter in owner.named_parameters(recurse=False):
            if id(parameter) in outside:
                setattr(owner, param_name, nn.Parameter(parameter.detach().clone(), requires_grad=False))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every ``LoraLinear`` in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def _require_lora(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no lorafast LoRA layers (call lorafast.apply_lora first)")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place; merged layers run the base matmul only."""
    for _, layer in _require_lora(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight in place."""
    for _, layer in _require_lora(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the original ``nn.Linear`` / ``Conv1D`` modules back; returns the plain model."""
    for name, layer in _require_lora(model):
        layer.merge(keep_residual=False)
        _set_submodule(model, name, layer.unload())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
