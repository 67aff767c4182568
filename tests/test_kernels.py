"""Numerics of the Triton LoRA kernels (lorafast.kernels) against lorafast.reference.

On CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set below before
anything imports triton; tests/conftest.py sets it too for whole-suite runs) on small odd
shapes; on a CUDA machine the same cases run on the GPU (``-m gpu``) plus real-size checks.

Accuracy rule (DESIGN.md §5, flash-attention's): against an fp64 reference, the kernel's max
error may be at most twice the max error of the reference at the tensors' own dtypes (the
"torch" backend, PEFT's math: x Wᵀ in x's dtype, the LoRA branch in the LoRA params' dtype)
plus the table's atol (tests/tolerances.py). y and dX use x's row of the table; u, dA and dB
use the row of the LoRA branch (:func:`lora_branch_row`): with fp32 LoRA params and 16-bit
inputs that is a tighter row than x's, which only the kernels' split dots meet. fp32 outputs
are also checked elementwise against the fp32 reference with the table's atol/rtol.
(Elementwise rtol against fp64 does not suit fp16/bf16: a small y element inherits the
rounding error of the larger u and x Wᵀ terms it is summed from, in the kernel and in PyTorch
alike.)
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import weakref  # noqa: E402

import pytest  # noqa: E402
from kernel_harness import forced_config, interpreter_bf16_fixes, interpreting  # noqa: E402
from tolerances import TOLERANCES, assert_close  # noqa: E402

from lorafast import reference as ref  # noqa: E402

if not torch.cuda.is_available() and not interpreting():  # pragma: no cover
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)
if "lorafast.kernels" in sys.modules and not torch.cuda.is_available():
    # kernels decorated before TRITON_INTERPRET was set would try to compile for a GPU
    import triton.runtime.interpreter as _interp

    if not isinstance(sys.modules["lorafast.kernels.lora_linear"]._lora_down_kernel.fn, _interp.InterpretedFunction):
        pytest.skip("lorafast.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from lorafast.kernels import (  # noqa: E402
    choose_main_gemm,
    dropout_keep_mask,
    lora_backward,
    lora_forward,
    lora_merge_,
    resolved_dropout_p,
)

from lorafast import kernels as K  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _bf16_fixes():
    with interpreter_bf16_fixes():
        yield


# ----------------------------------------------------------------------------- helpers


def make_inputs(M, K_, N, r, dtype, bias, lora_dtype=F32, device=DEVICE, seed=0, noncontig=False, b_scale=1.0):
    """Random x [M,K], W [N,K], bias [N], A [r,K], B [N,r], dY [M,N] with O(1) outputs
    (B times ``b_scale``: LoRA B starts at 0, so real B and du are small early in training)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K_, generator=g)
    w = torch.randn(N, K_, generator=g) / math.sqrt(K_)
    b = torch.randn(N, generator=g) * 0.5 if bias else None
    a = torch.randn(r, K_, generator=g) / math.sqrt(K_)
    bb = torch.randn(N, r, generator=g) * (b_scale / math.sqrt(r))
    dy = torch.randn(M, N, generator=g) / math.sqrt(N)
    x, w, dy = (t.to(device=device, dtype=dtype) for t in (x, w, dy))
    b = b.to(device=device, dtype=dtype) if b is not None else None
    if noncontig:  # x and W as transposed views (Conv1D-style weight), bias a stride-2 view
        x = x.t().contiguous().t()
        w = w.t().contiguous().t()
        b = torch.stack([b, torch.full_like(b, 1e3)], dim=1)[:, 0] if b is not None else None
    a, bb = a.to(device=device, dtype=lora_dtype), bb.to(device=device, dtype=lora_dtype)
    return x, w, b, a, bb, dy


def _d(t, dtype):
    return None if t is None else t.to(dtype)


def check_rule(name, actual, truth, baseline, dtype):
    """max|actual - truth| <= 2 max|baseline - truth| + atol[dtype] (flash-attention's rule)."""
    err = (actual.double() - truth.double()).abs().max().item()
    base = (baseline.double() - truth.double()).abs().max().item()
    bound = 2 * base + TOLERANCES[dtype]["atol"]
    assert err <= bound, f"{name}: kernel error {err:.3g} > 2 x torch error {base:.3g} + atol"


def lora_branch_row(dtype, lora_dtype):
    """The table row u, dA and dB must meet. With fp32 LoRA params and 16-bit x the kernels
    split each fp32 dot operand into hi + lo, which carry 22 (fp16) or 16 (bf16) significant
    bits: fp32's row for fp16 inputs, fp16's row (11 bits) for bf16. Otherwise x's row."""
    if lora_dtype != F32 or dtype == F32:
        return dtype
    return {F16: F32, BF16: F16}[dtype]


def run_case(
    M, K_, N, r, dtype, bias, p, lora_dtype, path=None, main_gemm=None, noncontig=False, device=DEVICE, reduction=None
):
    x, w, b, a, bb, dy = make_inputs(M, K_, N, r, dtype, bias, lora_dtype, device=device, noncontig=noncontig)
    s, seed = 2.0, 1234
    y, u = lora_forward(x, w, b, a, bb, s, p, seed, path=path)
    dx, da, db = lora_backward(dy, x, w, a, bb, u, s, p, seed, main_gemm=main_gemm, reduction=reduction)
    assert y.dtype == dtype and u.dtype == F32 and dx.dtype == dtype
    assert da.dtype == lora_dtype and db.dtype == lora_dtype
    assert (
        y.shape == (M, N) and u.shape == (M, r) and dx.shape == (M, K_) and da.shape == (r, K_) and db.shape == (N, r)
    )
    mask = dropout_keep_mask(seed, M, K_, p, device) if p > 0 else None
    p = resolved_dropout_p(p)  # the reference on the kernels' mask: their p, resolved to 2**-16
    f64 = torch.float64
    # fp64 truth and the reference at the tensors' own dtypes (the torch backend, PEFT's math)
    y64, u64 = ref.lora_forward(*(_d(t, f64) for t in (x, w, b, a, bb)), s, p, mask)
    dx64, da64, db64 = ref.lora_backward(*(_d(t, f64) for t in (dy, x, w, a, bb, u64)), s, p, mask)
    yr, ur = ref.lora_forward(x, w, b, a, bb, s, p, mask)
    dxr, dar, dbr = ref.lora_backward(dy, x, w, a, bb, ur, s, p, mask)
    branch = lora_branch_row(dtype, lora_dtype)
    for name, act, truth, baseline, row in [
        ("y", y, y64, yr, dtype),
        ("u", u, u64, ur, branch),
        ("dx", dx, dx64, dxr, dtype),
        ("dA", da, da64, dar, branch),
        ("dB", db, db64, dbr, branch),
    ]:
        check_rule(name, act, truth, baseline, row)
    if dtype == F32:  # fp32: every output elementwise against the fp32 reference too
        for act, exp in [(y, yr), (u, ur), (dx, dxr), (da, dar), (db, dbr)]:
            assert_close(act, exp, F32)


# (M, K, N, r, dtype, bias, dropout_p, lora dtype): odd sizes off the 32-block grid, every
# rank class (r < 16 padded, r = 16, r = 64 multi-chunk epilogue, r = 130 -> R_PAD 256)
CASES = [
    (1, 24, 40, 1, F32, True, 0.0, F32),
    (7, 72, 40, 4, F16, False, 0.1, F32),
    (33, 40, 72, 8, BF16, True, 0.1, F32),
    (33, 72, 24, 16, F32, False, 0.1, F32),
    (7, 40, 24, 64, BF16, False, 0.0, BF16),
    (70, 24, 40, 16, F16, True, 0.0, F16),
    (70, 72, 40, 4, BF16, True, 0.1, F32),
    (65, 40, 72, 64, F32, True, 0.1, F32),
    (100, 24, 24, 1, F16, False, 0.1, F32),
    (70, 40, 24, 130, F32, False, 0.1, F32),
]


def _case_id(c):
    M, K_, N, r, dt, bias, p, ld = c
    return f"M{M}-K{K_}-N{N}-r{r}-{str(dt)[6:]}-{'bias' if bias else 'nobias'}-p{p}-lora_{str(ld)[6:]}"


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize(
    "paths",
    [(None, None), ("triton", "cublas"), ("cublas", "triton")],
    ids=["default", "fwd_triton-bwd_cublas", "fwd_cublas-bwd_triton"],
)
def test_forward_backward_match_reference(case, paths):
    run_case(*case, path=paths[0], main_gemm=paths[1])


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ordered_reduction_matches_reference(case):
    """dA and dB by the ordered kernel (no atomics), both main-GEMM paths of dX."""
    run_case(*case, main_gemm="triton" if case[0] % 2 else "cublas", reduction="ordered")


@pytest.mark.interpreter
def test_deterministic_algorithms_choose_the_ordered_reduction(monkeypatch):
    x, w, b, a, bb, dy = make_inputs(70, 40, 24, 8, F32, True)
    _, u = lora_forward(x, w, b, a, bb, 2.0, 0.1, 3)
    grids = []
    ordered_kernel = K.lora_linear._lora_ordered_grads.autotuner.fn  # every launch ends in its run
    run = ordered_kernel.run
    monkeypatch.setattr(ordered_kernel, "run", lambda *args, grid, **kw: grids.append(grid) or run(*args, grid=grid, **kw))
    assert K.choose_reduction() == "atomic"
    atomic = lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 3)
    assert grids == []
    torch.use_deterministic_algorithms(True)
    try:
        assert K.choose_reduction() == "ordered"
        runs = [lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 3) for _ in range(2)]
        with pytest.raises(RuntimeError, match="not deterministic"):
            lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 3, reduction="atomic")
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(grids) == 2
    for first, second, other in zip(*runs, atomic, strict=True):
        assert torch.equal(first, second)
        assert_close(first, other, F32)
    monkeypatch.setenv("LORAFAST_REDUCTION", "ordered")
    assert K.choose_reduction() == "ordered"
    with pytest.raises(ValueError, match="reduction must be one of"):
        K.choose_reduction("sorted")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_non_contiguous_x_weight_and_bias(dtype):
    run_case(33, 40, 24, 8, dtype, True, 0.1, F32, noncontig=True)
    run_case(70, 40, 24, 8, dtype, True, 0.1, F32, noncontig=True)
    run_case(70, 40, 24, 8, dtype, True, 0.1, F32, noncontig=True, main_gemm="cublas", reduction="ordered")


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [7, 70])
def test_launch_plans_follow_strides_and_keep_no_tensor(M):
    """The launchers work out checks and launch arguments once per call signature (_ForwardPlan,
    _BackwardPlan): the same shapes with other strides (transposed views) get a plan of their
    own and the same results, bit for bit, and a cached plan keeps none of the call's tensors."""
    x, w, b, a, bb, dy = make_inputs(M, 40, 24, 8, F32, True)
    y, u = lora_forward(x, w, b, a, bb, 2.0, 0.1, 7)
    grads = lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 7)
    x_t, w_t, dy_t = (t.t().contiguous().t() for t in (x, w, dy))
    y_t, u_t = lora_forward(x_t, w_t, b, a, bb, 2.0, 0.1, 7)
    grads_t = lora_backward(dy_t, x_t, w_t, a, bb, u_t, 2.0, 0.1, 7)
    for got, expected in zip((y_t, u_t, *grads_t), (y, u, *grads), strict=True):
        assert torch.equal(got, expected)
    probe = x.clone()
    alive = weakref.ref(probe)
    lora_backward(dy, probe, w, a, bb, lora_forward(probe, w, b, a, bb, 2.0, 0.1, 7)[1], 2.0, 0.1, 7)
    del probe
    gc.collect()
    assert alive() is None


@pytest.mark.interpreter
def test_a_cached_plan_asks_for_the_main_gemm_on_every_call(monkeypatch):
    """LORAFAST_MAIN_GEMM (like a choice measured later) still decides after a plan is cached:
    the cuBLAS path runs addmm_ in forward and backward, the Triton GEMM none."""
    x, w, b, a, bb, dy = make_inputs(70, 40, 24, 8, F32, True)
    addmm_calls = []
    addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda t, *args, **kw: addmm_calls.append(1) or addmm(t, *args, **kw))
    outputs = {}
    for main_gemm in ("cublas", "triton", "cublas"):
        monkeypatch.setenv("LORAFAST_MAIN_GEMM", main_gemm)
        addmm_calls.clear()
        y, u = lora_forward(x, w, b, a, bb, 2.0, 0.1, 7)
        dx = lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 7)[0]
        assert len(addmm_calls) == (2 if main_gemm == "cublas" else 0), main_gemm
        outputs.setdefault(main_gemm, (y, dx))
    for got, expected in zip(outputs["triton"], outputs["cublas"], strict=True):
        assert_close(got, expected, F32)


def test_the_plan_cache_drops_its_least_recently_used_plan_beyond_its_limit():
    cache = K.lora_linear._PlanCache(limit=2)
    built = []
    for key in ["a", "b", "a", "c", "a", "b", None, None]:  # None: a call that cannot be keyed, never kept
        assert cache.get(key, lambda key=key: built.append(key) or f"plan {key}") == f"plan {key}"
    assert built == ["a", "b", "c", "b", None, None]  # "c" dropped "b" (used before "a"), "b" then "c"


@pytest.mark.interpreter
def test_an_unhashable_path_or_main_gemm_is_a_value_error():
    x, w, b, a, bb, dy = make_inputs(7, 40, 24, 8, F32, True)
    with pytest.raises(ValueError, match="path must be"):
        lora_forward(x, w, b, a, bb, 2.0, 0.1, 7, path=["triton"])
    u = lora_forward(x, w, b, a, bb, 2.0, 0.1, 7)[1]
    with pytest.raises(ValueError, match="main_gemm must be"):
        lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 7, main_gemm=["cublas"])


@pytest.mark.interpreter
def test_split_dots_keep_small_lora_values_accurate():
    """B ~ 1e-6 (as early in training: B starts at 0) puts du = s·dY B below fp16's normal
    range; the split's per-column scaling must keep dA = duᵀ x̂ as accurate, relative to its
    size, as the fp32 LoRA branch (a plain hi/lo split flushes du: 2e-2 relative error)."""
    b_scale, s = 1e-6, 2.0
    x, w, _, a, bb, dy = make_inputs(33, 40, 24, 8, F16, False, b_scale=b_scale)
    _, u = lora_forward(x, w, None, a, bb, s, 0.0, 0)
    _, da, _ = lora_backward(dy, x, w, a, bb, u, s, 0.0, 0)
    f64 = torch.float64
    _, u64 = ref.lora_forward(x.to(f64), w.to(f64), None, a.to(f64), bb.to(f64), s, 0.0, None)
    da64 = ref.lora_backward(*(t.to(f64) for t in (dy, x, w, a, bb, u64)), s, 0.0, None)[1]
    _, ur = ref.lora_forward(x, w, None, a, bb, s, 0.0, None)
    dar = ref.lora_backward(dy, x, w, a, bb, ur, s, 0.0, None)[1]
    check_rule("dA / b_scale", da / b_scale, da64 / b_scale, dar / b_scale, F32)


@pytest.mark.interpreter
def test_split_dots_keep_an_outlier_token_s_neighbours_accurate():
    """One token whose activations are 1e4x the others' (and whose dY is 0, like a masked token)
    sets the fp16 split's per-tile scale: the others' u are then ~1e-4 of it. dB = dYᵀ u must
    still be as accurate as the fp32 reference (fp32's row): the split's lo part used to go
    subnormal first, leaving hi's 11 bits (dB error 1e-3, 500x the reference's)."""
    s = 2.0
    x, w, _, a, bb, dy = make_inputs(64, 32, 32, 8, F16, False, seed=3)
    x[0] *= 1e4
    dy[0] = 0
    _, u = lora_forward(x, w, None, a, bb, s, 0.0, 0)
    db = lora_backward(dy, x, w, a, bb, u, s, 0.0, 0)[2]
    f64 = torch.float64
    _, u64 = ref.lora_forward(x.to(f64), w.to(f64), None, a.to(f64), bb.to(f64), s, 0.0, None)
    db64 = ref.lora_backward(*(t.to(f64) for t in (dy, x, w, a, bb, u64)), s, 0.0, None)[2]
    _, ur = ref.lora_forward(x, w, None, a, bb, s, 0.0, None)
    dbr = ref.lora_backward(dy, x, w, a, bb, ur, s, 0.0, None)[2]
    check_rule("dB", db, db64, dbr, F32)


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [7, 70])
def test_small_m_path_equals_two_kernel_path(M):
    x, w, b, a, bb, _ = make_inputs(M, 72, 40, 8, F32, True)
    y1, u1 = lora_forward(x, w, b, a, bb, 0.5, 0.2, 77, path="small_m")
    y2, u2 = lora_forward(x, w, b, a, bb, 0.5, 0.2, 77, path="triton")
    assert_close(u1, u2, F32)
    assert_close(y1, y2, F32)


def split_small_m(split: int, block_n: int = 32, block_k: int = 32, warps: int = 4, stages: int = 1):
    """Every small-M launch inside runs the split-K config ``(block_n, block_k, warps, stages, split)``."""
    config = K.lora_linear._small_m_make(block_n, block_k, warps, stages, split)
    return forced_config(K.lora_linear._lora_fwd_small_m, config)


#: The small-M cases of CASES, and one with two row blocks (M = 70 > 64)
SMALL_M_CASES = [case for case in CASES if case[0] <= 64] + [(70, 72, 40, 4, BF16, True, 0.1, F32)]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", SMALL_M_CASES, ids=_case_id)
@pytest.mark.parametrize("split", [2, 4])
def test_split_k_small_m_matches_reference(case, split):
    """The split-K small-M configs (K runs of 32: 1 to 3 tiles over 2 or 4 splits, so some
    splits are empty) give y and u to the reference's tolerance, and backward from their u."""
    with split_small_m(split):
        run_case(*case, path="small_m")


@pytest.mark.interpreter
def test_unsplit_small_m_launches_take_no_scratch(monkeypatch):
    """The split-K scratch (a memset per launch off the default stream, e.g. in a captured decode
    graph) is taken only by launches that may split: autotuning, or a split config chosen."""
    taken = []
    take = K.lora_linear._split_scratch
    monkeypatch.setattr(K.lora_linear, "_split_scratch", lambda *a: taken.append(a) or take(*a))
    x, w, b, a, bb, _ = make_inputs(7, 72, 40, 8, F32, True)
    for split, expected in [(1, [1, 1, 1]), (2, [1, 2, 3])]:
        taken.clear()
        with split_small_m(split):  # forgets earlier choices: the first launch goes through the autotuner
            results = []
            for _ in range(3):
                results.append(lora_forward(x, w, b, a, bb, 2.0, 0.1, 9, path="small_m"))
                assert len(taken) == expected[len(results) - 1], (split, len(results))
        assert all(torch.equal(later[0], results[0][0]) for later in results)


@pytest.mark.interpreter
def test_split_k_small_m_is_deterministic_and_leaves_its_arrival_words_zeroed():
    """Partials are summed in split order (the same bits every run, on a GPU whatever order the
    programs finish in) and close to the unsplit sum; the arrival words are 0 again after each launch."""
    x, w, b, a, bb, _ = make_inputs(33, 72, 40, 8, F32, True)
    with split_small_m(1):
        unsplit = lora_forward(x, w, b, a, bb, 2.0, 0.1, 9, path="small_m")
    with split_small_m(3):
        runs = [lora_forward(x, w, b, a, bb, 2.0, 0.1, 9, path="small_m") for _ in range(2)]
    words = [arrivals for device, (arrivals, _) in K.lora_linear._SPLIT_SCRATCH.items() if device == x.device]
    assert words and all(int(t.abs().sum()) == 0 for t in words)
    for first, again, whole in zip(runs[0], runs[1], unsplit, strict=True):
        assert torch.equal(first, again)
        assert_close(first, whole, F32)


@pytest.mark.interpreter
@pytest.mark.parametrize("flags", [(True, False), (False, True), (False, False)])
def test_needs_grad_flags(flags):
    x, w, b, a, bb, dy = make_inputs(33, 40, 24, 4, F32, False)
    y, u = lora_forward(x, w, b, a, bb, 2.0, 0.1, 5)
    full = lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 5)
    part = lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 5, needs_grad_x=flags[0], needs_grad_lora=flags[1])
    assert (part[0] is not None) == flags[0]
    assert (part[1] is not None) == flags[1] and (part[2] is not None) == flags[1]
    for got, want in zip(part, full, strict=True):
        if got is not None:
            assert_close(got, want, F32)


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [0, 33, 70])
def test_every_output_element_is_written(M, monkeypatch):
    """The launchers allocate their outputs with ``torch.empty`` (dA too: B1 clears it, no memset):
    filled with NaN first, every element must still come out right, on both main-GEMM paths."""
    x, w, b, a, bb, dy = make_inputs(M, 40, 24, 8, F32, True)
    expected = [lora_forward(x, w, b, a, bb, 2.0, 0.1, 9, path="triton")]
    expected.append(lora_backward(dy, x, w, a, bb, expected[0][1], 2.0, 0.1, 9, main_gemm="triton"))
    real_empty = torch.empty

    def nan_filled_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_filled_empty)
    for path, reduction in (("triton", "atomic"), ("cublas", "atomic"), ("cublas", "ordered")):
        y, u = lora_forward(x, w, b, a, bb, 2.0, 0.1, 9, path=path)
        grads = lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 9, main_gemm=path, reduction=reduction)
        for got, want in zip((y, u, *grads), (*expected[0], *expected[1]), strict=True):
            assert not got.isnan().any(), path
            assert_close(got, want, F32)
    assert torch.equal(grads[1], torch.zeros_like(grads[1])) == (M == 0)


# ----------------------------------------------------------------------------- dropout mask


def _identity_problem(M, n, p, seed, device=DEVICE):
    """A = B = I (r = K = N = n), W = 0, x = 1, s = 1: then u = y = m/(1-p) (forward's mask),
    and with dY = 1: du = 1, dX = m/(1-p) (backward's mask), dA[j, k] = Σ_m x̂[m, k]."""
    x = torch.ones(M, n, device=device)
    w = torch.zeros(n, n, device=device)
    eye = torch.eye(n, device=device)
    return x, w, eye.clone(), eye.clone()


@pytest.mark.interpreter
@pytest.mark.parametrize("M,path", [(7, "small_m"), (7, "triton"), (70, "triton"), (70, "cublas")])
def test_forward_and_backward_draw_the_same_mask(M, path):
    n, p, seed = 40, 0.3, 2024
    x, w, a, bb = _identity_problem(M, n, p, seed)
    y, u = lora_forward(x, w, None, a, bb, 1.0, p, seed, path=path)
    dx, da, db = lora_backward(torch.ones(M, n, device=DEVICE), x, w, a, bb, u, 1.0, p, seed, main_gemm="triton")
    expected = dropout_keep_mask(seed, M, n, p, DEVICE)
    fwd_mask, y_mask, bwd_mask = u != 0, y != 0, dx != 0
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(fwd_mask, expected), "forward (u) mask differs from dropout_keep_mask"
    assert torch.equal(y_mask, expected), "forward (y) mask differs from dropout_keep_mask"
    assert torch.equal(bwd_mask, expected), "backward (dX) mask differs from the forward's"
    scale = 1.0 / (1.0 - resolved_dropout_p(p))
    assert_close(u, expected.float() * scale, F32)
    assert_close(dx, expected.float() * scale, F32)
    assert_close(da, (expected.float() * scale).sum(0).expand(n, n), F32)  # dA = duᵀ x̂
    # another seed draws another mask (a constant mask would pass the checks above)
    _, u_other = lora_forward(x, w, None, a, bb, 1.0, p, seed + 1, path=path)
    assert not torch.equal(u_other != 0, fwd_mask)


@pytest.mark.interpreter
def test_a_seed_tensor_draws_the_masks_of_its_value():
    """The kernels take the seed as an int or as a 1-element int64 tensor on the device, which
    they load (what keeps dropout right under CUDA-graph replay): the same masks either way."""
    x, w, b, a, bb, dy = make_inputs(70, 40, 24, 8, F32, True)
    seed = 2**40 + 17
    seed_tensor = torch.tensor([seed], device=DEVICE)
    assert torch.equal(
        dropout_keep_mask(seed_tensor, 70, 40, 0.3, DEVICE), dropout_keep_mask(seed, 70, 40, 0.3, DEVICE)
    )
    for path in ("small_m", "triton"):
        by_int = lora_forward(x, w, b, a, bb, 2.0, 0.3, seed, path=path)
        by_tensor = lora_forward(x, w, b, a, bb, 2.0, 0.3, seed_tensor, path=path)
        for got, want in zip(by_tensor, by_int, strict=True):
            assert torch.equal(got, want), path
    u = by_int[1]
    for reduction in ("atomic", "ordered"):
        by_int = lora_backward(dy, x, w, a, bb, u, 2.0, 0.3, seed, reduction=reduction)
        by_tensor = lora_backward(dy, x, w, a, bb, u, 2.0, 0.3, seed_tensor, reduction=reduction)
        for got, want in zip(by_tensor, by_int, strict=True):
            assert_close(got, want, F32)
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([1], device="meta")):
        with pytest.raises(ValueError, match="a tensor seed must be one int64 element"):
            lora_forward(x, w, b, a, bb, 2.0, 0.3, bad)


@pytest.mark.interpreter
def test_int_and_tensor_seeds_launch_the_same_kernel_variant(monkeypatch):
    """A graph captured after eager warm-up (int seeds) passes tensor seeds: nothing may be
    autotuned or compiled then (CUDA forbids loading a module while capturing). Both kinds of
    seed give the kernels the same argument types: an int word outside int32 (Triton types ints
    by value) and an int64 pointer; so after int-seed calls, tensor-seed ones reach no autotuner."""
    from lorafast.kernels._common import SEED_FLIP, TunedLauncher, seed_arguments

    for seed in (0, 1, 1234, 2**31, 2**40 + 17, 2**62 - 1, torch.tensor(5, device=DEVICE)):
        word, pointer = seed_arguments(seed, torch.device(DEVICE))
        assert isinstance(word, int) and not -(2**31) <= word < 2**31, seed
        assert pointer.dtype == torch.int64 and pointer.numel() == 1 and pointer.device.type == DEVICE
        value = int(seed) if isinstance(seed, int) else int(pointer)
        assert word ^ int(pointer) ^ SEED_FLIP == value
    x, w, b, a, bb, dy = make_inputs(70, 40, 24, 8, F32, True)
    paths = [("small_m", "atomic"), ("triton", "ordered"), ("cublas", "atomic")]
    for path, reduction in paths:  # int seeds: compiled, autotuned, memoized
        _, u = lora_forward(x, w, b, a, bb, 2.0, 0.3, 2**40 + 17, path=path)
        lora_backward(dy, x, w, a, bb, u, 2.0, 0.3, 2**40 + 17, reduction=reduction)
    dropout_keep_mask(2**40 + 17, 70, 40, 0.3, DEVICE)
    tuned = []
    for launcher in vars(K.lora_linear).values():
        if isinstance(launcher, TunedLauncher):
            run = launcher.autotuner.run
            monkeypatch.setattr(launcher.autotuner, "run", lambda *a, run=run, **k: tuned.append(a) or run(*a, **k))
    seed_tensor = torch.tensor(2**40 + 18, device=DEVICE)
    for path, reduction in paths:
        _, u = lora_forward(x, w, b, a, bb, 2.0, 0.3, seed_tensor, path=path)
        lora_backward(dy, x, w, a, bb, u, 2.0, 0.3, seed_tensor, reduction=reduction)
    assert tuned == []


@pytest.mark.interpreter
def test_kept_elements_are_scaled_by_the_inverse_keep_probability():
    """The kernels keep an element with probability 1 - threshold / 2**16 and scale it by the
    inverse of that, not by 1 / (1 - p): unbiased however close p is to 1. p = 0.99999 and
    0.999999 have the same threshold, so the same masks and the same scale (they were scaled by
    1e5 and 1e6): 2**16 for both; at p = 0.3 the scale is 2**16 / 45875, not 1 / 0.7."""
    x, w, a, bb = _identity_problem(7, 40, 0.3, 5)
    threshold = K._common.drop_threshold(0.3)
    u = lora_forward(x, w, None, a, bb, 1.0, 0.3, 5)[1]
    kept = u[u != 0]
    assert threshold == 19661 and kept.numel() > 0
    assert torch.equal(kept, torch.full_like(kept, 2**16 / (2**16 - threshold)))
    assert resolved_dropout_p(0.99999) == resolved_dropout_p(0.999999) == 1 - 2**-16
    scales = {K.lora_linear.LoraScalars(1.0, p, False).inv_keep for p in (0.99999, 0.999999)}
    assert scales == {2.0**16}


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_offsets(p):
    M, K_ = 96, 640
    mask = dropout_keep_mask(7, M, K_, p, DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (M, K_)
    n = mask.numel()
    rate = mask.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 3 * sigma, f"keep rate {rate:.4f} vs {1 - p} (3 sigma = {3 * sigma:.4f})"
    # the mask depends on (seed, row, col) only: fewer rows give a prefix of the same mask
    assert torch.equal(dropout_keep_mask(7, 5, K_, p, DEVICE), mask[:5])
    assert torch.equal(dropout_keep_mask(7, M, K_, p, DEVICE), mask)
    assert not torch.equal(dropout_keep_mask(8, M, K_, p, DEVICE), mask)
    assert dropout_keep_mask(7, 4, 8, 0.0, DEVICE).all()


@pytest.mark.interpreter
def test_neighbouring_columns_are_independent():
    """One Philox evaluation gives the mask of eight neighbouring columns (the two 16-bit halves
    of its four words): each column offset within the group keeps at rate 1-p, and pairs of
    neighbours (two halves of one word, two words of one group, and across two groups) both keep
    at rate (1-p)² -- within 4σ of each, for two seeds."""
    p, M, K_ = 0.5, 256, 512
    group = 8
    for seed in (11, 12):
        keep = dropout_keep_mask(seed, M, K_, p, DEVICE).double()
        for offset in range(group):
            column_rate = keep[:, offset::group].mean().item()
            sigma = math.sqrt(p * (1 - p) / (M * K_ / group))
            assert abs(column_rate - (1 - p)) < 4 * sigma, f"offset {offset}: keep rate {column_rate:.4f}"
            both = (keep[:, offset:-1:group] * keep[:, offset + 1 :: group]).mean().item()  # (c, c+1)
            q = (1 - p) ** 2
            sigma = math.sqrt(q * (1 - q) / (M * K_ / group))
            assert abs(both - q) < 4 * sigma, f"pairs at offset {offset}: both kept at rate {both:.4f} vs {q}"


@pytest.mark.interpreter
def test_keep_threshold_resolution():
    """p is resolved to 2**-16 (16-bit lanes): the threshold is round(p·2**16), capped below 2**16
    (so p < 2**-17 drops nothing); raising p by 2**-10 drops a superset of the elements, about
    M·K·2**-10 more."""
    drop_threshold = K._common.drop_threshold
    assert drop_threshold(0.1) == 6554 and drop_threshold(0.5) == 2**15
    assert drop_threshold(1 - 2**-20) == 2**16 - 1
    assert drop_threshold(2**-18) == 0
    M, K_, step = 128, 1024, 2**-10
    low, high = (dropout_keep_mask(3, M, K_, p, DEVICE) for p in (0.25, 0.25 + step))
    assert torch.all(low | ~high), "a larger p must drop a superset of the elements"
    extra = (low & ~high).sum().item()  # lanes in [threshold(0.25), threshold(0.25 + step))
    expected = M * K_ * step
    assert abs(extra - expected) < 4 * math.sqrt(expected), f"{extra} more dropped, expected ~{expected:.0f}"


# ----------------------------------------------------------------------------- merge


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,lora_dtype", [(F32, F32), (F16, F32), (BF16, F32), (BF16, BF16)])
@pytest.mark.parametrize("r", [4, 40])
def test_merge_and_unmerge(dtype, lora_dtype, r):
    N, K_ = 72, 40
    _, w, _, a, bb, _ = make_inputs(3, K_, N, r, dtype, False, lora_dtype)
    for weight in (w.clone(), w.t().contiguous().t()):  # contiguous and transposed view
        original = weight.clone()
        lora_merge_(weight, a, bb, 1.5)
        expected = ref.merged_weight(original, a, bb, 1.5)
        if dtype == F32:
            assert_close(weight, expected, F32)
        else:  # same fp32 value rounded once: equal up to one ulp where summation order flips a tie
            torch.testing.assert_close(
                weight.float(), expected.float(), atol=0, rtol=2**-7 if dtype == BF16 else 2**-10
            )
        lora_merge_(weight, a, bb, 1.5, sign=-1.0)
        assert_close(weight, original, dtype)


# ----------------------------------------------------------------------------- API contract


@pytest.mark.interpreter
def test_validation_errors():
    x, w, b, a, bb, dy = make_inputs(7, 24, 40, 4, F32, True)
    with pytest.raises(ValueError, match=r"weight \(40, 25\)"):
        lora_forward(x, torch.zeros(40, 25), b, a, bb, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_forward(x, w, b, a, bb[:, :3], 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="bias"):
        lora_forward(x, w, b[:5], a, bb, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="dtype"):
        lora_forward(x, w.half(), b, a, bb, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="2D"):
        lora_forward(x[None], w, b, a, bb, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_forward(x, w, b, a, bb, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="rank"):
        lora_forward(x, w, b, torch.zeros(257, 24), torch.zeros(40, 257), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="device"):
        lora_forward(x, w, b, a.to("meta"), bb, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="grad_y"):
        lora_backward(dy[:, :5], x, w, a, bb, torch.zeros(7, 4), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="u"):
        lora_backward(dy, x, w, a, bb, torch.zeros(7, 5), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="path"):
        lora_forward(x, w, b, a, bb, 1.0, 0.0, 0, path="nope")
    with pytest.raises(ValueError, match="lora_A"):
        lora_merge_(w, torch.zeros(4, 25), bb, 1.0)


def test_choose_main_gemm_defaults_and_forcing(monkeypatch):
    monkeypatch.delenv("LORAFAST_MAIN_GEMM", raising=False)
    K.main_gemm.MAIN_GEMM_CHOOSER.forget()
    assert choose_main_gemm(8192, 4096, 4096, "cpu", F32) == "triton"  # nothing measured: the default
    assert K.main_gemm.default_main_gemm(torch.device("cuda")) == "cublas"
    monkeypatch.setenv("LORAFAST_MAIN_GEMM", "cublas")
    assert choose_main_gemm(8192, 4096, 4096, "cpu", F32, direction="backward") == "cublas"
    with pytest.raises(ValueError, match="direction"):
        choose_main_gemm(8192, 4096, 4096, "cpu", F32, direction="sideways")


def test_main_gemm_is_measured_only_where_timing_is_safe(monkeypatch):
    can_measure = K.main_gemm.can_measure
    assert not can_measure(torch.device("cpu"))  # the interpreter: nothing to time
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "0")  # GPU test runs: no autotuning, no measuring
    assert not can_measure(torch.device("cuda"))
    if HAS_CUDA:
        monkeypatch.delenv("LORAFAST_AUTOTUNE")
        assert can_measure(torch.device("cuda"))
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            assert not can_measure(torch.device("cuda"))  # capturing: timing would synchronize


@pytest.fixture
def measuring(monkeypatch):
    """Main-GEMM measuring on (any device) with a fake timer: it runs the timed call once, as a
    measurement would, records which path it was and returns ``times[path]``."""
    times, timed = {}, []

    def fake_time_ms(fn):  # fn is functools.partial(run, path)
        fn()
        timed.append(fn.args[0])
        return times[fn.args[0]]

    monkeypatch.delenv("LORAFAST_MAIN_GEMM", raising=False)
    monkeypatch.setattr(K.main_gemm, "can_measure", lambda device: True)
    monkeypatch.setattr(K.main_gemm, "time_ms", fake_time_ms)
    K.main_gemm.MAIN_GEMM_CHOOSER.forget()
    yield times, timed
    K.main_gemm.MAIN_GEMM_CHOOSER.forget()


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["atomic", "ordered"])
@pytest.mark.parametrize("winner", ["triton", "cublas"])
def test_measured_main_gemm_runs_the_faster_path_and_leaves_no_trace_in_the_gradients(measuring, winner, reduction):
    """The first launch of a shape times both paths and keeps the faster; its outputs are those
    of the winner alone, bit for bit (dA is accumulated by atomics: the timed runs must add into
    scratch, not into dA); later launches time nothing."""
    times, timed = measuring
    times.update({winner: 1.0, ({"triton", "cublas"} - {winner}).pop(): 2.0})
    x, w, b, a, bb, dy = make_inputs(67, 40, 72, 8, F32, True)
    s, p, seed = 2.0, 0.1, 77

    def step(path=None):
        y, u = lora_forward(x, w, b, a, bb, s, p, seed, path=path)
        return (y, u, *lora_backward(dy, x, w, a, bb, u, s, p, seed, main_gemm=path, reduction=reduction))

    measured = step()
    assert timed == ["triton", "cublas", "triton", "cublas"]  # forward's key, then backward's
    forced = step(winner)
    for name, got, expected in zip(["y", "u", "dX", "dA", "dB"], measured, forced, strict=True):
        assert torch.equal(got, expected), name
    assert choose_main_gemm(67, 72, 40, "cpu", F32) == winner
    assert choose_main_gemm(67, 40, 72, "cpu", F32, direction="backward") == winner
    assert choose_main_gemm(67, 72, 40, "cpu", F16) == "triton"  # another key: not measured
    reported = K.autotune_choices()["main GEMM"]
    assert [row["config"]["main_gemm"] for row in reported] == [winner, winner]
    assert reported[0]["key"][0] == "forward" and reported[0]["config"][f"{winner}_ms"] == 1.0
    again = step()
    assert timed == ["triton", "cublas", "triton", "cublas"]
    assert all(torch.equal(got, expected) for got, expected in zip(again, forced, strict=True))


@pytest.mark.interpreter
def test_main_gemm_measuring_skips_what_has_no_main_gemm(measuring, monkeypatch):
    """A backward without dX, a forced path and a forced main GEMM (also at decode size, which
    then takes the small-M kernel) time nothing."""
    times, timed = measuring
    times.update(triton=1.0, cublas=2.0)
    x, w, b, a, bb, dy = make_inputs(67, 40, 72, 8, F32, False)
    y, u = lora_forward(x, w, b, a, bb, 2.0, 0.0, 0, path="cublas")
    lora_backward(dy, x, w, a, bb, u, 2.0, 0.0, 0, needs_grad_x=False)
    lora_forward(x[:16], w, b, a, bb, 2.0, 0.0, 0, path="small_m")
    assert timed == []
    monkeypatch.setenv("LORAFAST_MAIN_GEMM", "cublas")
    lora_forward(x, w, b, a, bb, 2.0, 0.0, 0)
    lora_forward(x[:16], w, b, a, bb, 2.0, 0.0, 0)
    assert timed == [] and K.autotune_choices()["main GEMM"] == []
    assert choose_main_gemm(16, 72, 40, "cpu", F32) == "small_m" and choose_main_gemm(67, 72, 40, "cpu", F32) == "cublas"


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("winner", ["small_m", "triton", "cublas"])
def test_a_small_m_forward_is_measured_among_the_small_m_kernel_and_both_main_gemms(measuring, winner, M):
    """A forward of at most SMALL_M_MAX rows times the small-M kernel and F1 + each main GEMM on
    its first launch (each path rewrites all of y and u) and keeps the fastest: its outputs are
    that path's alone, bit for bit, and later launches time nothing; M = 65 is a main-GEMM key."""
    times, timed = measuring
    times.update({"small_m": 2.0, "triton": 2.0, "cublas": 2.0, winner: 1.0})
    x, w, b, a, bb, _ = make_inputs(M, 40, 72, 8, F32, False)
    s, p, seed = 2.0, 0.1, 77
    measured = lora_forward(x, w, b, a, bb, s, p, seed)
    assert timed == ["small_m", "triton", "cublas"]
    forced = lora_forward(x, w, b, a, bb, s, p, seed, path=winner)
    assert all(torch.equal(got, expected) for got, expected in zip(measured, forced, strict=True))
    assert choose_main_gemm(M, 72, 40, "cpu", F32) == winner
    (row,) = K.autotune_choices()["main GEMM"]
    assert row["config"] == {"main_gemm": winner, **{f"{path}_ms": times[path] for path in times}}
    again = lora_forward(x, w, b, a, bb, s, p, seed)
    assert len(timed) == 3 and all(torch.equal(got, expected) for got, expected in zip(again, forced, strict=True))
    x65 = make_inputs(65, 40, 72, 8, F32, False)[0]
    lora_forward(x65, w, b, a, bb, s, p, seed)
    assert timed[3:] == ["triton", "cublas"]


def test_an_unmeasured_small_m_forward_takes_the_small_m_kernel(monkeypatch):
    monkeypatch.delenv("LORAFAST_MAIN_GEMM", raising=False)
    K.main_gemm.MAIN_GEMM_CHOOSER.forget()
    assert [choose_main_gemm(M, 4096, 4096, "cuda:0", BF16) for M in (1, 64, 65)] == ["small_m", "small_m", "cublas"]
    assert choose_main_gemm(16, 4096, 4096, "cuda:0", BF16, direction="backward") == "cublas"


@gpu
@needs_cuda
def test_main_gemm_is_measured_by_do_bench_on_cuda(monkeypatch):
    """The real timer on a GPU: both paths timed once per key, the faster kept, and the outputs
    those of the winner alone (dA to fp32 atomics' reordering: the timed runs add into scratch)."""
    monkeypatch.delenv("LORAFAST_MAIN_GEMM", raising=False)
    monkeypatch.setattr(K.main_gemm, "can_measure", lambda device: True)  # GPU runs set LORAFAST_AUTOTUNE=0
    K.main_gemm.MAIN_GEMM_CHOOSER.forget()
    try:
        x, w, b, a, bb, dy = make_inputs(256, 512, 384, 16, BF16, True)
        s, p, seed = 2.0, 0.1, 5
        y, u = lora_forward(x, w, b, a, bb, s, p, seed)
        dx, da, db = lora_backward(dy, x, w, a, bb, u, s, p, seed)
        rows = K.autotune_choices()["main GEMM"]
        assert [row["key"][0] for row in rows] == ["forward", "backward"]
        assert all(row["config"]["triton_ms"] > 0 and row["config"]["cublas_ms"] > 0 for row in rows)
        forward, backward = (row["config"]["main_gemm"] for row in rows)
        assert choose_main_gemm(256, 384, 512, x.device, BF16) == forward
        assert choose_main_gemm(256, 512, 384, x.device, BF16, direction="backward") == backward
        y_forced, u_forced = lora_forward(x, w, b, a, bb, s, p, seed, path=forward)
        dx_forced, da_forced, db_forced = lora_backward(dy, x, w, a, bb, u, s, p, seed, main_gemm=backward)
        assert torch.equal(y, y_forced) and torch.equal(u, u_forced) and torch.equal(dx, dx_forced)
        torch.testing.assert_close(da, da_forced, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(db, db_forced, rtol=1e-5, atol=1e-6)
    finally:
        K.main_gemm.MAIN_GEMM_CHOOSER.forget()


@pytest.mark.interpreter
def test_every_kernel_entry_point_launches_on_its_tensors_device(monkeypatch):
    """lora_forward, lora_backward, lora_merge_ and dropout_keep_mask each launch inside
    ``launch_device`` of their tensors' device (tests/test_launcher.py checks what it does)."""
    devices = []

    def recording_launch_device(device):
        devices.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(K._common, "launch_device", recording_launch_device)
    monkeypatch.setattr(K.lora_linear, "launch_device", recording_launch_device)
    x, w, b, a, bb, dy = make_inputs(7, 24, 40, 4, F32, True)
    _, u = lora_forward(x, w, b, a, bb, 1.0, 0.1, 3)
    lora_backward(dy, x, w, a, bb, u, 1.0, 0.1, 3)
    lora_merge_(w, a, bb, 1.0)
    dropout_keep_mask(3, 7, 24, 0.1, x.device)
    assert devices == [x.device] * 4


def test_bf16_harness_fixes_interpreter_dot():
    """The harness fix itself: a bf16 product through the interpreter must be a real product."""
    x, w, b, a, bb, _ = make_inputs(7, 24, 40, 4, BF16, False, BF16)
    y, _ = lora_forward(x, w, None, a, bb, 1.0, 0.0, 0)
    expected = ref.lora_forward(x.double(), w.double(), None, a.double(), bb.double(), 1.0, 0.0, None)[0]
    assert_close(y, expected, BF16)


# ----------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize(
    "paths",
    [(None, None), ("triton", "cublas"), ("cublas", "triton")],
    ids=["default", "fwd_triton-bwd_cublas", "fwd_cublas-bwd_triton"],
)
def test_gpu_small_odd_shapes(case, paths):
    run_case(*case, path=paths[0], main_gemm=paths[1], device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_small_odd_shapes_ordered_reduction(case):
    run_case(*case, main_gemm="triton" if case[0] % 2 else "cublas", device="cuda", reduction="ordered")


@gpu
@needs_cuda
@pytest.mark.parametrize("M,path", [(16, None), (4096, "triton"), (4096, "cublas")])
def test_gpu_real_size_bf16(M, path):
    run_case(M, 4096, 4096, 16, BF16, True, 0.1, F32, path=path, main_gemm=path, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("tile", [(64, 128, 4, 4, 2), (128, 64, 4, 4, 4), (64, 64, 4, 4, 4)], ids=str)
def test_gpu_split_k_small_m_decode_sizes(M, tile):
    """Each split-K small-M candidate at decode sizes (K = N = 4096, bf16, fp32 LoRA) against the
    reference, then twice more: the same bits (partials summed in split order)."""
    with split_small_m(tile[4], *tile[:4]):
        run_case(M, 4096, 4096, 16, BF16, True, 0.1, F32, path="small_m", device="cuda")
        x, w, b, a, bb, _ = make_inputs(M, 4096, 4096, 16, BF16, True, device="cuda")
        runs = [lora_forward(x, w, b, a, bb, 2.0, 0.1, 5, path="small_m") for _ in range(3)]
    for later in runs[1:]:
        assert torch.equal(later[0], runs[0][0]) and torch.equal(later[1], runs[0][1])


@gpu
@needs_cuda
def test_gpu_split_k_small_m_replays_from_a_cuda_graph():
    """A split-K small-M launch captured in a CUDA graph (its arrival words zeroed by the graph),
    replayed on new inputs, then run eagerly again: every result equals the eager one."""
    x, w, b, a, bb, _ = make_inputs(4, 1024, 2048, 16, BF16, True, device="cuda")
    static_x = x.clone()
    with split_small_m(4, 128, 64, 4, 4):
        eager = lora_forward(x, w, b, a, bb, 2.0, 0.0, 0, path="small_m")[0]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            lora_forward(static_x, w, b, a, bb, 2.0, 0.0, 0, path="small_m")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = lora_forward(static_x, w, b, a, bb, 2.0, 0.0, 0, path="small_m")[0]
        for step in range(3):
            new_x = x * (step + 2)
            static_x.copy_(new_x)
            graph.replay()
            assert torch.equal(captured, lora_forward(new_x, w, b, a, bb, 2.0, 0.0, 0, path="small_m")[0]), step
        assert torch.equal(lora_forward(x, w, b, a, bb, 2.0, 0.0, 0, path="small_m")[0], eager)


@gpu
@needs_cuda
def test_gpu_a_shape_first_seen_while_a_cuda_graph_is_captured(monkeypatch):
    """With autotuning on, a small-M key first launched inside a CUDA-graph capture (N = 48 after
    an eager warm-up at N = 64) cannot be benchmarked: it runs the prune's default config (one
    the warm-up compiled: N = K = 64 keeps two) and the replay matches the reference."""
    monkeypatch.setenv("LORAFAST_AUTOTUNE", "1")
    x, w, b, a, bb, _ = make_inputs(4, 64, 64, 16, BF16, True, device="cuda")
    lora_forward(x, w, b, a, bb, 2.0, 0.1, 5)  # autotunes: compiles both configs
    x, w, b, a, bb, _ = make_inputs(4, 64, 48, 16, BF16, True, device="cuda", seed=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lora_forward(x, w, b, a, bb, 2.0, 0.1, 5)[0]
    graph.replay()
    mask = dropout_keep_mask(5, 4, 64, 0.1, "cuda")
    p = resolved_dropout_p(0.1)
    expected = ref.lora_forward(*(_d(t, torch.float64) for t in (x, w, b, a, bb)), 2.0, p, mask)[0]
    assert_close(captured, expected, BF16)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_real_size_ordered_reduction(dtype):
    run_case(4096, 4096, 4096, 16, dtype, False, 0.1, F32, main_gemm="cublas", device="cuda", reduction="ordered")


@gpu
@needs_cuda
def test_gpu_ordered_reduction_is_deterministic():
    """Atomic dA / dB may differ in their last bits from run to run on a GPU; ordered ones may not."""
    x, w, _, a, bb, dy = make_inputs(8192, 4096, 4096, 16, BF16, False, device="cuda")
    _, u = lora_forward(x, w, None, a, bb, 2.0, 0.1, 5)
    runs = [lora_backward(dy, x, w, a, bb, u, 2.0, 0.1, 5, reduction="ordered") for _ in range(3)]
    for later in runs[1:]:
        for first, again in zip(runs[0], later, strict=True):
            assert torch.equal(first, again)


@gpu
@needs_cuda
def test_gpu_seed_tensor_on_the_device():
    x, w, b, a, bb, dy = make_inputs(4096, 1024, 1024, 16, BF16, True, device="cuda")
    seed_tensor = torch.tensor(2**40 + 3, device="cuda")
    by_int = lora_forward(x, w, b, a, bb, 2.0, 0.1, 2**40 + 3)
    by_tensor = lora_forward(x, w, b, a, bb, 2.0, 0.1, seed_tensor)
    assert torch.equal(by_int[1], by_tensor[1]) and torch.equal(by_int[0], by_tensor[0])
    dx_int = lora_backward(dy, x, w, a, bb, by_int[1], 2.0, 0.1, 2**40 + 3, reduction="ordered")[0]
    dx_tensor = lora_backward(dy, x, w, a, bb, by_int[1], 2.0, 0.1, seed_tensor, reduction="ordered")[0]
    assert torch.equal(dx_int, dx_tensor)


@gpu
@needs_cuda
def test_gpu_real_size_fp16_no_dropout():
    run_case(2048, 1024, 3072, 64, F16, False, 0.0, F32, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("M,path", [(7, "small_m"), (4096, "triton")])
def test_gpu_mask_fwd_bwd(M, path):
    n, p, seed = 128, 0.25, 99
    x, w, a, bb = _identity_problem(M, n, p, seed, device="cuda")
    y, u = lora_forward(x, w, None, a, bb, 1.0, p, seed, path=path)
    dx, _, _ = lora_backward(torch.ones(M, n, device="cuda"), x, w, a, bb, u, 1.0, p, seed)
    expected = dropout_keep_mask(seed, M, n, p, "cuda")
    assert torch.equal(u != 0, expected) and torch.equal(dx != 0, expected)


@gpu
@needs_cuda
def test_gpu_int64_offsets():
    """Rows past 2**31 / K: the mask offsets and the pointer offsets must be int64."""
    K_, r, p, seed = 4096, 16, 0.1, 3
    M = 2**31 // K_ + 64
    x = torch.randn(M, K_, device="cuda", dtype=BF16)
    w = torch.randn(16, K_, device="cuda", dtype=BF16) / 64
    a = torch.randn(r, K_, device="cuda") / 64
    bb = torch.randn(16, r, device="cuda")
    y, u = lora_forward(x, w, None, a, bb, 2.0, p, seed)
    mask = dropout_keep_mask(seed, M, K_, p, "cuda")[-128:]
    y_ref, u_ref = ref.lora_forward(
        x[-128:].double(), w.double(), None, a.double(), bb.double(), 2.0, resolved_dropout_p(p), mask
    )
    assert_close(u[-128:], u_ref, BF16)
    assert_close(y[-128:], y_ref, BF16)
    rate = dropout_keep_mask(seed, M, K_, p, "cuda").double().mean().item()
    assert abs(rate - (1 - p)) < 3 * math.sqrt(p * (1 - p) / (M * K_))


@gpu
@needs_cuda
def test_gpu_merge_real_size():
    N, K_, r = 4096, 4096, 16
    _, w, _, a, bb, _ = make_inputs(1, K_, N, r, BF16, False, F32, device="cuda")
    original = w.clone()
    lora_merge_(w, a, bb, 2.0)
    torch.testing.assert_close(w.float(), ref.merged_weight(original, a, bb, 2.0).float(), atol=0, rtol=2**-7)
    lora_merge_(w, a, bb, 2.0, sign=-1.0)
    assert_close(w, original, BF16)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_kernels_run_on_the_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current (a model spread over GPUs): every kernel must
    run on cuda:1 and give the reference's results there."""
    with torch.cuda.device(0):
        for M, path in [(7, None), (70, "triton"), (70, "cublas")]:
            run_case(M, 72, 40, 16, BF16, True, 0.1, F32, path=path, main_gemm=path, device="cuda:1")
        w = torch.randn(40, 72, device="cuda:1")
        a, bb = torch.randn(4, 72, device="cuda:1"), torch.randn(40, 4, device="cuda:1")
        merged = w.clone()
        lora_merge_(merged, a, bb, 0.5)
        assert_close(merged, w + 0.5 * bb @ a, F32)
        mask = dropout_keep_mask(11, 7, 72, 0.1, "cuda:1")
        assert torch.equal(mask.cpu(), dropout_keep_mask(11, 7, 72, 0.1, "cuda:0").cpu())
