"""The LoRA linear as custom ops (``torch.library``) with registered autograd and backend dispatch.

Two ops, ``lorafast::lora_forward`` and ``lorafast::lora_backward``, each with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces a LoRA layer without a graph
break and ``torch.library.opcheck`` passes. Each op runs either the pure-PyTorch reference
(``lorafast.reference``) or the fused Triton launchers (``lorafast.kernels``), chosen per call
by :func:`use_triton` from the backend setting and the tensors' device.

Memory policy (DESIGN.md §3): the autograd context keeps x itself (a reference: no copy, no
cast, so q/k/v sharing one input share one saved tensor), u ``[M, r]`` in fp32 and the dropout
seed (a Python int in eager mode; under ``torch.compile`` a 0-d tensor on the device, where the
kernels read it from memory so a CUDA-graph replay draws a new mask every step); the frozen weight and the
LoRA parameters are kept too, but they are parameters that live anyway. The dropout mask is regenerated in backward from the seed, never stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from lorafast import reference

BACKENDS = ("auto", "torch", "triton")
_HOST = torch.device("cpu")
_NO_SEED = torch.zeros((), dtype=torch.int64, device=_HOST)  # the seed argument when there is no dropout
_backend: str = "auto"


def set_backend(name: str) -> None:
    """Choose the implementation: ``"auto"`` (Triton on CUDA, reference elsewhere), ``"torch"`` or ``"triton"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown lorafast backend {name!r}; choose one of {BACKENDS}")
    if name == "triton":
        _load_kernels()
    _backend = name


def get_backend() -> str:
    return _backend


_kernels = None  # lorafast.kernels once imported (every fused call asks for it)


def _load_kernels():
    """Import ``lorafast.kernels``, or raise a clear error saying why the Triton backend is unusable."""
    global _kernels
    if _kernels is not None:
        return _kernels
    try:
        from lorafast import kernels
    except ImportError as error:  # triton missing (e.g. not Linux)
        raise RuntimeError(f"the lorafast 'triton' backend needs Triton, which failed to import: {error}") from error
    if not hasattr(kernels, "lora_forward"):
        raise RuntimeError("the lorafast 'triton' backend is not available in this build (no fused kernels)")
    _kernels = kernels
    return kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the fused Triton kernels under the current backend."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"the lorafast 'triton' backend needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter"
            )
        return True
    if device.type != "cuda":
        return False
    try:
        _load_kernels()
    except RuntimeError:
        return False
    return True


def _kernel_seed(seed: torch.Tensor | int, device: torch.device) -> int | torch.Tensor:
    """The seed as the kernels' launchers take it: the tensor itself when it lives on the tensors'
    device (the kernels load it, which stays right under CUDA-graph replay), else its value (a
    CPU scalar: reading it does not synchronize; eager autograd keeps it as an int already). Both
    launch the same compiled kernels (``lorafast.kernels._common.seed_arguments``)."""
    if isinstance(seed, int):
        return seed
    return seed if seed.device == device else int(seed)


def _keep_mask(seed: torch.Tensor | int, M: int, K: int, dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """The reference path's dropout mask ``[M, K]``, regenerated from the seed (None without dropout).
    It seeds a ``torch.Generator`` with the seed's value: a host read, which a CUDA-graph capture
    forbids (the Triton kernels load a device seed instead)."""
    if dropout_p == 0.0:
        return None
    if isinstance(seed, torch.Tensor) and seed.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "lorafast's 'torch' backend cannot draw dropout masks inside a CUDA graph (it reads the "
            "seed on the host): use the 'triton' backend (the default on CUDA), lora_dropout=0, or "
            "no CUDA graphs (torch.compile without mode='reduce-overhead')"
        )
    return reference.dropout_keep_mask(int(seed), (M, K), dropout_p, device)


def _lora_forward_impl(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], same dtype as x
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,  # 0-d int64: on the CPU in eager mode, on x's device under torch.compile
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [M, N] in x.dtype, u [M, r] fp32)`` with ``y = x Wᵀ + bias + u Bᵀ``, ``u = s·x̂ Aᵀ``."""
    if fused:
        seed_argument = _kernel_seed(seed, x.device)
        return _load_kernels().lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_argument)
    y, u = reference.lora_forward(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, _keep_mask(seed, *x.shape, dropout_p, x.device)
    )
    return y, u.to(torch.float32)


# The op, and its implementation kept callable without the dispatcher for the inference fast path.
lora_forward = torch.library.custom_op("lorafast::lora_forward", mutates_args=())(_lora_forward_impl)


@lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fused):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0], dtype=torch.float32)


def _lora_backward_impl(
    grad_y: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    u: torch.Tensor,  # [M, r] fp32, saved by the forward
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,  # 0-d int64, the forward's (an int when eager autograd calls the implementation)
    fused: bool,
    needs_grad_x: bool,
    needs_grad_lora: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX [M, K], dA [r, K], dB [N, r])`` of DESIGN.md §1, with the forward's dropout mask.

    What is not needed (``needs_grad_x``: dX; ``needs_grad_lora``: dA and dB) is not computed:
    without dX no ``dY W`` GEMM runs, without the LoRA gradients no pass over x; its output is
    then an empty ``[0]`` tensor (an op's output cannot be None)."""
    if fused:
        kernels = _load_kernels()
        grads = kernels.lora_backward(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            u,
            scaling,
            dropout_p,
            _kernel_seed(seed, grad_y.device),
            needs_grad_x,
            needs_grad_lora,
        )
    else:
        keep_mask = _keep_mask(seed, grad_y.shape[0], weight.shape[1], dropout_p, grad_y.device)
        grads = reference.lora_backward(
            grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, keep_mask, needs_grad_x, needs_grad_lora
        )
    return tuple(grad if grad is not None else grad_y.new_empty(0) for grad in grads)


lora_backward = torch.library.custom_op("lorafast::lora_backward", mutates_args=())(_lora_backward_impl)


@lora_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, fused, needs_grad_x, needs_grad_lora):
    def needed(flag: bool, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like) if flag else grad_y.new_empty(0)

    return needed(needs_grad_x, x), needed(needs_grad_lora, lora_A), needed(needs_grad_lora, lora_B)


def _setup_context(ctx, inputs, output, host_seed: bool = False) -> None:
    """Save what backward needs, for the gradients that will be asked for: x only when the LoRA or
    frozen weight gradients need it (dX needs du and the mask, not x), u only for dB. With
    ``host_seed`` (eager autograd) a CPU seed is kept as a Python int, not as a tensor: then x and
    u are all the activation memory a layer keeps, ``bytes(x) + M·r·4``."""
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fused = inputs
    _, u = output
    needs_grad = ctx.needs_input_grad
    ctx.needs_grad_x = needs_grad[0]
    ctx.needs_grad_lora = needs_grad[3] or needs_grad[4]
    keep_x = ctx.needs_grad_lora or needs_grad[1]
    ctx.host_seed = int(seed) if host_seed and seed.device.type == "cpu" else None
    kept_seed = seed if ctx.host_seed is None else None
    kept_u = u if ctx.needs_grad_lora else None
    ctx.save_for_backward(x if keep_x else None, weight, lora_A, lora_B, kept_u, kept_seed)
    ctx.hyper = (scaling, dropout_p, fused)
    ctx.bias_needs_grad = bias is not None and needs_grad[2]


def _input_grads(ctx, grad_y: torch.Tensor, backward: Callable) -> tuple[torch.Tensor | None, ...]:
    """The gradients of the forward's nine inputs; ``backward`` is the backward op or its implementation."""
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    if seed is None:
        seed = ctx.host_seed
    scaling, dropout_p, fused = ctx.hyper
    if grad_y.dtype != weight.dtype:
        grad_y = grad_y.to(weight.dtype)
    M = grad_y.shape[0]
    # not saved, so not read (only dX is needed): zero-stride stand-ins of the right shape and dtype
    if x is None:
        x = grad_y.new_empty(()).expand(M, weight.shape[1])
    if u is None:
        u = grad_y.new_empty((), dtype=torch.float32).expand(M, lora_A.shape[0])
    grad_x, grad_A, grad_B = backward(
        grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, fused, ctx.needs_grad_x, ctx.needs_grad_lora
    )
    needs_grad = ctx.needs_input_grad
    grad_weight = grad_y.t() @ x if needs_grad[1] else None
    grad_bias = grad_y.sum(0) if ctx.bias_needs_grad else None
    return (
        grad_x if needs_grad[0] else None,
        grad_weight,
        grad_bias,
        grad_A if needs_grad[3] else None,
        grad_B if needs_grad[4] else None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, grad_y, grad_u):
    return _input_grads(ctx, grad_y, lora_backward)


lora_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoraFunction(torch.autograd.Function):
    """The op's autograd for eager training, without the dispatcher: the same context and the same
    implementations, called directly. ``torch.library``'s autograd path costs about 200 µs more
    Python per layer and training step (measured on the CPU, M=16, K=N=64), which a GPU step of a
    mid-sized layer would not hide. ``torch.compile`` always sees the registered op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _lora_forward_impl(*inputs)
        _setup_context(ctx, inputs, output, host_seed=True)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_u):
        return _input_grads(ctx, grad_y, _lora_backward_impl)


def lora_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] (may be a transposed view)
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
) -> torch.Tensor:
    """``x Wᵀ + bias + s·(dropout(x) Aᵀ) Bᵀ`` over any leading dims; returns ``[..., N]``.

    Under ``torch.autocast`` the frozen product runs in the autocast dtype (x, W and bias are
    cast to it, as autocast's own linear would) and the op itself runs with autocast off.
    """
    out_features, in_features = weight.shape[0], weight.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"LoRA linear expects inputs [..., {in_features}], got {tuple(x.shape)}")
    # ints compared one by one: a torch.Size compared with a tuple costs ~5 µs of Python (sym_eq)
    if (
        lora_A.dim() != 2
        or lora_B.dim() != 2
        or lora_A.shape[0] != lora_B.shape[1]
        or lora_A.shape[1] != in_features
        or lora_B.shape[0] != out_features
    ):
        raise ValueError(
            f"LoRA shapes do not fit the base weight {tuple(weight.shape)}: "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    device_type = x.device.type
    forward = _forward_for((x, weight, bias, lora_A, lora_B))
    autocasting = torch.is_autocast_enabled(device_type)
    if autocasting:
        compute_dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    elif x.dtype != weight.dtype:
        raise ValueError(f"input dtype {x.dtype} does not match the base weight dtype {weight.dtype}")
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=_seed_device(x))
    elif torch.compiler.is_compiling():  # unused, but a CPU tensor in the graph can keep it off CUDA graphs
        seed = x.new_zeros((), dtype=torch.int64)
    else:
        seed = _NO_SEED
    rows = x if x.dim() == 2 else x.reshape(-1, in_features)
    inputs = (rows, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, use_triton(x.device))
    if autocasting:
        with torch.autocast(device_type, enabled=False):
            y, _ = forward(*inputs)
    else:  # entering a disabled autocast context costs ~7 µs per call (eager decode, CPU profile)
        y, _ = forward(*inputs)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def _seed_device(x: torch.Tensor) -> torch.device:
    """Where the dropout seed is drawn. Eagerly on the CPU (named, so ``torch.set_default_device``
    does not move it): no launch, and the kernels take its value without a sync. On x's device under ``torch.compile`` and while a CUDA graph is being
    captured: a host value would be frozen into the graph, so every replay would drop the same
    elements; a device seed comes from the graph-safe CUDA generator and the kernels load it."""
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return x.device
    return _HOST


def _forward_for(tensors: tuple[torch.Tensor | None, ...]) -> Callable:
    """The registered op under ``torch.compile``; in eager mode the same implementation without the
    dispatcher: through ``_EagerLoraFunction`` when autograd needs it, directly otherwise (inference,
    decode), which skips the per-call overhead."""
    if torch.compiler.is_compiling():
        return lora_forward
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _EagerLoraFunction.apply if needs_grad else _lora_forward_impl


set_backend(os.environ.get("LORAFAST_BACKEND", "auto"))
