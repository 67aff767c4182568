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


def partial_gradient_run(frozen: str, backward_module, device: str = "cpu") -> dict:
    """One forward + backward of a dropout LoRA layer with ``frozen`` ("input": x needs no
    gradient; "adapter": A and B need none) next to the same run with every gradient, the
    mask seeded alike. Returns the flags the backward implementation (``backward_module``'s
    ``lora_backward``) was called with, both runs' gradients and the partial run's saved bytes."""
    from lorafast.benchmark import saved_activation_bytes

    torch.manual_seed(0)
    layer = lorafast.LoraLinear(torch.nn.Linear(24, 40), r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False)
    layer = layer.to(device).train()
    x = torch.randn(70, 24, device=device)
    grad_y = torch.randn(70, 40, device=device)

    def run(x_needs_grad: bool, adapter_needs_grad: bool):
        x_in = x.clone().requires_grad_(x_needs_grad)
        layer.lora_A.requires_grad_(adapter_needs_grad)
        layer.lora_B.requires_grad_(adapter_needs_grad)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the op's dropout seed
        layer(x_in).backward(grad_y)
        return x_in.grad, layer.lora_A.grad, layer.lora_B.grad

    full = run(True, True)
    flags = []
    implementation = backward_module.lora_backward

    def recording(*args, **kwargs):
        flags.append(args[9:11] if len(args) > 10 else (kwargs["needs_grad_x"], kwargs["needs_grad_lora"]))
        return implementation(*args, **kwargs)

    backward_module.lora_backward = recording
    try:
        partial = run(frozen != "input", frozen != "adapter")
        torch.manual_seed(7)
        saved = saved_activation_bytes(lambda: layer(x.clone().requires_grad_(frozen != "input")), layer.parameters())
    finally:
        backward_module.lora_backward = implementation
    return {"flags": flags, "full": full, "partial": partial, "saved": saved, "x_bytes": x.numel() * x.element_size()}
