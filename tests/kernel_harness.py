"""Test harness for running the Triton kernels through the CPU interpreter.

``interpreter_bf16_fixes()`` works around two bf16 bugs of the triton 3.6-3.9 interpreter,
which keeps bf16 values as uint16 bit patterns:

* ``tl.dot`` on bf16 operands multiplies the raw integers (garbage): ``create_dot`` is wrapped
  to widen bf16 operands to fp32 (bits << 16, viewed as float32: exact) first.
* ``x.to(tl.bfloat16)`` from fp32 truncates the mantissa (round toward zero, up to 1 ulp of
  error) where the GPU rounds to nearest even: ``cast_impl`` is wrapped to round to nearest
  even for fp32 -> bf16 (NaN kept as NaN).

Both patches apply only inside the context manager and only when ``TRITON_INTERPRET=1``;
on a GPU the context manager does nothing.
"""

from __future__ import annotations

import contextlib
import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _widen_bf16(handle):
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = np.asarray(handle.data).astype(np.uint32) << np.uint32(16)
    return TensorHandle(bits.view(np.float32), tl.float32)


def _f32_to_bf16_rne(data):
    import numpy as np

    f = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    bits = f.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if np.any(nan):
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


@contextlib.contextmanager
def interpreter_bf16_fixes():
    """Patch the interpreter's bf16 ``tl.dot`` and fp32 -> bf16 cast (see the module docstring)."""
    if not interpreting():
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original_dot = InterpreterBuilder.create_dot
    original_cast = InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, _widen_bf16(a), _widen_bf16(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_f32_to_bf16_rne(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    InterpreterBuilder.create_dot = create_dot
    InterpreterBuilder.cast_impl = cast_impl
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = original_dot
        InterpreterBuilder.cast_impl = original_cast


@contextlib.contextmanager
def forced_config(launcher, config):
    """Every launch through ``launcher`` (a ``TunedLauncher``) runs ``config``: its autotuner holds
    that config alone (so it neither prunes nor benchmarks) and no earlier choice is remembered.
    For the configs the interpreter's single default never reaches (the small-M kernel's split-K
    ones); on a GPU the prune's shared-memory check is skipped too, so pick configs that fit."""
    autotuner = launcher.autotuner
    saved = autotuner.configs
    autotuner.configs = [config]
    launcher.forget()
    try:
        yield
    finally:
        autotuner.configs = saved
        launcher.forget()
