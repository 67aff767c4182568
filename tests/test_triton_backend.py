"""The "triton" backend end to end: LoraLinear → custom ops → fused kernels.

On the CPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without CUDA), so shapes stay small; on CUDA the same tests run on the GPU.
The kernels themselves are tested case by case in test_kernels.py; this file checks the wiring:
the torch and triton backends agree, the mask survives the op boundary, compile and opcheck work.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_harness import interpreter_bf16_fixes
from probes import mask_revealing_layer, observed_dropout_masks, partial_gradient_run
from tolerances import assert_close, assert_no_less_accurate

import lorafast
from lorafast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton_backend


@pytest.fixture(autouse=True)
def triton_backend():
    lorafast.set_backend("triton")
    with interpreter_bf16_fixes():
        yield
    lorafast.set_backend("auto")


def _layer_pair(in_features, out_features, dtype, bias=True):
    """The same LoRA layer twice (its base and adapter weights shared by value)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features, bias=bias).to(DEVICE, dtype)
    layer = lorafast.LoraLinear(base, r=5, lora_alpha=10, init_lora_weights=False).to(DEVICE)
    twin = lorafast.LoraLinear(
        torch.nn.Linear(in_features, out_features, bias=bias).to(DEVICE, dtype), r=5, lora_alpha=10
    )
    twin.load_state_dict(layer.state_dict())
    return layer, twin


def _forward_backward(layer, x, grad_y, backend):
    lorafast.set_backend(backend)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_y)
    return y, x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("leading_shape", [(7,), (2, 35)], ids=["small-M", "two-kernel"])
def test_triton_backend_matches_torch_backend(leading_shape, dtype):
    layer, twin = _layer_pair(24, 40, dtype)
    torch.manual_seed(1)
    x = torch.randn(*leading_shape, 24, device=DEVICE, dtype=dtype)
    grad_y = torch.randn(*leading_shape, 40, device=DEVICE, dtype=dtype)
    fused = _forward_backward(layer, x, grad_y, "triton")
    plain = _forward_backward(twin, x, grad_y, "torch")
    twin.zero_grad()
    exact = _forward_backward(twin.double(), x.double(), grad_y.double(), "torch")
    for got, want, exact_value, name in zip(fused, plain, exact, ["y", "dX", "dA", "dB"], strict=True):
        assert got.dtype == want.dtype, name
        if dtype == torch.float32:
            assert_close(got, want, dtype, msg=name)
        else:  # one rounding of y / dX and split dots, not torch's: the three-way rule (tests/tolerances.py)
            assert_no_less_accurate(got, want, exact_value, dtype, msg=name)


def test_forward_and_backward_masks_agree_through_the_op():
    dropout_p, M, K = 0.1, 96, 32
    forward_mask, backward_mask = observed_dropout_masks(M, K, dropout_p, DEVICE)
    assert torch.equal(forward_mask, backward_mask)
    keep_rate = forward_mask.float().mean().item()
    assert abs(keep_rate - (1 - dropout_p)) <= 3 * math.sqrt(dropout_p * (1 - dropout_p) / forward_mask.numel())


def test_compile_fullgraph_on_the_triton_backend():
    layer, _ = _layer_pair(16, 24, torch.float32)
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    assert_close(compiled, eager)
    compiled.sum().backward()
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_replays_draw_new_dropout_masks():
    """``torch.compile(mode="reduce-overhead")`` replays the layer from a CUDA graph: the dropout
    seed must come from the graph's RNG as a tensor the kernels load, not as a host integer
    frozen into the graph at capture. Each step: forward and backward masks agree; steps differ."""
    from torch._dynamo.utils import counters

    counters.clear()
    layer = mask_revealing_layer(64, 0.5).to(DEVICE)
    compiled = torch.compile(layer, mode="reduce-overhead")
    masks = []
    for _ in range(6):  # cudagraph trees warm up, record, then replay
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.ones(32, 64, device=DEVICE, requires_grad=True)
        y = compiled(x)
        y.backward(torch.ones_like(y))
        forward_mask = (y.detach() != 0).clone()
        assert torch.equal(forward_mask, x.grad != 0)
        masks.append(forward_mask)
    assert counters["inductor"]["cudagraph_skips"] == 0  # the layer really ran from CUDA graphs
    for i, later in enumerate(masks[1:], start=1):
        assert not any(torch.equal(later, earlier) for earlier in masks[:i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_torch_backend_dropout_inside_a_cuda_graph_is_a_clear_error():
    """The reference path reads its dropout seed on the host, which a capture forbids: an error
    that says so and what to do, not CUDA's "operation not permitted when stream is capturing"."""
    layer = lorafast.LoraLinear(torch.nn.Linear(16, 24).to(DEVICE), r=4, lora_alpha=8, lora_dropout=0.1)
    lorafast.set_backend("torch")
    x = torch.randn(8, 16, device=DEVICE)
    layer(x)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="'torch' backend cannot draw dropout masks inside a CUDA graph"):
        with torch.cuda.graph(graph):
            layer(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_compiled_decode_runs_from_cuda_graphs():
    """Decode under ``torch.compile(mode="reduce-overhead")``: graphed (no skip), eager's outputs."""
    from torch._dynamo.utils import counters

    counters.clear()
    layer, _ = _layer_pair(256, 384, torch.bfloat16)
    layer.eval()
    compiled = torch.compile(layer, mode="reduce-overhead")
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16)
            assert torch.equal(compiled(x), layer(x)), step
    assert counters["inductor"]["cudagraph_skips"] == 0


def _capture(fn, warmups: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph after warm-up calls on a side stream (compiles, autotunes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_decode_replays_from_a_captured_cuda_graph():
    """Serving-style decode: the unmerged layer's forward captured once, replayed on new inputs."""
    layer, _ = _layer_pair(256, 384, torch.bfloat16)
    layer.eval()
    static_x = torch.zeros(1, 256, device=DEVICE, dtype=torch.bfloat16)
    outputs = []

    def decode():
        with torch.no_grad():
            outputs[:] = [layer(static_x)]

    graph = _capture(decode)
    for step in range(3):
        x = torch.randn(
            1, 256, device=DEVICE, dtype=torch.bfloat16, generator=torch.Generator(DEVICE).manual_seed(step)
        )
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            assert torch.equal(outputs[0], layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_captured_training_step_draws_new_dropout_masks_on_every_replay():
    """A forward + backward captured eagerly in a CUDA graph: the seed is drawn on the device while
    capturing, so replays drop different elements, forward and backward alike."""
    layer = mask_revealing_layer(64, 0.5).to(DEVICE)
    static_x = torch.ones(32, 64, device=DEVICE, requires_grad=True)
    outputs = []

    def step():
        static_x.grad = None
        y = layer(static_x)
        y.backward(torch.ones_like(y))
        outputs[:] = [y.detach()]

    graph = _capture(step)
    masks = []
    for _ in range(4):
        graph.replay()
        forward_mask = outputs[0] != 0
        assert torch.equal(forward_mask, static_x.grad != 0)
        masks.append(forward_mask.clone())
    for i, later in enumerate(masks[1:], start=1):
        assert not any(torch.equal(later, earlier) for earlier in masks[:i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronization needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_eager_steps_never_synchronize_with_the_device(backend):
    """An eager training step (dropout on, so the seed is drawn) and a no-grad decode call through
    the layer never make the host wait for the GPU (``torch.cuda.set_sync_debug_mode("error")``
    raises at any synchronizing call, naming it). One such wait per layer would serialize the
    host's launch time with the GPU's work in every step."""
    lorafast.set_backend(backend)
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 384).to(DEVICE, torch.bfloat16)
    layer = lorafast.LoraLinear(base, r=16, lora_alpha=32, lora_dropout=0.1, init_lora_weights=False).to(DEVICE)
    x = torch.randn(2, 80, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(2, 80, 384, device=DEVICE, dtype=torch.bfloat16)
    token = torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16)

    def step():
        layer.train()
        layer(x).backward(grad_y)
        layer.eval()
        with torch.no_grad():
            layer(token)

    step()  # compiles and autotunes (which may synchronize)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("needs_grad", [(True, True), (True, False), (False, True)], ids=["all", "dx", "lora"])
def test_opcheck_fused_ops(needs_grad):
    torch.manual_seed(0)
    x, weight = torch.randn(9, 16, device=DEVICE), torch.randn(24, 16, device=DEVICE)
    lora_A = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    lora_B = torch.randn(24, 4, device=DEVICE, requires_grad=True)
    seed = torch.tensor(5)
    torch.library.opcheck(ops.lora_forward, (x, weight, None, lora_A, lora_B, 0.5, 0.2, seed, True))
    _, u = ops.lora_forward(x, weight, None, lora_A, lora_B, 0.5, 0.2, seed, True)
    grad_y = torch.randn(9, 24, device=DEVICE)
    args = (grad_y, x, weight, lora_A.detach(), lora_B.detach(), u.detach(), 0.5, 0.2, seed, True, *needs_grad)
    torch.library.opcheck(ops.lora_backward, args)


@pytest.mark.parametrize("frozen", ["input", "adapter"])
def test_fused_backward_gets_only_the_gradients_asked_for(frozen):
    from lorafast import kernels

    run = partial_gradient_run(frozen, kernels, DEVICE)
    assert run["flags"] == [(frozen != "input", frozen != "adapter")]
    for got, want, name in zip(run["partial"], run["full"], ["dX", "dA", "dB"], strict=True):
        if (name == "dX") == (frozen == "input"):
            assert got is None, name
        else:  # the same kernels on the same tiles, less of them: dX exact, dA / dB to fp32 atomics' order
            assert_close(got, want, torch.float32, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_through_the_kernel_matches_reference(dtype):
    layer, twin = _layer_pair(24, 40, dtype)
    layer.merge()  # the Triton merge kernel
    lorafast.set_backend("torch")
    twin.merge()  # the reference merge
    assert_close(layer.weight, twin.weight, dtype)
