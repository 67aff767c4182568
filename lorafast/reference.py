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
    the forward's mask instead of storing it. Each element is one uniform 32-bit lane of a
    64-bit draw, kept iff the lane (as int32) is at least ``-2^31 + round(p·2^32)``: p is exact
    to 2^-32, and it costs half the generator calls of ``torch.rand(shape) >= p`` (measured
    on the CPU: about 2x faster at 512x1024, which is what regenerating in backward pays).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    numel = shape[0] * shape[1]
    draws = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device)
    draws.random_(-(2**63), 2**63 - 1, generator=generator)
    lanes = draws.view(torch.int32)[:numel].view(shape)
    return lanes >= -(2**31) + round(dropout_p * 2**32)


def _masked_input(x: torch.Tensor, keep_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``m ⊙ x`` in ``dtype`` (one pass; the 1/(1-p) factor is folded into the [M, r] side)."""
    x = x.to(dtype)
    return x if keep_mask is None else torch.where(keep_mask, x, 0.0)


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
    """Return ``(y [M, N] in x.dtype, u [M, r] in lora_A.dtype)``.

    ``u = s/(1-p) · (m ⊙ x) Aᵀ``; ``y = (x Wᵀ + bias)`` in x's dtype, then ``+ u Bᵀ`` accumulated
    in the wider of x's and the LoRA dtype (in place, by ``addmm_``) and rounded once to x's
    dtype: with fp32 LoRA weights and 16-bit x the LoRA term is added in fp32 (as PEFT), and
    LoRA weights narrower than x (bf16 LoRA on an fp32 model) never round the frozen product.
    """
    u = (_masked_input(x, keep_mask, lora_A.dtype) @ lora_A.t()).mul_(scaling / (1.0 - dropout_p))
    wide = torch.promote_types(x.dtype, u.dtype)
    y = torch.nn.functional.linear(x, weight, bias).to(wide).addmm_(u.to(wide), lora_B.t().to(wide))
    return y.to(x.dtype), u


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
    needs_grad_x: bool = True,
    needs_grad_lora: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(dX [M, K] in x.dtype, dA [r, K] in lora_A.dtype, dB [N, r] in lora_B.dtype)``,
    None for what is not needed (``needs_grad_x``: dX; ``needs_grad_lora``: dA and dB).

    With ``du' = du/(1-p)``: ``dA = du'ᵀ (m ⊙ x)`` and ``dX = dY W + m ⊙ (du' A)``, summed in the
    wider of x's and the LoRA dtype (the frozen product accumulated into the LoRA term in place
    when x has the LoRA dtype).
    """
    lora_dtype = lora_A.dtype
    grad_y_lora = grad_y.to(lora_dtype)
    grad_u = (grad_y_lora @ lora_B.to(lora_dtype)).mul_(scaling / (1.0 - dropout_p))  # du' [M, r]
    grad_A = grad_B = grad_x = None
    if needs_grad_lora:
        grad_B = (grad_y_lora.t() @ u.to(lora_dtype)).to(lora_B.dtype)
        grad_A = grad_u.t() @ _masked_input(x, keep_mask, lora_dtype)
    if needs_grad_x:
        grad_x = grad_u @ lora_A
        if keep_mask is not None:
            grad_x = torch.where(keep_mask, grad_x, 0.0)
        if x.dtype == lora_dtype:
            grad_x.addmm_(grad_y, weight)
        else:
            wide = torch.promote_types(x.dtype, lora_dtype)
            grad_x = (grad_y @ weight).to(wide).add_(grad_x.to(wide))
        grad_x = grad_x.to(x.dtype)
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
    """``W + s·B A`` accumulated in fp32 (fp64 for an fp64 weight) and rounded once to
    ``weight.dtype`` ([N, K])."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    delta = scaling * (lora_B.to(wide) @ lora_A.to(wide))
    return (weight.to(wide) + delta).to(weight.dtype)
