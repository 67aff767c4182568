"""Which implementation runs the frozen GEMM of a fused LoRA launch: measured, per shape.

Each training-path launch (M > ``SMALL_M_MAX``) has two ways to compute its frozen product:

* "triton": the Triton GEMM with the LoRA epilogue fused (F2: ``x Wᵀ + u Bᵀ + bias``; B2:
  ``dY W + m ⊙ (du A)/(1-p)``), one kernel;
* "cublas": the same kernel without its GEMM writes the LoRA term, then cuBLAS accumulates the
  frozen product onto it (``addmm_``, beta = 1).

Which is faster depends on the GPU, the dtype and the shape: on the first H200 run (2026-11-28,
bf16, r=16, p=0.1) cuBLAS won at five of six training shapes, and at K=N=4096 M=2048 the Triton
GEMM won by 24% in one run and lost in another. A fixed table would hold for the GPU it was
measured on only, so the choice is measured where it runs: the first launch of each key
(direction, device, dtype, M bucket, N, K) times both variants with ``triton.testing.do_bench``
(~50 ms, once, like the configs' autotuning) and keeps the faster; later launches look it up.

A forward of at most ``SMALL_M_MAX`` rows (decode, small batches) has a third way, the small-M
kernel (frozen product and LoRA term in one launch, every program re-reading all of A), and is
measured among the three: on the first H200 run the small-M kernel took 0.095 ms at M = 16
(5x the merged layer's cuBLAS GEMM) where one cuBLAS GEMM and two small LoRA launches would read
W once like it; which wins depends on M and the GPU, so it is measured too.

Each timing is of the whole forward (F1 included) or of B2 plus cuBLAS (B1 runs once before).
A key names the shape and dtype, not the rank, dropout, bias or LoRA-weight dtype: layers of one
shape share the first one's measurement (one LoRA config applies to all layers alike, but a
process that decodes (p = 0) and then trains at M <= 64 (dropout on) keeps the decode choice).

Not measured (the default is used, the small-M kernel for those forwards, else cuBLAS on CUDA
and the Triton GEMM on the interpreter, and nothing is memoized): with ``LORAFAST_AUTOTUNE=0``,
while a CUDA graph is being captured (timing synchronizes), and off CUDA.
``LORAFAST_MAIN_GEMM=triton|cublas`` forces one main GEMM everywhere (and the small-M kernel
where a forward may take it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from ._common import SMALL_M_MAX, TIMING_REP_MS, TIMING_WARMUP_MS, autotune_enabled, capturing, m_bucket

MAIN_GEMMS = ("triton", "cublas")
#: The paths of a forward of at most SMALL_M_MAX rows, the small-M kernel (its default) first.
SMALL_M_PATHS = ("small_m", *MAIN_GEMMS)
DIRECTIONS = ("forward", "backward")


def default_main_gemm(device: torch.device) -> str:
    """The choice when none is forced or measured: cuBLAS on CUDA, the Triton GEMM elsewhere."""
    return "cublas" if device.type == "cuda" else "triton"


def forced_main_gemm() -> str | None:
    """``LORAFAST_MAIN_GEMM`` if it names a path (else None)."""
    forced = os.environ.get("LORAFAST_MAIN_GEMM", "").strip().lower()
    return forced if forced in MAIN_GEMMS else None


def can_measure(device: torch.device) -> bool:
    """Whether a launch on ``device`` may time the variants now (see the module docstring)."""
    return device.type == "cuda" and autotune_enabled() and not capturing(device)


def time_ms(fn: Callable[[], None]) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench``: warm-up, L2 flushed before each call)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=TIMING_WARMUP_MS, rep=TIMING_REP_MS, return_mode="median"))


class MainGemmChooser:
    """The measured main-GEMM choice per key; ``choose`` measures a key on its first launch."""

    def __init__(self) -> None:
        self._chosen: dict[tuple, dict] = {}  # key -> {"main_gemm": choice, "<choice>_ms": time, ...}

    @staticmethod
    def key(direction: str, M: int, N: int, K: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """(direction, device, dtype, M bucket, N, K): N is the output's columns, K the reduced dim."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and x.device ("cuda:0") alike
            device = torch.device("cuda", torch.cuda.current_device())
        return (direction, str(device), dtype, m_bucket(M), int(N), int(K))

    @staticmethod
    def paths(key: tuple) -> tuple[str, ...]:
        """The candidates for ``key``: :data:`SMALL_M_PATHS` for a forward of at most
        ``SMALL_M_MAX`` rows (its M bucket, the next power of two, is then at most that too),
        else :data:`MAIN_GEMMS`."""
        direction, _, _, bucket, _, _ = key
        return SMALL_M_PATHS if direction == "forward" and bucket <= SMALL_M_MAX else MAIN_GEMMS

    def known(self, key: tuple) -> str | None:
        """The path forced by ``LORAFAST_MAIN_GEMM`` (the small-M kernel where ``key`` may take
        it), else the one measured for ``key``, else None."""
        forced = forced_main_gemm()
        if forced is not None:
            return "small_m" if self.paths(key) is SMALL_M_PATHS else forced
        found = self._chosen.get(key)
        return None if found is None else found["main_gemm"]

    def default(self, key: tuple, device: torch.device) -> str:
        """The path while ``key`` is neither forced nor measured."""
        return "small_m" if self.paths(key) is SMALL_M_PATHS else default_main_gemm(device)

    def choose(self, key: tuple, device: torch.device, prepare: Callable[[], Callable[[str], None]]) -> str:
        """The path for ``key``: forced, else measured, else the default. Measuring (a key's first
        launch, where :func:`can_measure`) calls ``prepare()`` once for ``run`` and times
        ``run(path)`` for each of :meth:`paths`; ``run`` must be safe to repeat (``prepare`` points
        outputs that accumulate at scratch)."""
        found = self.known(key)
        if found is not None:
            return found
        if not can_measure(device):
            return self.default(key, device)
        run, paths = prepare(), self.paths(key)
        times = {path: time_ms(functools.partial(run, path)) for path in paths}
        choice = min(paths, key=times.__getitem__)
        self._chosen[key] = {"main_gemm": choice, **{f"{path}_ms": ms for path, ms in times.items()}}
        return choice

    def choices(self) -> list[dict]:
        """What was measured, as ``TunedLauncher.choices`` reports autotuning: one
        ``{"key": [...], "config": {"main_gemm": ..., "triton_ms": ..., "cublas_ms": ...}}`` per key."""
        return [{"key": [str(v) for v in key], "config": dict(found)} for key, found in self._chosen.items()]

    def forget(self) -> None:
        self._chosen.clear()


#: The process's measured choices (the launchers in ``lora_linear`` consult it).
MAIN_GEMM_CHOOSER = MainGemmChooser()


def choose_main_gemm(M: int, N: int, K: int, device, dtype: torch.dtype, direction: str = "forward") -> str:
    """The path a launch of this shape takes or took: "triton" or "cublas", or for a forward of
    at most ``SMALL_M_MAX`` rows also "small_m" (module docstring).

    ``LORAFAST_MAIN_GEMM`` if set, else the choice measured for the key, else the default. This
    only looks up: the measuring happens in the launch. The backward asks with (M, K, N): its
    output is [M, K] and it reduces over N.
    """
    key = MainGemmChooser.key(direction, M, N, K, device, dtype)
    found = MAIN_GEMM_CHOOSER.known(key)
    return found if found is not None else MAIN_GEMM_CHOOSER.default(key, torch.device(device))
