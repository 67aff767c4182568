"""Fused LoRA linear: Triton kernels and their launchers (DESIGN.md §1–§2).

Math (x ``[M, K]``, frozen W ``[N, K]``, bias ``[N]``, A ``[r, K]``, B ``[N, r]``, scaling ``s``,
dropout ``p``, keep mask ``m`` regenerated from ``(seed, row, col)`` with Philox)::

    x̂  = m ⊙ x / (1-p)
    u  = s · x̂ Aᵀ                       [M, r]  fp32
    y  = x Wᵀ + bias + u Bᵀ             [M, N]  x.dtype

    du = s · dY B                       [M, r]  fp32
    dB = dYᵀ u                          [N, r]
    dA = duᵀ x̂                          [r, K]
    dX = dY W + m ⊙ (du A) / (1-p)      [M, K]  x.dtype

Kernels:

* **F1** ``_lora_down_kernel``: ``u = s/(1-p) · (m ⊙ x) Aᵀ``; the mask lives only in registers.
* **F2** ``_lora_fwd_main_kernel``: GEMM ``x Wᵀ`` with the epilogue ``+ u Bᵀ + bias``; y written
  once. With the cuBLAS main GEMM it runs without the GEMM and writes the seed ``y = u Bᵀ + bias``,
  onto which cuBLAS accumulates ``x Wᵀ`` (``addmm_``, beta = 1).
* **small-M** ``_lora_fwd_small_m_kernel`` (M <= 64, decode): ``x Wᵀ`` and ``x̂ Aᵀ`` in the same
  K loop, then ``+ (s·x̂Aᵀ) Bᵀ + bias``; nothing intermediate goes to global memory (u is
  written once by the first column of programs, because backward needs it).
* **B1** ``_lora_dy_kernel``: one pass over dY gives ``du = s·dY B`` (reduced over N in registers)
  and ``dB = dYᵀ u`` (reduced over M by fp32 atomics into an L2-resident ``[N, r]`` buffer).
* **B2** ``_lora_dx_kernel``: GEMM ``dY W`` with the epilogue ``+ m ⊙ (du A)/(1-p)``; the same
  program loads the x tile and mask of its output tile and adds ``duᵀ (m ⊙ x)/(1-p)`` into
  ``dA`` (fp32 atomics). With ``needs_grad_x=False`` the same kernel runs without the GEMM
  (dA only); with the cuBLAS main GEMM it runs without the GEMM, writing the seed
  ``m ⊙ (du A)/(1-p)`` onto which cuBLAS accumulates ``dY W``.
* **ordered grads** ``_lora_ordered_grads_kernel`` (``reduction="ordered"``): dB and dA without
  atomics, each program owning a column block of dY or x and summing its rows in order; B1 then
  gives du only and B2 dX only.

Precision. Dots accumulate in fp32 and take their operands in x's dtype DT; fp32 inputs use
``input_precision="ieee"`` (true fp32 products). With fp16/bf16 x and fp32 LoRA params (the
default, as PEFT, which computes the whole LoRA branch in fp32) the constexpr ``SPLIT_LORA``
(:func:`~lorafast.kernels._common.needs_split`) turns on the "split" (bf16x2) trick: every
fp32 operand v (A, B, u, du) goes in as ``v ≈ scale·(hi + lo)`` with ``hi = (v/scale).to(DT)``,
``lo = (v/scale - hi).to(DT)`` and, in fp16, ``scale = max|v|`` along the contracted axis (keeps
fp16's small exponent range from flushing small B / du; a plain split leaves dA with 2e-2
relative error at B ~ 1e-6); bf16 has fp32's exponent range and splits with scale 1 (no
max-reduction per tile), and the dot becomes two (``a·hi + a·lo``) against the other operand, which
is exact in DT (x, x̂ = m ⊙ x with 1/(1-p) applied in fp32 after the dot, dY): F1's u and the
small-M kernel's x̂Aᵀ (split A), B1's du (split B) and dB (split u), B2's dA (split du). The y
epilogue ``u Bᵀ`` and the dX epilogue ``du A`` have two fp32 operands: both are split and three
dots (hi·hi + hi·lo + lo·hi) are used. Cost: only the rank-r dots double (triple in the
epilogues): about 2r/K more tensor-core work in F2 and 3r/N in B2 than their main GEMMs
(0.8% / 1.2% at r = 16, K = N = 4096); F1 and B1 stay bound by reading x / dY. With LoRA params
already in DT nothing is split (the reference computes that branch in DT too).

Measured (Triton interpreter, max |error| vs fp64; "torch" = lorafast.reference at the tensors'
own dtypes, i.e. PEFT's fp32 LoRA branch; M=70 K=72 N=40 r=8 p=0.1, fp32 LoRA params, the
two-kernel path)::

                 u        y        dX       dA       dB
    fp16 before  1.5e-3   5.4e-3   6.8e-4   6.6e-3   2.8e-3
    fp16 after   1.3e-6   3.7e-3   4.7e-4   4.4e-6   2.3e-6
    fp16 torch   1.6e-6   3.7e-3   4.7e-4   6.4e-6   3.9e-6
    bf16 before  1.2e-2   3.2e-2   6.9e-3   5.1e-2   2.2e-2
    bf16 after   1.3e-5   3.1e-2   3.2e-3   6.6e-5   3.3e-5
    bf16 torch   1.3e-6   3.5e-2   3.2e-3   6.8e-6   2.5e-6

fp16 hi + lo carry 22 significant bits: u, dA, dB match the fp32 reference. bf16 hi + lo carry
16: about 10x the fp32 error, ~1000x below the single cast's (the rows above were measured with
the max-scale in bf16 too; without it the max errors of u, dA, dB are 10-25% larger, mean over
six seeds 1.46e-5 / 6.6e-5 / 2.8e-5 -> 1.84e-5 / 7.4e-5 / 3.0e-5: the scale made each column's
largest element exact, which no longer pays for a cross-warp reduction per loop iteration). The epilogues: a single dot on the DT
casts of u and B (du and A) left y up to 1.5x (fp16) and dX up to 2.2x (bf16) the reference's
error (y 5.4e-3 vs 3.7e-3, dX 6.9e-3 vs 3.2e-3); the three-dot split brings both to the
reference's error, so the epilogues split too.

Rank r is padded to ``R_PAD = max(16, next_pow2(r))`` with masked loads (the GPU needs dot
dims >= 16) and the epilogues loop over it in ``BLOCK_R`` chunks. Row/column offsets are int64.

By default dB and dA use ``atomic_add`` (relaxed): the targets stay in L2, but the fp32
summation order, hence the last bits of dA/dB, can vary from run to run. Under
``torch.use_deterministic_algorithms(True)`` (or ``LORAFAST_REDUCTION=ordered``) the ordered
kernel sums them instead: the same bits every run (:func:`choose_reduction`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    ARCH_FAMILIES,
    MAX_RANK,
    MIN_DOT,
    SMALL_M_MAX,
    BoundLaunch,
    TunedLauncher,
    arch_family,
    autotune_enabled,
    autotune_timer,
    cdiv,
    check_2d,
    check_float,
    check_same_device,
    check_scalars,
    device_arch,
    dot_fp32_both,
    dot_fp32_lhs,
    dot_fp32_rhs,
    dot_precision,
    drop_threshold,
    grouped_pid,
    interpreting,
    keep_mask,
    keeps_buffers,
    launch_device,
    m_bucket,
    needs_split,
    next_pow2,
    on_first_argument_device,
    padded_rank,
    philox_seed,
    resolved_dropout_p,
    seed_arguments,
    smem_limit,
    stride_safe,
    stride_unsafe,
)
from .main_gemm import MAIN_GEMM_CHOOSER, MAIN_GEMMS

# ============================================================================ autotune configs
#
# Each kernel's configs come per architecture family (``_common.arch_family``: "hopper" for sm_90
# and sm_100, "ampere" for sm_80-89 and sm_120), the first of a family being its default. The
# autotuner holds their union; the kernel's early prune (``Tuning.prune``) keeps the launching
# device's family, drops tiles larger than the problem and configs whose estimated shared memory
# exceeds the device's, and with LORAFAST_AUTOTUNE=0 keeps only the first survivor.


def _cfg(num_warps: int = 4, num_stages: int = 3, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def _element_bytes(args: dict, name: str) -> int:
    """Element size of the tensor argument ``name`` of a launch (4 if absent)."""
    return args[name].element_size() if name in args else 4


@dataclass(frozen=True)
class Tuning:
    """How one kernel is autotuned and pruned.

    ``configs``: candidates per family (see above). ``dims`` maps a block name to the kernel
    argument it tiles (e.g. ``{"BLOCK_M": "M_BUCKET"}``): a block is kept if it is
    <= max(16, next_pow2(dim)). ``smem(config, args)``: the bytes of the config's pipelined
    tiles for the launch ``args``; a config is kept if that is <= ``headroom`` x the device's
    opt-in shared memory per block (``_common.smem_limit``). The estimates track what
    bench/compile_check.py measures on sm_90 within ~5% (F1, B1, the GEMMs in 16-bit; the fp32
    GEMMs allocate a third less than estimated), hence ``headroom`` 0.9; the small-M estimate
    leaves out the staged hi/lo copies of A, hence its 0.7. ``output_tile`` names the two blocks
    of a GEMM's fp32 accumulator: above rank 64 (``R_PAD`` > 64) configs whose accumulator holds
    more than 64 elements per thread are dropped when any other survives (with the rank-r
    epilogue beside it they spilled 2.4-2.6 KB per thread: the 256-wide tiles, and 128x128 with 4
    warps). If no candidate fits, ``fallback``, else the candidate with the smallest estimate.
    """

    configs: dict[str, list[triton.Config]]
    dims: dict[str, str]
    smem: Callable[[triton.Config, dict], int]
    headroom: float = 0.9
    output_tile: tuple[str, str] | None = None
    fallback: triton.Config | None = None

    def all_configs(self) -> list[triton.Config]:
        """Every family's configs once (the autotuner's list)."""
        union: dict[int, triton.Config] = {}
        for configs in self.configs.values():
            union.update((id(c), c) for c in configs)
        return list(union.values())

    def prune(self, configs, named_args: dict, **kwargs) -> list[triton.Config]:
        """The early prune (``configs``, the autotuner's union, is not needed: see ``self.configs``)."""
        args = {**named_args, **kwargs}
        device = next(v for v in named_args.values() if isinstance(v, torch.Tensor)).device
        candidates = self.configs[arch_family(device_arch(device))]
        limits = {blk: max(16, next_pow2(int(args[arg]))) for blk, arg in self.dims.items() if arg in args}
        kept = [c for c in candidates if all(c.kwargs.get(b, 0) <= lim for b, lim in limits.items())]
        if not kept:
            kept = [min(candidates, key=lambda c: sum(c.kwargs.get(b, 0) for b in limits))]
        if self.output_tile is not None and int(args.get("R_PAD", 16)) > 64:
            rows, cols = self.output_tile
            kept = [c for c in kept if c.kwargs[rows] * c.kwargs[cols] <= 64 * 32 * c.num_warps] or kept
        budget = self.headroom * smem_limit(device)
        fitting = [c for c in kept if self.smem(c, args) <= budget]
        if fitting:
            return fitting
        return [self.fallback] if self.fallback is not None else [min(kept, key=lambda c: self.smem(c, args))]

    def prune_configs_by(self) -> dict:
        """``prune_configs_by`` for ``triton.autotune``: :meth:`prune`, and with
        ``LORAFAST_AUTOTUNE=0`` only the first config it keeps (the default for that launch), so
        GPU test runs skip autotuning's compiles and benchmarks.

        Why not a one-config list instead: with a single config the autotuner never calls
        ``early_config_prune`` (triton 3.6-3.9), so a default that does not fit the launch ran
        anyway. That is the likely cause of the one failure of the first H200 run (its message
        was lost; it was the only fp32 small-M case at BLOCK_M 64): the small-M kernel's default
        64x128 tiles need 248 KiB of shared memory there (sm_90 allows 227;
        bench/compile_check.py), where the prune keeps a 32x32 config of 22 KiB.
        """

        def early_config_prune(configs, named_args, **kwargs):
            kept = self.prune(configs, named_args, **kwargs)
            return kept if autotune_enabled() else kept[:1]

        return {"early_config_prune": early_config_prune}


def _per_family(make, shapes: dict[str, list[tuple]]) -> dict[str, list[triton.Config]]:
    """``{family: [make(*shape) ...]}``; a shape two families share is one Config object. Under the
    interpreter every family gets the single ``make(interpreter=True)`` config."""
    if interpreting():
        return dict.fromkeys(shapes, [make(interpreter=True)])
    made: dict[tuple, triton.Config] = {}
    return {
        family: [made.setdefault(shape, make(*shape)) for shape in family_shapes]
        for family, family_shapes in shapes.items()
    }


#: Main-GEMM tiles (BM, BN, BK, warps, stages), the first of each family its default. Hopper: the
#: matmul tutorial's Hopper-sized tiles (warpgroup MMA wants 64-row slices per warpgroup and BK 64).
#: Ampere: the tutorial's list for mma.sync (BK 32, deeper pipelines) with 64x128x32 first: B2's
#: heavier epilogue spills with every 128x128 tile there (sm_80: 1.3 KB at 4 warps, 360 B at 8),
#: 64x128 compiles without (sm_80 / sm_86, bench/compile_check.py --arch).
_GEMM_TILES = {
    "hopper": [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
    ],
    "ampere": [
        (64, 128, 32, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 256, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (128, 32, 32, 4, 4),
        (64, 32, 32, 2, 5),
        (32, 64, 32, 2, 5),
    ],
}


def _gemm_tuning(out_cols: str) -> Tuning:
    """F2 (``out_cols`` "BLOCK_N": output [BM, BN], reduction BLOCK_K) or B2 ("BLOCK_K": output
    [BM, BK], reduction BLOCK_N). Estimate: ``stages · (BM + out_cols) · reduction · sizeof(x)``
    with the GEMM on (the two pipelined operand tiles), 0 without (the cuBLAS path's seed)."""
    red = "BLOCK_K" if out_cols == "BLOCK_N" else "BLOCK_N"

    def make(bm=32, bn=32, bk=32, warps=4, stages=1, interpreter=False):
        return _cfg(warps, stages, BLOCK_M=bm, **{out_cols: bn, red: bk}, GROUP_M=4 if interpreter else 8)

    def smem(c, args):
        if not args.get("GEMM", True):
            return 0
        return c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs[out_cols]) * c.kwargs[red] * _element_bytes(args, "w_ptr")

    dims = {"BLOCK_M": "M_BUCKET", "BLOCK_N": "N", "BLOCK_K": "K"}
    return Tuning(_per_family(make, _GEMM_TILES), dims, smem, output_tile=("BLOCK_M", out_cols))


def _two_block_make(block_names: tuple[str, str]):
    """Config maker for a kernel tiled by two blocks: ``make(block0, block1, warps, stages)``;
    under the interpreter one 32x32 single-stage config."""

    def make(b0=32, b1=32, warps=4, stages=1, interpreter=False):
        return _cfg(warps, stages, **dict(zip(block_names, (b0, b1), strict=True)))

    return make


def _same_for_all_families(shapes: list[tuple]) -> dict[str, list[tuple]]:
    return dict.fromkeys(ARCH_FAMILIES, shapes)


def _streaming_tuning(blocks: tuple[str, str], streamed: str, factor: str, dims: dict, shapes: list) -> Tuning:
    """F1 / B1: skinny GEMMs bound by reading x / dY. Each loop step loads a ``blocks`` tile of
    the ``streamed`` input and a [blocks[1], BLOCK_R] tile of the LoRA ``factor`` (A / B); the
    estimate is ``stages · blocks[1] · (blocks[0] · sizeof(streamed) + BLOCK_R · sizeof(factor))``.
    The same candidates for every family; the fallback is for R_PAD >= 64 on 99 KiB parts (sm_86/89)."""
    rows, cols = blocks

    def smem(c, args):
        row_bytes = c.kwargs[rows] * _element_bytes(args, streamed) + args["BLOCK_R"] * _element_bytes(args, factor)
        return c.num_stages * c.kwargs[cols] * row_bytes

    fallback = _cfg(num_warps=4, num_stages=2, **{rows: 32, cols: 64})
    return Tuning(_per_family(_two_block_make(blocks), _same_for_all_families(shapes)), dims, smem, fallback=fallback)


#: F1 (u = s x̂ Aᵀ): x [BM, BK] and Aᵀ [BK, BLOCK_R] tiles. F1 and B1 run one program per BLOCK_M
#: rows (times R_PAD / BLOCK_R): at M = 1024 (a 1×1024-token step) BLOCK_M 64 is 16 programs on an
#: H200's 132 SMs, so the candidates go down to BLOCK_M 16 (64 programs) for the autotuner to weigh
#: against the Aᵀ / B tile every program re-reads (unmeasured; a split over K / N would go further).
#: The 16-row configs compile without spills on sm_90 and sm_86 in every dtype at 4 warps (2 warps:
#: bf16 B1 spills 56 B on sm_90; 16x256 tiles spill 128-160 B), bench/compile_check.py.
_DOWN_TUNING = _streaming_tuning(
    ("BLOCK_M", "BLOCK_K"),
    "x_ptr",
    "a_ptr",
    {"BLOCK_M": "M_BUCKET", "BLOCK_K": "K"},
    [(64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (32, 128, 4, 4), (16, 128, 4, 4)],
)
#: B1 (du, dB from one pass over dY): dY [BM, BN] and B [BN, BLOCK_R] tiles.
_DY_TUNING = _streaming_tuning(
    ("BLOCK_M", "BLOCK_N"),
    "dy_ptr",
    "b_ptr",
    {"BLOCK_M": "M_BUCKET", "BLOCK_N": "N"},
    [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (32, 128, 4, 4), (16, 128, 4, 4)],
)
#: The ordered LoRA gradients (dB, dA without atomics): a [BLOCK_M, BLOCK_C] panel tile of dY or
#: x and the [BLOCK_M, BLOCK_R] rows of u or du per loop step; BLOCK_C 32-64 keeps N/BC + K/BC
#: programs (256 at K = N = 4096, BLOCK_C 32) at one or two per SM on 132 SMs.
_ORDERED_GRADS_TUNING = _streaming_tuning(
    ("BLOCK_C", "BLOCK_M"),
    "dy_ptr",
    "u_ptr",
    {"BLOCK_M": "M_BUCKET", "BLOCK_C": "K"},
    [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4)],
)
_FORWARD_TUNING = _gemm_tuning("BLOCK_N")
_BACKWARD_TUNING = _gemm_tuning("BLOCK_K")
#: Small-M fused forward: bound by reading W; small BLOCK_N gives more programs. The default
#: BLOCK_N 32 gives 128 programs at N = 4096 (132 SMs on an H100/H200) and compiles without spills
#: at M = 1, 16, 64 in bf16 / fp16 / fp32 (sm_90, bench/compile_check.py); the previous default,
#: 64x128, spilled 32 B in its main loop in bf16 at M = 1 (255 registers). Estimate: the pipelined
#: x, W and Aᵀ tiles, ``stages · ((BM·BK + BK·BN)·sizeof(x) + BK·R_PAD·sizeof(A))`` with 0.7 of
#: the shared memory (sm_90: 159 KiB): with 2 bytes for everything a bound let through an fp32
#: config that needs 249 KiB and, with fp32 A (split dots, whose hi/lo parts are staged too), an
#: R_PAD 256 one that needs 231 KiB. At large R_PAD nothing fits: a narrow, shallow pipeline does.
#:
#: SPLIT_K > 1 candidates (BN, BK, warps, stages, split): every program recomputes x̂Aᵀ over its
#: K range, so all programs together read A (fp32, r·K·4 bytes) once per BLOCK_N columns: at
#: BLOCK_N 32 as many bytes as W itself (L2 traffic; at r = 16, N = 4096: 32 MiB beside W's 32
#: MiB). Wider tiles split over K keep the program count and read A a quarter as often
#: (BLOCK_N 128) or half (64). Unmeasured: the autotuner weighs them against the split-free ones.
#: sm_90, bf16 + fp32 LoRA, r = 16, M = 1 / 16 / 64: 128x64 split 4 and 64x64 split 4 compile
#: without spills (<= 254 registers), 64x128 split 2 spills 32-48 B with dropout as its unsplit
#: sibling does (24-32 B); 128x128 tiles spilled 48-104 B and 256x64 with 8 warps up to 3.9 KB.
SMALL_M_MAX_SPLIT = 4
_SMALL_M_TILES = [
    (32, 128, 4, 4, 1),
    (64, 128, 4, 4, 1),
    (64, 64, 4, 4, 1),
    (128, 64, 4, 3, 1),
    (32, 256, 4, 3, 1),
    (16, 256, 4, 3, 1),
    (64, 128, 4, 4, 2),
    (128, 64, 4, 4, 4),
    (64, 64, 4, 4, 4),
]
assert max(tile[4] for tile in _SMALL_M_TILES) <= SMALL_M_MAX_SPLIT


def _small_m_make(block_n=32, block_k=32, warps=4, stages=1, split=1, interpreter=False):
    """``make(BLOCK_N, BLOCK_K, warps, stages, SPLIT_K)``; under the interpreter 32x32, no split
    (tests force the split configs: tests/kernel_harness.py)."""
    return _cfg(warps, stages, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split)


_SMALL_M_TUNING = Tuning(
    _per_family(_small_m_make, _same_for_all_families(_SMALL_M_TILES)),
    {"BLOCK_N": "N", "BLOCK_K": "K"},
    lambda c, args: (
        max(c.num_stages, 1)
        * c.kwargs["BLOCK_K"]
        * (
            (args["BLOCK_M"] + c.kwargs["BLOCK_N"]) * _element_bytes(args, "x_ptr")
            + args["R_PAD"] * _element_bytes(args, "a_ptr")
        )
    ),
    headroom=0.7,
    fallback=_cfg(num_warps=4, num_stages=2, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
)


# ============================================================================ kernels


@triton.autotune(
    configs=_DOWN_TUNING.all_configs(),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT"],
    prune_configs_by=_DOWN_TUNING.prune_configs_by(),
    do_bench=autotune_timer,
    cache_results=True,
)
@triton.jit(do_not_specialize=["seed", "seed_ptr", "threshold"])
def _lora_down_kernel(
    x_ptr,
    a_ptr,
    u_ptr,  # x [M, K], A [r, K], u [M, r] fp32
    M,
    K,
    R,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_um,
    stride_ur,
    scale,  # s / (1 - p)
    seed,
    seed_ptr,  # int64 [1]: the Philox seed is seed ^ *seed_ptr ^ SEED_FLIP (_common.seed_arguments)
    threshold,  # drop_threshold(p)
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """F1: ``u[m, j] = s/(1-p) · Σ_k m[m,k]·x[m,k]·A[j,k]``; grid (cdiv(M, BLOCK_M), R_PAD / BLOCK_R)."""
    if HAS_DROPOUT:  # the seed's 8 bytes are read only when a mask is drawn
        seed = philox_seed(seed, seed_ptr)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int64
    am = rm % M
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + am[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # Aᵀ tile [BLOCK_K, BLOCK_R]
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(seed, rm, k * BLOCK_K, threshold, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_fp32_rhs(x, a, acc, DOT_PREC, SPLIT_LORA)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc = acc * scale
    u_ptrs = u_ptr + rm[:, None] * stride_um + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, acc, mask=(rm[:, None] < M) & r_ok[None, :])


@triton.autotune(
    configs=_FORWARD_TUNING.all_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "GEMM"],
    prune_configs_by=_FORWARD_TUNING.prune_configs_by(),
    do_bench=autotune_timer,
    cache_results=True,
)
@triton.jit
def _lora_fwd_main_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    b_ptr,
    y_ptr,  # x [M,K], W [N,K], bias [N], u [M,r] fp32, B [N,r], y [M,N]
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    GEMM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """F2: ``y = x Wᵀ + u Bᵀ + bias`` with one write of y; grid (cdiv(M,BM)·cdiv(N,BN),), swizzled.

    Without GEMM it writes the cuBLAS path's seed ``y = u Bᵀ + bias``, which cuBLAS then
    accumulates ``x Wᵀ`` onto (``addmm_`` with beta = 1): y is only written here in both modes."""
    DT = x_ptr.dtype.element_ty
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    am = rm % M  # wrapped rows/cols: in-bounds loads without masks, masked at the store
    an = rn % N
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    # the epilogue first: acc starts as u Bᵀ (+ bias), over r in BLOCK_R chunks (padded rank
    # columns load as 0), and the GEMM accumulates onto it: no u / B chunk or second tile is
    # live in the main loop
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R_PAD, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        u = tl.load(u_ptr + am[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + an[None, :] * stride_bn, mask=r_ok[:, None], other=0.0)
        acc = dot_fp32_both(u, b, acc, DT, DOT_PREC, SPLIT_LORA)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + an)
        acc += bias.to(tl.float32)[None, :]
    if GEMM:
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + am[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + an[None, :] * stride_wn  # Wᵀ tile [BLOCK_K, BLOCK_N]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(
    configs=_SMALL_M_TUNING.all_configs(),
    key=["BLOCK_M", "N", "K", "R_PAD", "HAS_BIAS", "HAS_DROPOUT"],
    prune_configs_by=_SMALL_M_TUNING.prune_configs_by(),
    do_bench=autotune_timer,
    cache_results=True,
)
@triton.jit(do_not_specialize=["seed", "seed_ptr", "threshold"])
def _lora_fwd_small_m_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    u_ptr,  # x [M,K], W [N,K], bias [N], A [r,K], B [N,r], y [M,N], u [M,r]
    part_ptr,  # SPLIT_K > 1: fp32 partials of y [SPLIT_K,M,N] then of u [SPLIT_K,M,r], contiguous
    arrivals_ptr,  # SPLIT_K > 1: int32 [>= cdiv(M,BLOCK_M)·cdiv(N,BLOCK_N)], zero
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_um,
    stride_ur,
    scale,  # s / (1 - p)
    seed,
    seed_ptr,  # int64 [1]: the Philox seed is seed ^ *seed_ptr ^ SEED_FLIP (_common.seed_arguments)
    threshold,  # drop_threshold(p)
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Small-M forward, one kernel: in one K loop ``acc += x Wᵀ`` and ``xa += (m ⊙ x) Aᵀ``, then
    ``u = s/(1-p)·xa``, ``y = acc + u Bᵀ + bias``. Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K).

    Each program recomputes xa (A is [r, K], L2-resident) so nothing intermediate leaves the
    kernel; programs with pid_n == 0 also store u, which backward needs.

    SPLIT_K > 1: program (n, m, s) covers the s-th of SPLIT_K runs of K tiles. Its partial
    ``x_s W_sᵀ + (s/(1-p)·x̂_s A_sᵀ) Bᵀ`` (y is linear in each K run's terms) goes to the y
    partials' slice s and, for n = 0, its ``u_s`` to the u partials' slice s; then it counts itself in on its
    tile's arrival word (acq_rel atomic, after a barrier: every thread's partial is stored).
    The last of the SPLIT_K to arrive sums the tile's partials in split order (so the result
    does not depend on arrival order), adds the bias, writes y (and u) and resets the word to
    0 for the next launch.
    """
    if HAS_DROPOUT:  # the seed's 8 bytes are read only when a mask is drawn
        seed = philox_seed(seed, seed_ptr)
    DT = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    split_at = pid_s.to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    am = rm % M
    an = rn % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    k_tiles = tl.cdiv(K, BLOCK_K)
    run = tl.cdiv(k_tiles, SPLIT_K)  # K tiles per split
    k_first = pid_s * run
    k_end = tl.minimum(k_first + run, k_tiles)
    k0 = k_first.to(tl.int64) * BLOCK_K
    x_ptrs = x_ptr + am[:, None] * stride_xm + (k0 + offs_k[None, :]) * stride_xk
    w_ptrs = w_ptr + (k0 + offs_k[:, None]) * stride_wk + an[None, :] * stride_wn  # Wᵀ tile [BLOCK_K, BLOCK_N]
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k0 + offs_k[:, None]) * stride_ak  # Aᵀ tile [BLOCK_K, R_PAD]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(k_first, k_end):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = keep_mask(seed, rm, k * BLOCK_K, threshold, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        xa = dot_fp32_rhs(x, a, xa, DOT_PREC, SPLIT_LORA)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    u = xa * scale
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + an[None, :] * stride_bn, mask=r_ok[:, None], other=0.0)
    acc = dot_fp32_both(u, b, acc, DT, DOT_PREC, SPLIT_LORA)
    rows_ok = rm[:, None] < M
    u_rows = tl.where(pid_n == 0, M, 0)  # only the first column of programs writes u
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    y_ok = rows_ok & (rn[None, :] < N)
    u_ptrs = u_ptr + rm[:, None] * stride_um + offs_r[None, :] * stride_ur
    if SPLIT_K == 1:
        tl.store(u_ptrs, u, mask=(rm[:, None] < u_rows) & r_ok[None, :])
        if HAS_BIAS:
            acc += tl.load(bias_ptr + an).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:
        mn = tl.cast(M, tl.int64) * N  # one slice of the y partials
        u_part_ptr = part_ptr + SPLIT_K * mn
        tile_at = rm[:, None] * N + rn[None, :]
        u_at = rm[:, None] * R + offs_r[None, :]
        u_ok = (rm[:, None] < u_rows) & r_ok[None, :]
        tl.store(part_ptr + split_at * mn + tile_at, acc, mask=y_ok)
        tl.store(u_part_ptr + split_at * M * R + u_at, u, mask=u_ok)
        tl.debug_barrier()  # every thread's partial is stored before this program counts itself in
        arrival_ptr = arrivals_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(arrival_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last of the tile's splits: sum them in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            u_total = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for split in range(SPLIT_K):
                total += tl.load(part_ptr + split * mn + tile_at, mask=y_ok, other=0.0, cache_modifier=".cg")
                u_total += tl.load(u_part_ptr + split * M * R + u_at, mask=u_ok, other=0.0, cache_modifier=".cg")
            tl.store(u_ptrs, u_total, mask=u_ok)
            if HAS_BIAS:
                total += tl.load(bias_ptr + an).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_ok)
            tl.atomic_xchg(arrival_ptr, 0)


@triton.autotune(
    configs=_DY_TUNING.all_configs(),
    key=["M_BUCKET", "N", "R_PAD", "COMPUTE_DB"],
    prune_configs_by=_DY_TUNING.prune_configs_by(),
    do_bench=autotune_timer,
    cache_results=True,
    reset_to_zero=["db_ptr"],
)
@triton.jit
def _lora_dy_kernel(
    dy_ptr,
    b_ptr,
    u_ptr,
    du_ptr,
    db_ptr,
    da_ptr,  # dY [M,N], B [N,r], u [M,r], du [M,r] fp32, dB [N,r] fp32 (zeroed), dA [r,K] fp32 (cleared here)
    M,
    N,
    R,
    M_BUCKET,
    da_numel,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_um,
    stride_ur,
    stride_dum,
    stride_dur,
    stride_dbn,
    stride_dbr,
    scaling,
    COMPUTE_DB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """B1: one pass over dY. ``du[m, j] = s Σ_n dY[m,n] B[n,j]`` reduced over N in registers;
    ``dB[n, j] += Σ_{m in block} dY[m,n] u[m,j]`` per M block by fp32 atomics.
    Grid (cdiv(M, BLOCK_M), R_PAD / BLOCK_R).

    With COMPUTE_DB it also clears dA (``da_numel`` contiguous fp32), which B2 accumulates with
    atomics after this kernel on the same stream: that saves the backward a memset launch. Each
    program clears its contiguous share, ``ZERO_BLOCK`` elements a store.

    Each program walks the column blocks starting at its own (``pid_m`` mod their number) and
    wrapping around: programs run in lockstep, so from block 0 every program of the wave (up to
    256) would add into the same [BLOCK_N, BLOCK_R] slice of dB at once, and same-address atomics
    serialize in L2; rotated, the wave's atomics spread over all of dB (N / BLOCK_N slices). Not
    yet measured on a GPU: on the first H200 run the whole backward was 0.4 ms over the base's
    dY W at K=N=4096, M=8192, far more than its extra bytes explain.
    """
    DT = dy_ptr.dtype.element_ty
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_n = tl.arange(0, BLOCK_N)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    first_block = pid_m % num_n_blocks
    if COMPUTE_DB:
        share = tl.cdiv(da_numel, tl.num_programs(0) * tl.num_programs(1))
        share_start = (pid_m * tl.num_programs(1) + pid_r) * share  # int64
        for offset in range(0, share, ZERO_BLOCK):
            idx = share_start + offset + tl.arange(0, ZERO_BLOCK)
            zeros = tl.zeros((ZERO_BLOCK,), dtype=tl.float32)
            tl.store(da_ptr + idx, zeros, mask=(idx < share_start + share) & (idx < da_numel))
        u = tl.load(
            u_ptr + rm[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        if not SPLIT_LORA:
            u = u.to(DT)  # the one dot operand, cast once
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for step in range(0, num_n_blocks):
        rn = ((first_block + step) % num_n_blocks) * BLOCK_N + offs_n  # int64
        n_ok = rn < N
        dy = tl.load(
            dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :],  # rows masked too: dB sums over M
            other=0.0,
        )
        b = tl.load(
            b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0
        )
        du = dot_fp32_rhs(dy, b, du, DOT_PREC, SPLIT_LORA)
        if COMPUTE_DB:
            db = dot_fp32_rhs(tl.trans(dy), u, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_PREC, SPLIT_LORA)
            db_ptrs = db_ptr + rn[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
            tl.atomic_add(db_ptrs, db, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    du = du * scaling
    tl.store(du_ptr + rm[:, None] * stride_dum + offs_r[None, :] * stride_dur, du, mask=m_ok[:, None] & r_ok[None, :])


@triton.autotune(
    configs=_BACKWARD_TUNING.all_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "GEMM", "COMPUTE_DX", "COMPUTE_DA", "HAS_DROPOUT"],
    prune_configs_by=_BACKWARD_TUNING.prune_configs_by(),
    do_bench=autotune_timer,
    cache_results=True,
    reset_to_zero=["da_ptr"],
)
@triton.jit(do_not_specialize=["seed", "seed_ptr", "threshold"])
def _lora_dx_kernel(
    dy_ptr,
    w_ptr,
    du_ptr,
    a_ptr,
    x_ptr,
    dx_ptr,
    da_ptr,
    # dY [M,N], W [N,K], du [M,r] fp32, A [r,K], x [M,K], dX [M,K], dA [r,K] fp32 (zeroed)
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_dum,
    stride_dur,
    stride_ar,
    stride_ak,
    stride_xm,
    stride_xk,
    stride_dxm,
    stride_dxk,
    stride_dar,
    stride_dak,
    inv_keep,  # 1 / keep probability (LoraScalars.inv_keep)
    seed,
    seed_ptr,  # int64 [1]: the Philox seed is seed ^ *seed_ptr ^ SEED_FLIP (_common.seed_arguments)
    threshold,  # drop_threshold(p)
    GEMM: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """B2 for the output tile (rows rm, cols rk) of dX [M, K]; grid (cdiv(M,BM)·cdiv(K,BK),), swizzled.

    ``dX = [dY W (GEMM)] + m ⊙ (du A)/(1-p)`` (without GEMM: the seed cuBLAS accumulates ``dY W``
    onto, ``addmm_`` with beta = 1) and,
    with COMPUTE_DA, ``dA[:, rk] += duᵀ (m ⊙ x[rm, rk]) / (1-p)`` (fp32 atomics over M blocks).
    The mask is drawn once per tile and shared by both.

    Order (register pressure): mask, then dA (x tile live only there), then the LoRA term into
    acc, then the ``dY W`` loop accumulating onto it, so the main loop carries one fp32 tile and
    nothing else. sm_90 compile (bench/compile_check.py, r = 16, p = 0.1, 128x128x64 w8): bf16 /
    fp16 x with fp32 LoRA 255 regs + 384 / 392 B spilled before, 247 / 244 regs and no spill
    after; fp32 x 1216 -> 904 B; 256-wide tiles and 4-warp 128-row tiles at R_PAD 256 still spill
    (~2.4 KB); so does dropout without dA (needs_grad_lora=False), where the mask is computed
    while acc is live. Now (the cuBLAS seed mode instead of an in-place epilogue, bf16 splits
    without the max-scale): fp16 254 regs, no spill; bf16 255 regs + 16 B, spilled and reloaded
    before and after the main loop, not in it (SASS: the STL / LDL sit outside the HGMMA loop).
    """
    if HAS_DROPOUT:  # the seed's 8 bytes are read only when a mask is drawn
        seed = philox_seed(seed, seed_ptr)
    DT = dy_ptr.dtype.element_ty
    pid_m, pid_k = grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    tile_ok = m_ok[:, None] & k_ok[None, :]
    if HAS_DROPOUT:
        # As 0/1 floats, not an i1 mask: the mask feeds the x tile (a dot operand, dA) and the dX
        # tile, and a layout conversion of a shared i1 mask goes through shared memory, which
        # rejects 1-bit elements on sm_90 ("shared-memory element type bit width must be a
        # multiple of 8", found by bench/compile_check.py; an int8 copy is folded back to i1).
        keep = tl.where(keep_mask(seed, rm, pid_k * BLOCK_K, threshold, BLOCK_K), 1.0, 0.0).to(DT)
    if COMPUTE_DA:
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=tile_ok, other=0.0)
        if HAS_DROPOUT:
            xt = (xt.to(tl.float32) * keep.to(tl.float32)).to(xt.dtype)  # exact: keep is 0 or 1
        for r0 in range(0, R_PAD, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            du = tl.load(
                du_ptr + rm[:, None] * stride_dum + offs_r[None, :] * stride_dur,
                mask=m_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            da = dot_fp32_lhs(tl.trans(du), xt, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), DOT_PREC, SPLIT_LORA)
            tl.atomic_add(
                da_ptr + offs_r[:, None] * stride_dar + rk[None, :] * stride_dak,
                da * inv_keep,  # [BLOCK_R, BLOCK_K]
                mask=r_ok[:, None] & k_ok[None, :],
                sem="relaxed",
            )
    if COMPUTE_DX:
        # seed the accumulator with the LoRA term, then run the GEMM on it: no second tile
        # accumulator, x tile, mask or du / A chunk is live in the main loop
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R_PAD, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            du = tl.load(
                du_ptr + rm[:, None] * stride_dum + offs_r[None, :] * stride_dur,
                mask=m_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + offs_r[:, None] * stride_ar + rk[None, :] * stride_ak,
                mask=r_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc = dot_fp32_both(du, a, acc, DT, DOT_PREC, SPLIT_LORA)
        if HAS_DROPOUT:
            acc = acc * (keep.to(tl.float32) * inv_keep)
        if GEMM:
            am = rm % M
            ak = rk % K
            offs_n = tl.arange(0, BLOCK_N)
            dy_ptrs = dy_ptr + am[:, None] * stride_dym + offs_n[None, :] * stride_dyn
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + ak[None, :] * stride_wk  # W tile [BLOCK_N, BLOCK_K]
            for n in range(0, tl.cdiv(N, BLOCK_N)):
                n_ok = offs_n < N - n * BLOCK_N
                dy = tl.load(dy_ptrs, mask=n_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
                acc = tl.dot(dy, w, acc, input_precision=DOT_PREC)
                dy_ptrs += BLOCK_N * stride_dyn
                w_ptrs += BLOCK_N * stride_wn
        tl.store(
            dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty), mask=tile_ok
        )


@triton.jit
def _column_panel_product(
    p_ptr,
    stride_pm,
    stride_pc,
    q_ptr,
    stride_qm,
    stride_qr,
    o_ptr,
    stride_oc,
    stride_or,
    # P [M, C] (dY or x), Q [M, R] fp32 (u or du), out [C, R] fp32 (dB, or dA through transposed strides)
    M,
    C,
    R,
    pid_c,
    pid_r,
    scale,
    seed,  # the Philox seed (philox_seed's)
    threshold,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[c, j] = scale · Σ_m (m ⊙ P)[m, c] Q[m, j]`` for the program's BLOCK_C columns c and
    BLOCK_R ranks j, m walked in order from 0 (MASKED: the dropout keep mask of P's (row, col))."""
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    c_ok = offs_c < C
    r_ok = offs_r < R
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_c[None, :] * stride_pc
    q_ptrs = q_ptr + offs_m[:, None] * stride_qm + offs_r[None, :] * stride_qr
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = offs_m < M - m0
        panel = tl.load(p_ptrs, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        if MASKED:
            keep = keep_mask(seed, m0 + offs_m, pid_c * BLOCK_C, threshold, BLOCK_C)
            panel = tl.where(keep, panel, tl.zeros_like(panel))
        rows = tl.load(q_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot_fp32_rhs(tl.trans(panel), rows, acc, DOT_PREC, SPLIT_LORA)
        p_ptrs += BLOCK_M * stride_pm
        q_ptrs += BLOCK_M * stride_qm
    tl.store(
        o_ptr + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_or,
        acc * scale,
        mask=c_ok[:, None] & r_ok[None, :],
    )


@triton.autotune(
    configs=_ORDERED_GRADS_TUNING.all_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT"],
    prune_configs_by=_ORDERED_GRADS_TUNING.prune_configs_by(),
    do_bench=autotune_timer,
    cache_results=True,
)
@triton.jit(do_not_specialize=["seed", "seed_ptr", "threshold"])
def _lora_ordered_grads_kernel(
    dy_ptr,
    u_ptr,
    db_ptr,
    x_ptr,
    du_ptr,
    da_ptr,
    # dY [M,N], u [M,r] fp32, dB [N,r] fp32, x [M,K], du [M,r] fp32, dA [r,K] fp32
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_dym,
    stride_dyn,
    stride_um,
    stride_ur,
    stride_dbn,
    stride_dbr,
    stride_xm,
    stride_xk,
    stride_dum,
    stride_dur,
    stride_dar,
    stride_dak,
    inv_keep,  # 1 / keep probability (LoraScalars.inv_keep)
    seed,
    seed_ptr,  # int64 [1]: the Philox seed is seed ^ *seed_ptr ^ SEED_FLIP (_common.seed_arguments)
    threshold,  # drop_threshold(p)
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT_LORA: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The "ordered" LoRA gradients, no atomics: ``dB = dYᵀ u`` and ``dA = duᵀ (m ⊙ x)/(1-p)``.
    Grid ``(cdiv(N, BC) + cdiv(K, BC), R_PAD / BLOCK_R)``: the first programs each
    own BLOCK_C rows of dB (BLOCK_C columns of dY), the rest BLOCK_C columns of dA (of x), and
    each sums over all M rows in one fixed order, so dA and dB are the same bits on every run
    (what ``torch.use_deterministic_algorithms`` asks for).

    Against the atomic reduction (B1's dB, B2's dA): dY is read a second time (B1 still reads it
    for du), x is read here instead of in B2 (whose GEMM then carries no x tile, mask or dA dot),
    and u / du are re-read once per column block (from L2: [M, r] fp32 is 512 KiB at M = 8192,
    r = 16); no [N, r] / [r, K] fp32 atomics (2·M/BLOCK_M·(N + K)·r of them).
    """
    if HAS_DROPOUT:  # the seed's 8 bytes are read only when a mask is drawn
        seed = philox_seed(seed, seed_ptr)
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    num_db_programs = tl.cdiv(N, BLOCK_C)
    if pid < num_db_programs:
        _column_panel_product(
            dy_ptr, stride_dym, stride_dyn, u_ptr, stride_um, stride_ur, db_ptr, stride_dbn, stride_dbr,
            M, N, R, pid, pid_r, 1.0, seed, threshold,
            False, DOT_PREC, SPLIT_LORA, BLOCK_R, BLOCK_M, BLOCK_C,
        )  # fmt: skip
    else:
        _column_panel_product(
            x_ptr, stride_xm, stride_xk, du_ptr, stride_dum, stride_dur, da_ptr, stride_dak, stride_dar,
            M, K, R, pid - num_db_programs, pid_r, inv_keep, seed, threshold,
            HAS_DROPOUT, DOT_PREC, SPLIT_LORA, BLOCK_R, BLOCK_M, BLOCK_C,
        )  # fmt: skip


@triton.jit(do_not_specialize=["seed", "seed_ptr", "threshold"])
def _keep_mask_kernel(
    out_ptr,  # [M, K] uint8 (viewed as bool)
    M,
    K,
    seed,
    seed_ptr,  # int64 [1]: the Philox seed is seed ^ *seed_ptr ^ SEED_FLIP (_common.seed_arguments)
    threshold,  # drop_threshold(p)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Materialize the keep mask the other kernels regenerate (tests / debugging only)."""
    seed = philox_seed(seed, seed_ptr)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_K
    rk = col_start + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rm, col_start, threshold, BLOCK_K)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.uint8), mask=(rm[:, None] < M) & (rk[None, :] < K))


# ============================================================================ launchers

# The autotuned kernels' launchers: the autotuner's per-call Python once per key (TunedLauncher).
_lora_down = TunedLauncher(_lora_down_kernel)
_lora_fwd_main = TunedLauncher(_lora_fwd_main_kernel)
_lora_fwd_small_m = TunedLauncher(_lora_fwd_small_m_kernel)
_lora_dy = TunedLauncher(_lora_dy_kernel)
_lora_dx = TunedLauncher(_lora_dx_kernel)
_lora_ordered_grads = TunedLauncher(_lora_ordered_grads_kernel)
_LAUNCHERS = {
    "F1 down": _lora_down,
    "F2 forward main": _lora_fwd_main,
    "small-M forward": _lora_fwd_small_m,
    "B1 dY": _lora_dy,
    "B2 dX": _lora_dx,
    "ordered grads": _lora_ordered_grads,
}


def autotune_choices() -> dict[str, list[dict]]:
    """Per kernel, the configs autotuning chose so far in this process (``TunedLauncher.choices``),
    and under "main GEMM" the paths measured per shape (``MainGemmChooser.choices``, with both
    times): what bench/kernel_bench.py reports, e.g. whether the small-M kernel's split-K configs win."""
    chosen = {name: launcher.choices() for name, launcher in _LAUNCHERS.items()}
    chosen["main GEMM"] = MAIN_GEMM_CHOOSER.choices()
    return chosen


@dataclass(frozen=True)
class LoraScalars:
    """The scalars of a LoRA call signature, grouped: scaling s, dropout p, and whether the LoRA
    dots split their fp32 operands (:func:`~lorafast.kernels._common.needs_split`). Not the
    Philox seed: it changes every call, so the launch plans take it per call."""

    scaling: float
    dropout_p: float
    split_lora: bool

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def threshold(self) -> int:
        return drop_threshold(self.dropout_p)

    @property
    def inv_keep(self) -> float:
        """``1 / keep probability`` of the kernels' masks, ``2**16 / (2**16 - threshold)``, so the
        dropped input is unbiased, ``E[m ⊙ x · inv_keep] = x``. Not ``1 / (1 - p)``: the masks
        resolve p to 2**-16 (:func:`resolved_dropout_p`), and near p = 1 that bias grew without
        bound (p = 0.99999 and 0.999999 draw the same masks, and were scaled by 1e5 and 1e6: 1.5x
        and 15x too large on average). At p = 0.1 the two differ by 7e-6, relative."""
        return 1.0 / (1.0 - resolved_dropout_p(self.dropout_p))


REDUCTIONS = ("atomic", "ordered")


def choose_reduction(reduction: str | None = None) -> str:
    """How the backward sums dA and dB over the M rows: "atomic" (B1 and B2 add per-block partial
    sums with fp32 atomics) or "ordered" (``_lora_ordered_grads_kernel``: each program owns a
    column block and sums the rows in one fixed order; the same bits on every run).

    Order: ``reduction`` if given, else env ``LORAFAST_REDUCTION``, else "ordered" when
    ``torch.use_deterministic_algorithms(True)`` is on and "atomic" otherwise (not yet measured
    against each other on a GPU: bench/kernel_bench.py times both). Asking for "atomic" while
    deterministic algorithms are on (and not ``warn_only``) raises, as PyTorch's own
    nondeterministic ops do.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    if reduction is None:
        forced = os.environ.get("LORAFAST_REDUCTION", "").strip().lower()
        reduction = forced if forced else ("ordered" if deterministic else "atomic")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "atomic" and deterministic and not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(
            "lorafast's 'atomic' LoRA-gradient reduction is not deterministic, but "
            "torch.use_deterministic_algorithms(True) is on: use reduction='ordered' "
            "(unset LORAFAST_REDUCTION) or turn deterministic algorithms off"
        )
    return reduction


def _check_lora(x, lora_A, lora_B, K: int, N: int) -> int:
    check_2d("lora_A", lora_A)
    check_2d("lora_B", lora_B)
    check_float("lora_A", lora_A)
    check_float("lora_B", lora_B)
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} must be [r, K] with K = {K} (x is {tuple(x.shape)})")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B {tuple(lora_B.shape)} must be [N, r] = [{N}, {r}] (lora_A is {tuple(lora_A.shape)})")
    if not (1 <= r <= MAX_RANK):
        raise ValueError(f"LoRA rank r = {r} must be in [1, {MAX_RANK}]")
    return r


def _check_forward_inputs(x, weight, bias, lora_A, lora_B) -> tuple[int, int, int, int]:
    check_2d("x", x)
    check_2d("weight", weight)
    check_float("x", x)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} must be [N, K] with K = {K} (x is {tuple(x.shape)})")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias {tuple(bias.shape)} must be [N] = [{N}] (weight is {tuple(weight.shape)})")
    r = _check_lora(x, lora_A, lora_B, K, N)
    check_same_device([("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)])
    return M, N, K, r


def _check_backward_inputs(grad_y, x, weight, lora_A, lora_B, u) -> None:
    check_2d("grad_y", grad_y)
    check_2d("x", x)
    check_2d("weight", weight)
    check_2d("u", u)
    check_float("x", x)
    check_float("u", u)
    if weight.dtype != x.dtype or grad_y.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}), weight ({weight.dtype}) and grad_y ({grad_y.dtype}) must share a dtype")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} must be [N, K] with K = {K} (x is {tuple(x.shape)})")
    if tuple(grad_y.shape) != (M, N):
        raise ValueError(
            f"grad_y {tuple(grad_y.shape)} must be [M, N] = [{M}, {N}] (x {tuple(x.shape)}, weight {tuple(weight.shape)})"
        )
    r = _check_lora(x, lora_A, lora_B, K, N)
    if tuple(u.shape) != (M, r):
        raise ValueError(f"u {tuple(u.shape)} must be [M, r] = [{M}, {r}]")
    check_same_device(
        [("grad_y", grad_y), ("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("u", u)]
    )


def _row_blocks_by_rank_blocks(M: int, r: int) -> tuple[int, int, Callable[[dict], tuple]]:
    """``(R_PAD, BLOCK_R, grid)`` of F1 and B1: programs over row blocks of M times rank blocks of
    at most 64 (the rank padded to R_PAD)."""
    r_pad = padded_rank(r)
    block_r = min(r_pad, 64)
    return r_pad, block_r, lambda META: (cdiv(M, META["BLOCK_M"]), r_pad // block_r)


def _bind_down(x, lora_A, sc: LoraScalars) -> BoundLaunch:
    """F1: u [M, r] fp32 <- s/(1-p) (m ⊙ x) Aᵀ. Per call: ``(x, lora_A, u, seed_word, seed_ptr)``."""
    M, K = x.shape
    r = lora_A.shape[0]
    r_pad, block_r, grid = _row_blocks_by_rank_blocks(M, r)
    args = [
        None,
        None,
        None,  # x [M, K], A [r, K], u [M, r] (contiguous)
        M,
        K,
        r,
        m_bucket(M),
        *x.stride(),
        *lora_A.stride(),
        r,
        1,
        sc.scaling * sc.inv_keep,
        None,
        None,  # seed_word, seed_ptr
        sc.threshold,
    ]
    meta = dict(
        HAS_DROPOUT=sc.has_dropout,
        DOT_PREC=dot_precision(x.dtype),
        SPLIT_LORA=sc.split_lora,
        R_PAD=r_pad,
        BLOCK_R=block_r,
    )
    return _lora_down.bind(grid, args, meta)


def _bind_fwd_main(x, weight, lora_B, sc: LoraScalars, *, has_bias: bool, gemm: bool) -> BoundLaunch:
    """F2: y [M, N] <- x Wᵀ + u Bᵀ + bias; with ``gemm=False``: y <- u Bᵀ + bias (the cuBLAS path's
    seed). Per call: ``(x, weight, bias or x, u, lora_B, y)``."""
    M, K = x.shape
    N, r = lora_B.shape
    r_pad = padded_rank(r)
    grid = lambda META: (cdiv(M, META["BLOCK_M"]) * cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    args = [
        None,
        None,
        None,
        None,
        None,
        None,  # x [M,K], W [N,K], bias [N] (x without one), u [M,r], B [N,r], y [M,N] (u, y contiguous)
        M,
        N,
        K,
        r,
        m_bucket(M),
        *x.stride(),
        *weight.stride(),
        r,
        1,
        *lora_B.stride(),
        N,
        1,
    ]
    meta = dict(
        HAS_BIAS=has_bias,
        GEMM=gemm,
        DOT_PREC=dot_precision(x.dtype),
        SPLIT_LORA=sc.split_lora,
        R_PAD=r_pad,
        BLOCK_R=min(r_pad, 32),
    )
    return _lora_fwd_main.bind(grid, args, meta)


_SPLIT_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (arrivals, partials)
_NO_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> 1-element stand-ins


def _split_scratch(device: torch.device, words: int, floats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(arrival words, partials)`` for a small-M launch that may run a split-K config: at least
    ``words`` zeroed int32 and ``floats`` fp32 (uninitialized).

    The kernel leaves every arrival word it used at 0 again and rewrites the partials it reads,
    so where :func:`~lorafast.kernels._common.keeps_buffers` allows (the default stream) one pair
    per device, grown when a launch needs more, serves every launch without a memset or an
    allocation (launches on one stream never overlap). Held: at most
    ``SMALL_M_MAX_SPLIT · 64 · (N + 256)`` floats (15 MiB at N = 14336). Elsewhere (CUDA-graph
    capture, torch.compile's graph trees, side streams) a fresh pair per launch, the words zeroed
    by a memset."""
    if not keeps_buffers(device):
        return (
            torch.zeros(words, dtype=torch.int32, device=device),
            torch.empty(floats, dtype=torch.float32, device=device),
        )
    found = _SPLIT_SCRATCH.get(device)
    if found is None or found[0].numel() < words or found[1].numel() < floats:
        found = _SPLIT_SCRATCH[device] = (
            torch.zeros(max(words, 1024), dtype=torch.int32, device=device),
            torch.empty(max(floats, 2**16), dtype=torch.float32, device=device),
        )
    return found


def _no_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins of the scratch's dtypes for a launch whose config does not split K, which never
    dereferences them (so one pair per device serves every stream and graph, even if its memory
    were handed to other tensors): no memset or allocation per launch."""
    found = _NO_SCRATCH.get(device)
    if found is None:
        found = _NO_SCRATCH[device] = (
            torch.empty(1, dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.float32, device=device),
        )
    return found


def _bind_fwd_small_m(x, weight, lora_A, lora_B, sc: LoraScalars, *, has_bias: bool) -> BoundLaunch:
    """Small-M fused forward: y [M, N] and u [M, r] in one kernel. Per call: ``(x, weight, bias or
    x, lora_A, lora_B, y, u, partials, arrivals, seed_word, seed_ptr)``; the split-K scratch
    (:func:`_split_scratch`) or its stand-ins (:func:`_no_scratch`): see ``_ForwardPlan.run``."""
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    block_m = max(16, next_pow2(M)) if M <= SMALL_M_MAX else SMALL_M_MAX
    grid = lambda META: (cdiv(N, META["BLOCK_N"]), cdiv(M, block_m), META["SPLIT_K"])  # noqa: E731
    args = [
        *[None] * 9,  # [M,K], [N,K], [N], [r,K], [N,r], [M,N], [M,r], [S·M·(N+r)], [tiles]; y, u contiguous
        M,
        N,
        K,
        r,
        *x.stride(),
        *weight.stride(),
        *lora_A.stride(),
        *lora_B.stride(),
        N,
        1,
        r,
        1,
        sc.scaling * sc.inv_keep,
        None,
        None,  # seed_word, seed_ptr
        sc.threshold,
    ]
    meta = dict(
        HAS_BIAS=has_bias,
        HAS_DROPOUT=sc.has_dropout,
        DOT_PREC=dot_precision(x.dtype),
        SPLIT_LORA=sc.split_lora,
        R_PAD=padded_rank(r),
        BLOCK_M=block_m,
    )
    return _lora_fwd_small_m.bind(grid, args, meta)


def _describe(t: torch.Tensor | None) -> tuple | None:
    """What a launch plan depends on of a tensor: shape, strides, dtype, device (not its data)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


class _PlanCache:
    """Launch plans by call signature, the least recently used dropped beyond ``limit`` (varying
    sequence lengths make a signature per M; each plan is a few small lists, and holds no
    tensor)."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._plans: dict[tuple, object] = {}

    def get(self, key: tuple | None, build: Callable[[], object]) -> object:
        if key is None:
            return build()
        plan = self._plans.pop(key, None)  # re-inserted below: the dict's order is the use order
        if plan is None:
            plan = build()
            if len(self._plans) >= self.limit:  # drop the least recently used (another thread may have)
                self._plans.pop(next(iter(self._plans), None), None)
        self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()


_FORWARD_PLANS = _PlanCache()
_BACKWARD_PLANS = _PlanCache()


class _ForwardPlan:
    """:func:`lora_forward` for one call signature (shapes, strides, dtypes and devices of the
    tensors, scaling, dropout p, path): the inputs checked and the launches bound once
    (:class:`~lorafast.kernels._common.BoundLaunch`); :meth:`run` allocates y and u and launches.
    The path (the small-M kernel, where M <= SMALL_M_MAX, or F1 and a main GEMM) is asked per call
    (it may be forced, measured later or not at all).

    The cuBLAS main GEMM: F2 without its GEMM writes the seed ``y = u Bᵀ + bias`` (its split dots
    keep the fp32 LoRA term accurate), then cuBLAS accumulates onto it, ``y += x Wᵀ`` (``addmm_``,
    beta = 1: it reads the seed in its epilogue, overlapped with its main loop, where a separate
    epilogue kernel after the GEMM would read y back and write it again). y is rounded twice, as
    in the reference, but the first rounding is of the small LoRA term. Limit (fp16): the seed is
    stored in fp16 before the frozen product joins it, so a LoRA term beyond fp16's range (65504)
    is inf even where ``x Wᵀ`` would cancel it (PEFT and the Triton path sum in fp32 and round
    once). B2's seed for the cuBLAS dX likewise."""

    def __init__(self, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, path: str | None) -> None:
        M, N, K, r = _check_forward_inputs(x, weight, bias, lora_A, lora_B)
        self.shape, self.path = (M, N, K, r), path
        self.device, self.dtype = x.device, x.dtype
        self.copy_x, self.copy_weight = stride_unsafe(x), stride_unsafe(weight)
        self.copy_bias = bias is not None and not bias.is_contiguous()  # the kernels read bias[n] at bias_ptr + n
        self.has_bias = bias is not None
        x, weight = stride_safe(x), stride_safe(weight)
        sc = LoraScalars(scaling, dropout_p, needs_split(x.dtype, lora_A, lora_B))
        self.chooser_key = MAIN_GEMM_CHOOSER.key("forward", M, N, K, x.device, x.dtype)
        paths = (path,) if path is not None else MAIN_GEMM_CHOOSER.paths(self.chooser_key)
        if "small_m" in paths:
            self.small_m = _bind_fwd_small_m(x, weight, lora_A, lora_B, sc, has_bias=self.has_bias)
            words = cdiv(M, self.small_m.meta["BLOCK_M"]) * cdiv(N, MIN_DOT)  # BLOCK_N >= MIN_DOT
            self.small_m_scratch = (words, SMALL_M_MAX_SPLIT * M * (N + r))  # _split_scratch's sizes
        gemms = [gemm for gemm in MAIN_GEMMS if gemm in paths]
        if gemms:
            self.down = _bind_down(x, lora_A, sc)
            self.main = {
                gemm: _bind_fwd_main(x, weight, lora_B, sc, has_bias=self.has_bias, gemm=gemm == "triton")
                for gemm in gemms
            }

    def run(self, x, weight, bias, lora_A, lora_B, seed) -> tuple[torch.Tensor, torch.Tensor]:
        M, N, K, r = self.shape
        y = torch.empty((M, N), dtype=self.dtype, device=self.device)
        u = torch.empty((M, r), dtype=torch.float32, device=self.device)
        if M == 0:
            return y, u
        seed_word, seed_ptr = seed_arguments(seed, self.device)
        if self.copy_x:
            x = x.contiguous()
        if self.copy_weight:
            weight = weight.contiguous()
        if self.copy_bias:
            bias = bias.contiguous()
        bias_or_x = bias if self.has_bias else x

        def launch(path: str) -> None:  # each path writes all of y and u: repeatable for timing
            if path == "small_m":
                config = self.small_m.config  # the split-K scratch only for a launch that may split
                if config is None or config["SPLIT_K"] > 1:
                    arrivals, partials = _split_scratch(self.device, *self.small_m_scratch)
                else:
                    arrivals, partials = _no_scratch(self.device)
                self.small_m(x, weight, bias_or_x, lora_A, lora_B, y, u, partials, arrivals, seed_word, seed_ptr)
                return
            self.down(x, lora_A, u, seed_word, seed_ptr)
            self.main[path](x, weight, bias_or_x, u, lora_B, y)  # F2, or F2's seed then cuBLAS
            if path == "cublas":
                y.addmm_(x, weight.t())

        launch(self.path or MAIN_GEMM_CHOOSER.choose(self.chooser_key, self.device, lambda: launch))
        return y, u


@on_first_argument_device
def lora_forward(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] (any strides)
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    seed: int | torch.Tensor,  # int, or a 1-element int64 tensor on x's device
    *,
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LoRA forward: returns ``(y [M, N] in x.dtype, u [M, r] fp32)``.

    ``u = s · (m ⊙ x / (1-p)) Aᵀ`` and ``y = x Wᵀ + bias + u Bᵀ`` with the mask drawn from
    ``(seed, row, col)``; see :func:`dropout_keep_mask`.

    ``path`` (keyword-only, for tests and benchmarks) forces "small_m" (one fused kernel),
    "triton" (F1 + F2) or "cublas" (F1, F2 writing the seed ``u Bᵀ + bias``, cuBLAS accumulating
    ``x Wᵀ`` onto it). Default: the path measured fastest for this shape among the two main
    GEMMs and, when M <= 64, the small-M kernel; unmeasured, "small_m" when M <= 64, else the
    main GEMM's default (:mod:`~lorafast.kernels.main_gemm`; every path rewrites all of y and u,
    so timing repeats them).
    Checks and launch arguments are worked out once per call signature (:class:`_ForwardPlan`).
    """
    check_scalars(scaling, dropout_p, seed, getattr(x, "device", None))
    if path not in ("small_m", *MAIN_GEMMS, None):
        raise ValueError(f"path must be 'small_m', 'triton' or 'cublas', got {path!r}")
    scaling, dropout_p = float(scaling), float(dropout_p)
    try:
        key = (_describe(x), _describe(weight), _describe(bias), _describe(lora_A), _describe(lora_B))
        key += (scaling, dropout_p, path)
    except AttributeError:  # not tensors: the plan's checks say which
        key = None
    plan = _FORWARD_PLANS.get(key, lambda: _ForwardPlan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, path))
    return plan.run(x, weight, bias, lora_A, lora_B, seed)


def _bind_dy(grad_y, lora_B, u, sc: LoraScalars, *, compute_db: bool, da_elements: int) -> BoundLaunch:
    """B1: du [M, r] <- s·dY B and (``compute_db``) dB [N, r] += dYᵀ u, zeroing dA's ``da_elements``
    first. Per call: ``(grad_y, lora_B, u, du, dB or scratch, dA or scratch)``."""
    M, N = grad_y.shape
    r = lora_B.shape[1]
    r_pad, block_r, grid = _row_blocks_by_rank_blocks(M, r)
    args = [
        *[None] * 6,  # [M,N], [N,r], [M,r], [M,r], [N,r], [r,K]; du contiguous
        M,
        N,
        r,
        m_bucket(M),
        da_elements,
        *grad_y.stride(),
        *lora_B.stride(),
        *u.stride(),
        r,
        1,
        r,
        1,
        sc.scaling,
    ]
    meta = dict(
        COMPUTE_DB=compute_db,
        DOT_PREC=dot_precision(grad_y.dtype),
        SPLIT_LORA=sc.split_lora,
        R_PAD=r_pad,
        BLOCK_R=block_r,
        ZERO_BLOCK=1024,
    )
    return _lora_dy.bind(grid, args, meta)


def _bind_ordered_grads(grad_y, u, x, sc: LoraScalars) -> BoundLaunch:
    """dB [N, r] <- dYᵀ u and dA [r, K] <- duᵀ (m ⊙ x)/(1-p), each summed over M in a fixed order.
    Per call: ``(grad_y, u, dB, x, du, dA, seed_word, seed_ptr)``."""
    M, N = grad_y.shape
    K = x.shape[1]
    r = u.shape[1]
    r_pad = padded_rank(r)
    block_r = min(r_pad, 64)
    grid = lambda META: (cdiv(N, META["BLOCK_C"]) + cdiv(K, META["BLOCK_C"]), r_pad // block_r)  # noqa: E731
    args = [
        *[None] * 6,  # [M,N], [M,r], [N,r], [M,K], [M,r], [r,K]; dB, du, dA contiguous
        M,
        N,
        K,
        r,
        m_bucket(M),
        *grad_y.stride(),
        *u.stride(),
        r,
        1,
        *x.stride(),
        r,
        1,
        K,
        1,
        sc.inv_keep,
        None,
        None,  # seed_word, seed_ptr
        sc.threshold,
    ]
    meta = dict(
        HAS_DROPOUT=sc.has_dropout,
        DOT_PREC=dot_precision(x.dtype),
        SPLIT_LORA=sc.split_lora,
        R_PAD=r_pad,
        BLOCK_R=block_r,
    )
    return _lora_ordered_grads.bind(grid, args, meta)


def _bind_dx(grad_y, weight, lora_A, x, sc: LoraScalars, *, gemm: bool, compute_dx: bool, compute_da: bool) -> BoundLaunch:
    """B2: dX [M, K] <- (``gemm``: dY W) + m ⊙ (du A)/(1-p) if ``compute_dx``; dA [r, K] += duᵀ (m ⊙ x)/(1-p)
    if ``compute_da`` (fp32 atomics). A tensor whose flag is off is a stand-in, never written.
    Per call: ``(grad_y, weight, du, lora_A, x, dX, dA, seed_word, seed_ptr)``."""
    M, N = grad_y.shape
    K = x.shape[1]
    r = lora_A.shape[0]
    r_pad = padded_rank(r)
    grid = lambda META: (cdiv(M, META["BLOCK_M"]) * cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    args = [
        *[None] * 7,  # [M,N], [N,K], [M,r], [r,K], [M,K], [M,K], [r,K]; du, dX, dA contiguous
        M,
        N,
        K,
        r,
        m_bucket(M),
        *grad_y.stride(),
        *weight.stride(),
        r,
        1,
        *lora_A.stride(),
        *x.stride(),
        K,
        1,
        K,
        1,
        sc.inv_keep,
        None,
        None,  # seed_word, seed_ptr
        sc.threshold,
    ]
    meta = dict(
        GEMM=gemm,
        COMPUTE_DX=compute_dx,
        COMPUTE_DA=compute_da,
        HAS_DROPOUT=sc.has_dropout,
        DOT_PREC=dot_precision(x.dtype),
        SPLIT_LORA=sc.split_lora,
        R_PAD=r_pad,
        BLOCK_R=min(r_pad, 32),
    )
    return _lora_dx.bind(grid, args, meta)


class _BackwardPlan:
    """:func:`lora_backward` for one call signature (the tensors' shapes, strides, dtypes and
    devices, the scalars, the gradients asked for, the main GEMM and reduction): checked and
    bound once, run per call, as :class:`_ForwardPlan`."""

    def __init__(
        self, grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, needs_grad_x, needs_grad_lora, main_gemm, reduction
    ) -> None:
        _check_backward_inputs(grad_y, x, weight, lora_A, lora_B, u)
        M, K = x.shape
        N, r = lora_B.shape
        self.shape, self.device, self.dtype = (M, N, K, r), x.device, x.dtype
        self.needs_grad_x, self.needs_grad_lora, self.main_gemm = needs_grad_x, needs_grad_lora, main_gemm
        self.ordered = needs_grad_lora and reduction == "ordered"
        self.atomic_lora = needs_grad_lora and not self.ordered  # dB by B1's atomics, dA by B2's
        self.copies = tuple(stride_unsafe(t) for t in (grad_y, x, weight))
        grad_y, x, weight = stride_safe(grad_y), stride_safe(x), stride_safe(weight)
        sc = LoraScalars(scaling, dropout_p, needs_split(x.dtype, lora_A, lora_B))
        self.dy = _bind_dy(grad_y, lora_B, u, sc, compute_db=self.atomic_lora, da_elements=r * K if self.atomic_lora else 0)
        if self.ordered:
            self.ordered_grads = _bind_ordered_grads(grad_y, u, x, sc)
        if not needs_grad_x:  # dA only (or nothing: the ordered kernel gave it)
            self.da_only = _bind_dx(grad_y, weight, lora_A, x, sc, gemm=False, compute_dx=False, compute_da=True)
        else:
            self.dx = {
                gemm: _bind_dx(
                    grad_y, weight, lora_A, x, sc, gemm=gemm == "triton", compute_dx=True, compute_da=self.atomic_lora
                )
                for gemm in MAIN_GEMMS
            }
        self.chooser_key = MAIN_GEMM_CHOOSER.key("backward", M, K, N, x.device, x.dtype)

    def run(self, grad_y, x, weight, lora_A, lora_B, u, seed):
        if not (self.needs_grad_x or self.needs_grad_lora):
            return None, None, None
        M, N, K, r = self.shape
        dev, atomic_lora = self.device, self.atomic_lora
        seed_word, seed_ptr = seed_arguments(seed, dev)
        grad_y, x, weight = (t.contiguous() if copy else t for t, copy in zip((grad_y, x, weight), self.copies, strict=True))
        du = torch.empty((M, r), dtype=torch.float32, device=dev)
        dx = torch.empty((M, K), dtype=self.dtype, device=dev) if self.needs_grad_x else None
        # dA and dB in fp32 (separate buffers: the custom op's outputs must not alias); as atomic
        # targets dB is zeroed here and dA by B1; the ordered kernel writes every element
        da = torch.empty((r, K), dtype=torch.float32, device=dev) if self.needs_grad_lora else None
        db = (torch.empty if self.ordered else torch.zeros)((N, r), dtype=torch.float32, device=dev) if self.needs_grad_lora else None
        # pointer slots a launch does not use get a scratch of their own (autotune's reset_to_zero
        # zeroes them, which must not touch dA / dB the ordered kernel wrote)
        scratch = None if self.needs_grad_x and atomic_lora else torch.zeros(1, dtype=torch.float32, device=dev)
        if M == 0:  # no rows: nothing to launch, the gradients are zeros
            for grad in (dx, da, db):
                if grad is not None:
                    grad.zero_()
        else:
            # ---- B1: du, dB
            self.dy(grad_y, lora_B, u, du, db if atomic_lora else scratch, da if atomic_lora else scratch)
            if self.ordered:
                self.ordered_grads(grad_y, u, db, x, du, da, seed_word, seed_ptr)
            # ---- B2: dX (GEMM, or the seed of cuBLAS's dY W), dA
            if not self.needs_grad_x:
                if atomic_lora:
                    self.da_only(grad_y, weight, du, lora_A, x, scratch, da, seed_word, seed_ptr)
            else:

                def main(gemm: str, da_target: torch.Tensor = da if atomic_lora else scratch) -> None:
                    self.dx[gemm](grad_y, weight, du, lora_A, x, dx, da_target, seed_word, seed_ptr)
                    if gemm == "cublas":
                        dx.addmm_(grad_y, weight)

                def prepare():  # measuring: B2 rewrites dX, but adds into dA: time it adding into scratch
                    timing_da = torch.zeros_like(da) if atomic_lora else scratch
                    return lambda gemm: main(gemm, timing_da)

                main(self.main_gemm or MAIN_GEMM_CHOOSER.choose(self.chooser_key, dev, prepare))
        grad_A = da.to(lora_A.dtype) if da is not None else None
        grad_B = db.to(lora_B.dtype) if db is not None else None
        return dx, grad_A, grad_B


@on_first_argument_device
def lora_backward(
    grad_y: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] (any strides)
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    u: torch.Tensor,  # [M, r] (fp32 from lora_forward)
    scaling: float,
    dropout_p: float,
    seed: int | torch.Tensor,  # the forward's
    needs_grad_x: bool = True,
    needs_grad_lora: bool = True,
    *,
    main_gemm: str | None = None,
    reduction: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused LoRA backward: returns ``(dX [M, K] x.dtype, dA [r, K] lora_A.dtype, dB [N, r] lora_B.dtype)``,
    None for what is not needed.

    B1: ``du = s·dY B`` and ``dB = dYᵀ u`` in one pass over dY. B2: ``dX = dY W + m ⊙ (du A)/(1-p)``
    and ``dA = duᵀ (m ⊙ x)/(1-p)`` from the same tiles (the mask regenerated from the seed).
    With ``reduction="ordered"`` B1 gives du only, B2 dX only, and ``_lora_ordered_grads_kernel``
    dA and dB without atomics (:func:`choose_reduction`, the default's rule).
    ``main_gemm`` (keyword-only) forces "triton" or "cublas" for ``dY W``; default: the one
    measured faster for (M, K, N) (:mod:`~lorafast.kernels.main_gemm`; while measuring, B2's dA
    atomics go to a scratch buffer). Checks and launch arguments are worked out once per call
    signature (:class:`_BackwardPlan`).
    """
    check_scalars(scaling, dropout_p, seed, getattr(x, "device", None))
    if main_gemm not in (*MAIN_GEMMS, None):
        raise ValueError(f"main_gemm must be 'triton' or 'cublas', got {main_gemm!r}")
    scaling, dropout_p = float(scaling), float(dropout_p)
    reduction = choose_reduction(reduction) if needs_grad_lora else None
    try:
        key = tuple(_describe(t) for t in (grad_y, x, weight, lora_A, lora_B, u))
        key += (scaling, dropout_p, bool(needs_grad_x), bool(needs_grad_lora), main_gemm, reduction)
    except AttributeError:  # not tensors: the plan's checks say which
        key = None
    plan = _BACKWARD_PLANS.get(
        key,
        lambda: _BackwardPlan(
            grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, needs_grad_x, needs_grad_lora, main_gemm, reduction
        ),
    )
    return plan.run(grad_y, x, weight, lora_A, lora_B, u, seed)


def dropout_keep_mask(seed: int | torch.Tensor, M: int, K: int, dropout_p: float, device) -> torch.Tensor:
    """The bool keep mask ``[M, K]`` every kernel draws for ``(seed, row, col)``:
    ``keep = lane >= round(p · 2**16)``, ``lane`` the 16-bit half ``col % 2`` of word ``(col // 2) % 4``
    of ``Philox(seed; counter = (col // 8, row, 0, 0))`` (see ``_common.keep_mask``)."""
    out = torch.empty((M, K), dtype=torch.uint8, device=device)
    device = out.device  # indexed ("cuda" -> "cuda:0"): the seed must live there, its zero is kept per index
    check_scalars(1.0, dropout_p, seed, device)
    if M * K > 0:
        if device.type == "cpu" and not interpreting():
            raise ValueError("dropout_keep_mask needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        bm, bk = (16, 64) if interpreting() else (32, 128)
        grid = (cdiv(M, bm), cdiv(K, bk))
        seed_word, seed_ptr = seed_arguments(seed, device)
        with launch_device(device):
            _keep_mask_kernel[grid](out, M, K, seed_word, seed_ptr, drop_threshold(dropout_p), BLOCK_M=bm, BLOCK_K=bk)
    return out.view(torch.bool)
