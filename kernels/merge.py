"""In-place LoRA merge ``W += sign · s · B A`` as one Triton kernel.

Each program owns a ``[BLOCK_N, BLOCK_K]`` tile of W: it accumulates ``B[rows] A[:, cols]`` in
fp32 (``input_precision="ieee"``: true fp32 products) over r in BLOCK_R chunks, adds it to the
tile widened to fp32 and rounds once to ``weight.dtype`` (the same result as
``lorafast.reference.merged_weight`` up to fp32 summation order). W may be any strided view
(e.g. the transpose of a transformers Conv1D weight); it is written through its strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    check_2d,
    check_float,
    check_same_device,
    interpreting,
    on_first_argument_device,
    padded_rank,
)


@triton.jit
def _lora_merge_kernel(
    w_ptr,
    a_ptr,
    b_ptr,  # W [N, K] (in place), A [r, K], B [N, r]
    N,
    K,
    R,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    coef,  # sign * s
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``W[rn, rk] = round(W[rn, rk] + coef · Σ_j B[rn, j] A[j, rk])``; grid (cdiv(N,BN), cdiv(K,BK))."""
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R_PAD, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        b = tl.load(
            b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0
        )
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + rk[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0
        )
        delta = tl.dot(b.to(tl.float32), a.to(tl.float32), delta, input_precision="ieee")
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
    tile_ok = n_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + coef * delta).to(w_ptr.dtype.element_ty), mask=tile_ok)


@on_first_argument_device
def lora_merge_(
    weight: torch.Tensor,  # [N, K], modified in place (any strides)
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    sign: float = 1.0,
) -> None:
    """In place ``W += sign · s · B A`` (merge with sign=+1, unmerge with sign=-1), accumulated
    in fp32 and rounded once to ``weight.dtype``."""
    check_2d("weight", weight)
    check_2d("lora_A", lora_A)
    check_2d("lora_B", lora_B)
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_float(name, t)
    N, K = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} must be [r, K] with K = {K} (weight is {tuple(weight.shape)})")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B {tuple(lora_B.shape)} must be [N, r] = [{N}, {r}] (lora_A is {tuple(lora_A.shape)})")
    if r < 1:
        raise ValueError("LoRA rank must be >= 1")
    check_same_device([("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)])
    if N * K == 0:
        return
    r_pad = padded_rank(r)
    block_r = min(r_pad, 32)
    bn, bk = (32, 32) if interpreting() else (64, 64)
    grid = (cdiv(N, bn), cdiv(K, bk))
    _lora_merge_kernel[grid](
        weight,
        lora_A,
        lora_B,  # [N, K], [r, K], [N, r]
        N,
        K,
        r,
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        float(sign) * float(scaling),
        R_PAD=r_pad,
        BLOCK_R=block_r,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
