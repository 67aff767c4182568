"""The one per-dtype tolerance table every numeric test uses.

The rule (flash-attention's): an implementation's error against an fp64 reference may be at
most about twice what plain PyTorch at the same precision gets, plus a small atol. The values
below were set from that rule on the shapes the tests use (K up to a few hundred): fp16 keeps
10 mantissa bits (ulp 2^-10 ≈ 1e-3 near 1), bf16 keeps 7 (ulp 2^-7 ≈ 8e-3 near 1).
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: ``actual.dtype``).

    Both sides are compared in fp64 so a reference computed at higher precision can be used.
    """
    tolerance = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.detach().to(torch.float64), expected.detach().to(torch.float64), **tolerance, msg=msg or None
    )


def assert_no_less_accurate(
    actual: torch.Tensor, baseline: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, msg: str = ""
) -> None:
    """Three-way check: ``|actual - exact| <= 2·|baseline - exact| + atol[dtype]`` (max over elements).

    ``exact`` is the same computation at fp64; ``baseline`` is plain PyTorch/PEFT at ``dtype``.
    """
    exact = exact.detach().to(torch.float64)
    error = (actual.detach().to(torch.float64) - exact).abs().max().item()
    baseline_error = (baseline.detach().to(torch.float64) - exact).abs().max().item()
    bound = 2 * baseline_error + TOLERANCES[dtype]["atol"]
    assert error <= bound, f"{msg} error {error:.3g} > 2 x baseline error {baseline_error:.3g} + atol"
