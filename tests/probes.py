"""Probe that reads what a LoRA layer actually did: the dropout masks its forward and backward applied."""

from __future__ import annotations

import torch
from tolerances import assert_close

import lorafast


def mask_revealing_layer(features: int, dropout_p: float) -> lorafast.LoraLinear:
    """W = 0, A = B = I, s = 1: the output is x̂ = m ⊙ x/(1-p) and dX is m ⊙ dY/(1-p)."""
    layer = lorafast.LoraLinear(
        torch.nn.Linear(features, features, bias=False), r=features, lora_alpha=features, lora_dropout=dropout_p
    )
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.copy_(torch.eye(features))
        layer.lora_B.copy_(torch.eye(features))
    return layer.train()


def observed_dropout_masks(M: int, K: int, dropout_p: float, device: str = "cpu"):
    """The keep masks the forward and the backward actually applied, read off the outputs."""
    layer = mask_revealing_layer(K, dropout_p).to(device)
    x = torch.ones(M, K, device=device, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    forward_mask, backward_mask = y.detach() != 0, x.grad != 0
    assert_close(y.detach()[forward_mask], torch.full_like(y.detach()[forward_mask], 1 / (1 - dropout_p)))
    return forward_mask, backward_mask
