"""LoraConfig: PEFT's fields and meanings, and a ValueError naming the field for each invalid value."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import lorafast


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(r=0), "r"),
        (dict(r=-4), "r"),
        (dict(r=2.5), "r"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(bias="some"), "bias"),
        (dict(init_lora_weights="orthogonal-ish"), "init_lora_weights"),
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(target_modules="q_proj("), "target_modules"),
        (dict(target_modules=[3]), "target_modules"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        lorafast.LoraConfig(**{"target_modules": ["q"], **kwargs})


def test_scaling_plain_rslora_and_patterns():
    config = lorafast.LoraConfig(r=16, lora_alpha=32, rank_pattern={r"layers\.1\..*q_proj": 4}, alpha_pattern={"v_proj": 8})
    assert config.scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert config.rank_and_alpha("model.layers.1.self_attn.q_proj") == (4, 32)
    assert config.rank_and_alpha("model.layers.1.self_attn.v_proj") == (16, 8)
    assert lorafast.LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling("x") == 32 / math.sqrt(16)


def test_peft_config_is_accepted():
    source = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="lora_only",
                             use_rslora=True, rank_pattern={"v_proj": 2})
    config = lorafast.LoraConfig.from_any(source)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias, config.use_rslora) == (4, 12, 0.05, "lora_only", True)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"] and config.rank_pattern == {"v_proj": 2}


def test_module_classes_serialise_by_name():
    assert lorafast.LoraConfig(target_modules=[torch.nn.Linear]).to_dict()["target_modules"] == ["Linear"]


@pytest.mark.parametrize(
    "option", [dict(layers_to_transform=[0]), dict(use_dora=True), dict(lora_bias=True)], ids=lambda o: next(iter(o))
)
def test_a_peft_option_lorafast_does_not_implement_is_refused(option):
    """PEFT options that change what the adapter computes are an error naming the option, from a
    peft.LoraConfig or a dict alike (apply_lora used to drop them: layers_to_transform=[0]
    adapted every layer), as they are in an adapter's config."""
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}=.* is a PEFT option lorafast does not implement"):
        lorafast.apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(target_modules=["0"], **option))
    with pytest.raises(ValueError, match=rf"{name}=.* is a PEFT option lorafast does not implement"):
        lorafast.LoraConfig.from_any({"r": 4, "target_modules": ["0"], **option})
