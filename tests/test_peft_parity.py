"""lorafast against PEFT on real transformers models built offline: logits and every LoRA gradient.

The same A/B weights go into both. fp32 is compared directly with the tolerance table; fp16 and
bf16 use the three-way rule (lorafast's error against an fp64 run at most twice PEFT's).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import BERT_PROJECTIONS, LLAMA_PROJECTIONS, minilm, tiny_llama
from tolerances import assert_close, assert_no_less_accurate

import lorafast


def _peft_model(base: torch.nn.Module, targets: list[str]) -> peft.PeftModel:
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(base, config)


def _copy_peft_adapters_into(peft_model: peft.PeftModel, model: torch.nn.Module) -> None:
    """Give the lorafast model PEFT's A/B weights (module paths without PEFT's two prefixes)."""
    layers = dict(lorafast.lora_layers(model))
    assert len(layers) == sum(1 for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            with torch.no_grad():
                layers[name].lora_A.copy_(module.lora_A["default"].weight)
                layers[name].lora_B.copy_(module.lora_B["default"].weight)


def _lora_grads_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, parameter in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            key = name.replace("base_model.model.", "").replace(".default.weight", "")
            grads[key] = parameter.grad
    return grads


def _run(model: torch.nn.Module, inputs: dict, select_output) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    output = select_output(model(**inputs))
    output.float().square().mean().backward()
    return output, _lora_grads_by_name(model)


def _pair(build, targets, dtype):
    """(lorafast model, PEFT model) with the same base and the same LoRA weights, in ``dtype``."""
    peft_model = _peft_model(build(dtype), targets)
    model = lorafast.apply_lora(build(dtype), lorafast.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    _copy_peft_adapters_into(peft_model, model)
    return model, peft_model


def _logits(output):
    return output.logits


CASES = {
    "llama": (tiny_llama, LLAMA_PROJECTIONS, _logits, lambda: dict(input_ids=torch.randint(0, 128, (2, 11)))),
    "minilm": (
        lambda dtype: minilm(dtype),
        BERT_PROJECTIONS,
        lambda out: torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()]),
        lambda: dict(input_ids=torch.randint(0, 30522, (2, 9)), attention_mask=torch.ones(2, 9, dtype=torch.long)),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_fp32_logits_and_lora_grads_match_peft(case):
    build, targets, select_output, make_inputs = CASES[case]
    torch.manual_seed(0)
    inputs = make_inputs()
    model, peft_model = _pair(lambda dtype: build(dtype=dtype), targets, torch.float32)
    output, grads = _run(model, inputs, select_output)
    peft_output, peft_grads = _run(peft_model, inputs, select_output)
    assert_close(output, peft_output, torch.float32)
    assert grads.keys() == peft_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads[name], peft_grads[name], torch.float32, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_half_precision_no_less_accurate_than_peft(case, dtype):
    build, targets, select_output, make_inputs = CASES[case]
    torch.manual_seed(0)
    inputs = make_inputs()
    model, peft_model = _pair(lambda d: build(dtype=d), targets, dtype)
    exact_model, _ = _pair(lambda d: build(dtype=d), targets, torch.float64)
    with torch.no_grad():  # the fp64 run gets the same LoRA weights as the half-precision pair
        for (_, layer), (_, exact_layer) in zip(lorafast.lora_layers(model), lorafast.lora_layers(exact_model), strict=True):
            exact_layer.lora_A.copy_(layer.lora_A)
            exact_layer.lora_B.copy_(layer.lora_B)
    output, grads = _run(model, inputs, select_output)
    peft_output, peft_grads = _run(peft_model, inputs, select_output)
    exact_output, exact_grads = _run(exact_model, inputs, select_output)
    assert output.dtype == dtype
    assert_no_less_accurate(output, peft_output, exact_output, dtype, msg="output")
    for name in grads:
        assert_no_less_accurate(grads[name], peft_grads[name], exact_grads[name], dtype, msg=name)


def test_autocast_matches_peft():
    """fp32 weights under bf16 autocast: lorafast runs the frozen product in bf16, like autocast's linear."""
    torch.manual_seed(0)
    inputs = dict(input_ids=torch.randint(0, 128, (2, 11)))
    model, peft_model = _pair(lambda dtype: tiny_llama(dtype=dtype), LLAMA_PROJECTIONS, torch.float32)
    exact_model = copy.deepcopy(model).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, grads = _run(model, inputs, _logits)
        peft_output, peft_grads = _run(peft_model, inputs, _logits)
    exact_output, exact_grads = _run(exact_model, inputs, _logits)
    assert_no_less_accurate(output, peft_output, exact_output, torch.bfloat16, msg="logits")
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert_no_less_accurate(grads[name], peft_grads[name], exact_grads[name], torch.bfloat16, msg=name)
