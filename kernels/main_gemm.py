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

Not measured (the default is used, cuBLAS on CUDA and the Triton GEMM on the interpreter, and
nothing is memoized): with ``LORAFAST_AUTOTUNE=0``, while a CUDA graph is being captured (timing
synchronizes), and off CUDA. ``LORAFAST_MAIN_GEMM=triton|cublas`` forces one path everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from ._common import TIMING_REP_MS, TIMING_WARMUP_MS, autotune_enabled, capturing, m_bucket

MAIN_GEMMS = ("triton", "cublas")
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

    def known(self, key: tuple) -> str | None:
        found = self._chosen.get(key)
        return None if found is None else found["main_gemm"]

    def choose(self, key: tuple, device: torch.device, prepare: Callable[[], Callable[[str], None]]) -> str:
        """The path for ``key``: forced, else measured, else the default. Measuring (a key's first
        launch, where :func:`can_measure`) calls ``prepare()`` once for ``run`` and times
        ``run(path)`` for each path; ``run`` must be safe to repeat (``prepare`` points outputs
        that accumulate at scratch)."""
        forced = forced_main_gemm()
        if forced is not None:
            return forced
        found = self.known(key)
        if found is not None:
            return found
        if not can_measure(device):
            return default_main_gemm(device)
        run = prepare()
        times = {path: time_ms(functools.partial(run, path)) for path in MAIN_GEMMS}
        choice = min(MAIN_GEMMS, key=times.__getitem__)
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
    """The path a launch of this shape takes or took: "triton" or "cublas" (module docstring).

    ``LORAFAST_MAIN_GEMM`` if set, else the choice measured for the key, else the default. This
    only looks up: the measuring happens in the launch. The backward asks with (M, K, N): its
    output is [M, K] and it reduces over N. M <= ``SMALL_M_MAX`` forward uses the small-M kernel.
    """
    key = MainGemmChooser.key(direction, M, N, K, device, dtype)
    forced = forced_main_gemm()
    if forced is not None:
        return forced
    found = MAIN_GEMM_CHOOSER.known(key)
    return found if found is not None else default_main_gemm(torch.device(device))
