"""Pure-PyTorch LoRA linear: the CPU path, the test oracle and the naive baseline.

Shapes (DESIGN.md §1): x ``[M, K]``, frozen W ``[N, K]``, optional frozen bias ``[N]``,
A ``[r, K]``, B ``[N, r]``, scaling ``s``, dropout probability ``p`` with keep mask
``m ~ Bernoulli(1 - p)`` of shape ``[M, K]``::

    x̂  = m ⊙ x / (1 - p)
    u  = s · x̂ Aᵀ                   [M, r]   (kept in fp32 / the LoRA dtype)
    y  = x Wᵀ + bias + u Bᵀ          [M, N]

    du = s · dY B                    [M, r]
    dB = dYᵀ u                       [N, r]
    dA = duᵀ x̂                      [r, K]
    dX = dY W + m ⊙ (du A) / (1 - p) [M, K]

The LoRA branch runs in the dtype of the LoRA parameters (fp32 by default, as PEFT does);
the frozen product runs in the dtype of x. Every function here takes 2D tensors; the op
layer flattens leading dims. Nothing here allocates more than the math needs, but nothing
here is fused either: that is the Triton backend's job.
"""

from __future__ import annotations

import torch


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask ``m`` ``[M, K]`` drawn from a generator seeded with ``seed``.

    The same (seed, shape, p, device) always gives the same mask, so backward regenerates
    the forward's mask instead of storing it.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _dropped_input(x: torch.Tensor, keep_mask: torch.Tensor | None, dropout_p: float, dtype: torch.dtype) -> torch.Tensor:
    """x̂ = m ⊙ x / (1 - p) in ``dtype`` (a temporary, never saved)."""
    x_hat = x.to(dtype)
    if dropout_p > 0.0:
        x_hat = x_hat * keep_mask / (1.0 - dropout_p)
    return x_hat


def lora_forward(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    keep_mask: torch.Tensor | None,  # [M, K] bool, required when dropout_p > 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y [M, N] in x.dtype, u [M, r] in lora_A.dtype)``."""
    u = scaling * (_dropped_input(x, keep_mask, dropout_p, lora_A.dtype) @ lora_A.t())
    y = torch.nn.functional.linear(x, weight, bias)
    y = (y.to(u.dtype) + u @ lora_B.t().to(u.dtype)).to(x.dtype)
    return y, u


def lora_backward(
    grad_y: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    u: torch.Tensor,  # [M, r]
    scaling: float,
    dropout_p: float,
    keep_mask: torch.Tensor | None,  # [M, K] bool, required when dropout_p > 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dX [M, K] in x.dtype, dA [r, K] in lora_A.dtype, dB [N, r] in lora_B.dtype)``."""
    lora_dtype = lora_A.dtype
    grad_y_lora = grad_y.to(lora_dtype)
    grad_u = scaling * (grad_y_lora @ lora_B.to(lora_dtype))
    grad_B = (grad_y_lora.t() @ u.to(lora_dtype)).to(lora_B.dtype)
    grad_A = grad_u.t() @ _dropped_input(x, keep_mask, dropout_p, lora_dtype)
    grad_x_lora = grad_u @ lora_A
    if dropout_p > 0.0:
        grad_x_lora = grad_x_lora * keep_mask / (1.0 - dropout_p)
    grad_x = ((grad_y @ weight).to(lora_dtype) + grad_x_lora).to(x.dtype)
    return grad_x, grad_A, grad_B


def naive_lora_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    training: bool = True,
) -> torch.Tensor:
    """The plain autograd layer ``x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``: the naive baseline.

    It stores what autograd stores (the dropped input, the mask, the fp32 copy of x), which
    is exactly what the fused op avoids.
    """
    lora_input = torch.nn.functional.dropout(x.to(lora_A.dtype), dropout_p, training)
    lora_out = (lora_input @ lora_A.t()) @ lora_B.t()
    return (torch.nn.functional.linear(x, weight, bias) + scaling * lora_out).to(x.dtype)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s·B A`` accumulated in fp32 and rounded once to ``weight.dtype`` ([N, K])."""
    delta = scaling * (lora_B.to(torch.float32) @ lora_A.to(torch.float32))
    return (weight.to(torch.float32) + delta).to(weight.dtype)
