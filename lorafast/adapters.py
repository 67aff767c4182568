"""Adapter files in PEFT's format: ``save_adapter`` / ``load_adapter``.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields, ``peft_type: "LORA"``) and
``adapter_model.safetensors`` whose keys are PEFT's::

    base_model.model.<module path>.lora_A.weight        [r, in]
    base_model.model.<module path>.lora_B.weight        [out, r]
    base_model.model.<module path>.base_layer.bias      bias="all"/"lora_only": a LoRA layer's bias
    base_model.model.<module path>.bias                 bias="all": every other bias
    base_model.model.<module path>.<parameter>          each module in modules_to_save

so ``peft.PeftModel.from_pretrained(base, directory)`` loads what lorafast saves and lorafast
loads what PEFT saves. Unlike PEFT, loading checks every key and shape both ways and refuses an
adapter it cannot reproduce exactly, naming the key or field; saving is atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from lorafast.config import LoraConfig
from lorafast.inject import _set_submodule, apply_lora, lora_layers, modules_to_save_named

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors
PEFT_PREFIX = "base_model.model."

def save_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> Path:
    """Write the model's adapter to ``adapter_dir`` in PEFT's format; returns the directory.

    Atomic: both files are written into a fresh directory beside ``adapter_dir`` and moved in
    only once complete, so an interrupted save leaves the previous adapter as it was. Other
    files in ``adapter_dir`` (a README, a tokenizer) are kept.
    """
    config = _config_dict(model)
    tensors = {PEFT_PREFIX + key: value.detach().to("cpu").clone() for key, value in adapter_tensors(model).items()}
    with atomic_directory(adapter_dir, replace_whole=False) as staging:
        safetensors.torch.save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(adapter_dir)


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, lora_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a LoRA adapter written by PEFT or by lorafast into ``model`` (in place) and return it.

    A plain model is first adapted with ``apply_lora`` and the stored config (LoRA parameters in
    ``lora_dtype``); a model that already has lorafast layers must have the same ranks and alphas.
    Every key and shape is checked before anything is copied: a missing or extra tensor, a shape
    mismatch, a config without ``r``/``lora_alpha``, another ``peft_type``, an unsupported PEFT
    option or an unreadable file raises ``ValueError`` (``FileNotFoundError`` for a missing file),
    and a model that was plain is left plain.
    """
    directory = Path(adapter_dir)
    config = read_adapter_config(directory)
    stored = read_adapter_tensors(directory)
    if any(True for _ in lora_layers(model)):
        _check_existing_layers(model, config, directory)
        _copy_checked(stored, adapter_tensors(model), directory)
        return model
    trainable_before = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        apply_lora(model, _without_absent_modules_to_save(config, model), lora_dtype=lora_dtype)
    except ValueError as error:
        raise ValueError(f"adapter {directory} does not fit this model: {error}") from None
    try:
        _copy_checked(stored, adapter_tensors(model), directory)
    except ValueError:
        _remove_lora(model, trainable_before)
        raise
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapter tensors (the live parameters) under PEFT's keys, without the ``base_model.model.`` prefix."""
    config = _lora_config_of(model)
    layers = dict(lora_layers(model))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{name}.lora_B.weight"] = layer.lora_B
    if config.bias != "none":
        for name, bias in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            if leaf != "bias":
                continue
            if module_name in layers:
                tensors[f"{module_name}.base_layer.bias"] = bias
            elif config.bias == "all":
                tensors[name] = bias
    for wanted in config.modules_to_save or []:
        for module_name, module in modules_to_save_named(model, wanted):
            tensors.update({f"{module_name}.{key}": value for key, value in module.state_dict(keep_vars=True).items()})
    return tensors


def _without_absent_modules_to_save(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """Drop modules_to_save names the model lacks, as PEFT does (its SEQ_CLS default is ["classifier", "score"]).

    Safe: a stored tensor for a dropped name would still fail the key check as an extra key.
    """
    if not config.modules_to_save:
        return config
    present = [name for name in config.modules_to_save if modules_to_save_named(model, name)]
    return dataclasses.replace(config, modules_to_save=present or None)


def read_adapter_config(directory: Path) -> LoraConfig:
    """The ``LoraConfig`` stored in ``directory/adapter_config.json``, refusing what lorafast cannot reproduce."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {directory}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: peft_type is {raw.get('peft_type')!r}; lorafast loads LoRA adapters (peft_type 'LORA')"
        )
    for required in ("r", "lora_alpha"):
        if required not in raw:
            raise ValueError(f"{path}: the field {required!r} is missing")
    try:
        return LoraConfig.from_any(raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def read_task_type(directory: str | os.PathLike) -> str | None:
    """The ``task_type`` of the adapter in ``directory`` (PEFT's field: "SEQ_CLS", "CAUSAL_LM", ...; None if unset)."""
    read_adapter_config(Path(directory))  # the checks, with their errors
    return json.loads((Path(directory) / CONFIG_NAME).read_text()).get("task_type")


def read_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The stored tensors under normalised keys (see ``_normalise_key``), on the CPU."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        path = Path(directory) / LEGACY_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in adapter directory {directory}")
    try:
        if path.name == WEIGHTS_NAME:
            raw = safetensors.torch.load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors / pickle raise their own types for truncated or corrupt files
        raise ValueError(f"cannot read adapter weights {path} (truncated or corrupt?): {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"adapter weights {path} hold a {type(raw).__name__}, not a dict of tensors")
    return _normalised(raw, path)


def _normalise_key(key: str) -> str | None:
    """PEFT's key variants → the names ``adapter_tensors`` uses; None for keys to ignore.

    Strips ``base_model.model.``; ``lora_A.default.weight`` (some PEFT versions) → ``lora_A.weight``;
    ``<m>.modules_to_save[.default].<p>`` → ``<m>.<p>``; ``<m>.original_module.<p>`` (the frozen
    original that PEFT's bias="all" also writes) is ignored.
    """
    key = key.removeprefix(PEFT_PREFIX)
    if ".original_module." in key:
        return None
    key = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)
    return re.sub(r"\.modules_to_save(\.default)?\.", ".", key)


def _normalised(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = _normalise_key(key)
        if name is None:
            continue
        if name in tensors and not torch.equal(tensors[name], value):
            raise ValueError(f"{path}: {key!r} and another key both give {name!r}, with different values")
        tensors[name] = value
    return tensors


def _copy_checked(stored: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``stored`` into ``targets`` after checking that both have the same keys and shapes."""
    missing = sorted(targets.keys() - stored.keys())
    if missing:
        raise ValueError(
            f"adapter {path} lacks {len(missing)} tensor(s) its config implies for this model: {missing[:5]}"
        )
    extra = sorted(stored.keys() - targets.keys())
    if extra:
        raise ValueError(f"adapter {path} has {len(extra)} tensor(s) this model has no place for: {extra[:5]}")
    for key, target in targets.items():
        if stored[key].shape != target.shape:
            raise ValueError(
                f"adapter {path}: {key!r} has shape {tuple(stored[key].shape)}, the model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(stored[key])


def _check_existing_layers(model: nn.Module, config: LoraConfig, path: Path) -> None:
    """An already adapted model must compute with the adapter's own ranks, alphas and rsLoRA setting."""
    for name, layer in lora_layers(model):
        rank, alpha = config.rank_and_alpha(name)
        if (layer.r, layer.lora_alpha, layer.use_rslora) != (rank, alpha, config.use_rslora):
            raise ValueError(
                f"adapter {path} gives {name} r={rank}, lora_alpha={alpha}, use_rslora={config.use_rslora}; "
                f"the model's layer has r={layer.r}, lora_alpha={layer.lora_alpha}, use_rslora={layer.use_rslora}"
            )


def _remove_lora(model: nn.Module, trainable_before: dict[nn.Parameter, bool]) -> None:
    """Undo ``apply_lora`` after a failed load: the original modules and ``requires_grad`` flags return."""
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, layer.unload())
    for parameter, requires_grad in trainable_before.items():
        parameter.requires_grad_(requires_grad)
    del model.lora_config


def _lora_config_of(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig) or not any(True for _ in lora_layers(model)):
        raise ValueError("the model has no lorafast adapter (adapt it with lorafast.apply_lora or load_adapter first)")
    return config


#: PEFT's task_type for the transformers head classes it names (what ``lorafast merge`` builds).
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM"}


def _task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for the model's class: "SEQ_CLS" for ``*ForSequenceClassification``,
    "CAUSAL_LM" for ``*ForCausalLM``, else None (a bare model or another head)."""
    return next((task for suffix, task in TASK_TYPES.items() if type(model).__name__.endswith(suffix)), None)


def _config_dict(model: nn.Module) -> dict:
    """PEFT's ``adapter_config.json`` for the model's adapter, checked against its layers."""
    config = _lora_config_of(model)
    layers = dict(lora_layers(model))
    for name, layer in layers.items():
        if (layer.r, layer.lora_alpha) != config.rank_and_alpha(name):
            raise ValueError(
                f"{name} has r={layer.r}, lora_alpha={layer.lora_alpha}, but model.lora_config gives "
                f"{config.rank_and_alpha(name)}: the saved config would not rebuild this adapter"
            )
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": name_or_path or None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _target_module_names(model, list(layers)),
        "exclude_modules": None,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "init_lora_weights": config.init_lora_weights,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _target_module_names(model: nn.Module, layer_names: list[str]) -> list[str]:
    """PEFT-style leaf names (``["q_proj", "v_proj"]``) when they select exactly the adapted layers, else full paths."""
    leaves = sorted({name.rpartition(".")[2] for name in layer_names})
    selected = {name for name, _ in model.named_modules() if name and name.rpartition(".")[2] in leaves}
    return leaves if selected == set(layer_names) else sorted(layer_names)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace_whole: bool) -> Iterator[Path]:
    """Yield an empty staging directory; once the block succeeds, move its contents into ``target``.

    ``replace_whole=False``: each staged file replaces its namesake in ``target`` (``os.replace``),
    other files stay. ``replace_whole=True``: the staging directory becomes ``target`` and the old
    directory is deleted afterwards. A new ``target`` is a single rename either way. If the block
    raises (or is interrupted), the staging directory is removed and ``target`` is untouched.

    The staging directory is made where its moves stay on ``target``'s filesystem (a rename
    across filesystems fails): beside a new ``target`` or one it replaces whole, inside an
    existing ``target`` whose files it replaces one by one, or whose whole contents it replaces
    when ``target`` is a mount point (a Docker volume: a mount point cannot be renamed, so there
    the old entries are deleted and the new ones moved in, the one case that is not atomic).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    in_place = target.is_dir() and (not replace_whole or os.path.ismount(target))
    if in_place:
        staging = target / f".lorafast-staging-{uuid.uuid4().hex[:12]}"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if in_place:
            _publish_in_place(staging, target, replace_whole)
        else:
            _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` (beside ``target``) to ``target``, retiring an old ``target`` first."""
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired)


def _publish_in_place(staging: Path, target: Path, replace_whole: bool) -> None:
    """Move the entries of ``staging`` (inside ``target``) into ``target``; with ``replace_whole``
    delete ``target``'s other entries first."""
    if replace_whole:
        for old in target.iterdir():
            if old == staging:
                continue
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
    for staged in staging.iterdir():
        os.replace(staged, target / staged.name)
    staging.rmdir()
