"""Triton kernels and their launchers, installed as ``lorafast.kernels``.

Public API (all tensors 2D; see :mod:`lorafast.kernels.lora_linear` for the math)::

    lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, u)
    lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
                  needs_grad_x=True, needs_grad_lora=True, *, main_gemm=None, reduction=None)
                  -> (grad_x, grad_A, grad_B)
    dropout_keep_mask(seed, M, K, dropout_p, device) -> bool [M, K]
    lora_merge_(weight, lora_A, lora_B, scaling, sign=1.0) -> None
    choose_main_gemm(M, N, K, device, dtype, direction="forward") -> "triton" | "cublas" | "small_m"
                  (the frozen GEMM's path, or for a forward of M <= 64 the small-M kernel:
                  measured per shape on first use, see main_gemm)
    autotune_choices() -> {kernel: [{"key": [...], "config": {...}}]}   (what autotuning picked)
    choose_reduction(reduction=None) -> "atomic" | "ordered"   (how dA, dB are summed over M)
    set_compiled_launches(enabled) -> previous, compiled_launches_enabled() -> bool
                  (compiled-kernel launches on / off, below)

``lora_forward`` and ``lora_backward`` check their inputs and bind their kernel launches once per
call signature (shapes, strides, dtypes, devices, scalars); later calls with that signature
launch the compiled kernels directly (``set_compiled_launches(False)``, or
``LORAFAST_COMPILED_LAUNCH=0`` at start-up: through ``JITFunction.run``, as the first call of
each does).

Dots run in x's dtype with fp32 accumulation; with fp16/bf16 x and fp32 LoRA params every
fp32 operand is split into two 16-bit parts (hi + lo), so u, dA and dB are about as accurate
as PEFT's fp32 LoRA branch (measurements in :mod:`lorafast.kernels.lora_linear`).
"""

if __name__ == "kernels":
    # This folder was found as a top-level ``kernels``: the repository root is on sys.path
    # (``python -m pytest`` or ``python -c`` in a checkout puts the working directory first).
    # That name belongs to the PyPI package ``kernels``, which transformers (5.x requires it)
    # imports with its models: put the installed one in this module's place, or fail as if this
    # folder were not there. Importlib returns what ``sys.modules`` holds after this runs.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["kernels"])
else:
    from ._common import (
        MAX_RANK,
        SMALL_M_MAX,
        compiled_launches_enabled,
        resolved_dropout_p,
        set_compiled_launches,
    )
    from .lora_linear import (
        autotune_choices,
        choose_reduction,
        dropout_keep_mask,
        lora_backward,
        lora_forward,
    )
    from .main_gemm import choose_main_gemm
    from .merge import lora_merge_

    __all__ = [
        "MAX_RANK",
        "SMALL_M_MAX",
        "autotune_choices",
        "choose_main_gemm",
        "choose_reduction",
        "compiled_launches_enabled",
        "dropout_keep_mask",
        "lora_backward",
        "lora_forward",
        "lora_merge_",
        "resolved_dropout_p",
        "set_compiled_launches",
    ]
