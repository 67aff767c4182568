"""Shared pieces of the LoRA kernels: Triton helpers (program swizzle, dropout mask) and
launcher utilities (input validation, block-size helpers, interpreter detection).

Everything here must compile with triton 3.6 (the GPU machine) and run under triton 3.9's
interpreter (the CPU machines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

#: Largest LoRA rank the kernels accept (R_PAD <= 256 keeps the epilogue tiles in SMEM).
MAX_RANK = 256
#: The smallest dimension ``tl.dot`` accepts on the GPU: every dot operand dim is padded to it.
MIN_DOT = 16
#: Rows up to which ``lora_forward`` uses the single fused small-M (decode) kernel.
SMALL_M_MAX = 64
#: A pointer increment is ``BLOCK * stride`` in int32: tensors whose strides could overflow it
#: are made contiguous first (never happens for realistic LoRA shapes).
_MAX_BLOCK = 256

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """False when ``LORAFAST_AUTOTUNE=0``: every kernel uses its one default config."""
    return os.environ.get("LORAFAST_AUTOTUNE", "1").strip() != "0"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def padded_rank(r: int) -> int:
    """R_PAD: r rounded up to a power of two and to at least 16 (the GPU's smallest dot dim)."""
    return max(MIN_DOT, next_pow2(r))


def m_bucket(M: int) -> int:
    """Autotune key for M: power-of-two bucket, so varying sequence lengths do not re-tune."""
    return min(next_pow2(M), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use true fp32 products ("ieee") to match PyTorch's default fp32 matmul."""
    return "ieee" if dtype == torch.float32 else "tf32"


def stride_safe(t: torch.Tensor) -> torch.Tensor:
    """Return ``t``, or a contiguous copy if a ``BLOCK * stride`` increment could overflow int32."""
    if t.numel() > 0 and max(t.stride()) * _MAX_BLOCK >= 2**31:
        return t.contiguous()
    return t


# ----------------------------------------------------------------------------- validation


def check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2D, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(named: Sequence[tuple[str, torch.Tensor | None]]) -> torch.device:
    tensors = [(n, t) for n, t in named if t is not None]
    device = tensors[0][1].device
    for name, t in tensors[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {tensors[0][0]} is on {device}: all tensors must share a device"
            )
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "Triton kernels need CUDA tensors; got CPU tensors (set TRITON_INTERPRET=1 to run them "
            "through the Triton interpreter, or use lorafast.reference on CPU)"
        )
    return device


def check_scalars(scaling: float, dropout_p: float, seed: int) -> None:
    if not (float(scaling) == float(scaling)) or abs(float(scaling)) == float("inf"):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not (0 <= int(seed) < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")


# ----------------------------------------------------------------------------- triton helpers


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a 1D program id to (pid_m, pid_n) in GROUP_M-row super-blocks (L2 reuse, as in the
    Triton matmul tutorial)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def keep_mask(seed, offs_m, offs_k, K, p):
    """Dropout keep mask ``m`` for rows ``offs_m`` (int64) and columns ``offs_k`` of an [M, K] input.

    Element (row, col) keeps iff ``tl.rand(seed, row * K + col) >= p`` (Philox on the int64 element
    offset), so every kernel that regenerates it (F1, small-M forward, B2 backward, the mask
    kernel) draws bit-identical masks, whatever its tiling.
    """
    offs = offs_m[:, None].to(tl.int64) * K + offs_k[None, :].to(tl.int64)
    return tl.rand(seed, offs) >= p
