"""The LoRA linear op on the reference path: autograd contract, dropout mask, saved memory, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import peft
import pytest
import torch
from probes import observed_dropout_masks, partial_gradient_run
from tolerances import assert_close

import lorafast
from lorafast import ops, reference
from lorafast.benchmark import saved_activation_bytes


def _operands(M=6, K=5, N=7, r=3, dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return (
        make(M, K),
        torch.randn(N, K, dtype=dtype),
        torch.randn(N, dtype=dtype) if bias else None,
        make(r, K),
        make(N, r),
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_fp64(dropout_p):
    x, weight, bias, lora_A, lora_B = _operands()
    seed = torch.tensor(1234)

    def forward(x, lora_A, lora_B):
        return ops.lora_forward(x, weight, bias, lora_A, lora_B, 0.7, dropout_p, seed, False)[0]

    assert torch.autograd.gradcheck(forward, (x, lora_A, lora_B))


def test_gradcheck_trainable_bias_and_weight():
    x, weight, bias, lora_A, lora_B = _operands()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    seed = torch.tensor(0)
    assert torch.autograd.gradcheck(
        lambda *args: ops.lora_forward(*args, 2.0, 0.0, seed, False)[0], (x, weight, bias, lora_A, lora_B)
    )


@pytest.mark.parametrize("needs_grad", [(True, True), (True, False), (False, True)], ids=["all", "dx", "lora"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(dropout_p, needs_grad):
    x, weight, bias, lora_A, lora_B = _operands(dtype=torch.float32)
    seed = torch.tensor(77)
    torch.library.opcheck(ops.lora_forward, (x, weight, bias, lora_A, lora_B, 0.5, dropout_p, seed, False))
    y, u = ops.lora_forward(x, weight, bias, lora_A, lora_B, 0.5, dropout_p, seed, False)
    grad_y = torch.randn_like(y)
    torch.library.opcheck(
        ops.lora_backward,
        (
            grad_y,
            x.detach(),
            weight,
            lora_A.detach(),
            lora_B.detach(),
            u.detach(),
            0.5,
            dropout_p,
            seed,
            False,
            *needs_grad,
        ),
    )


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = lorafast.LoraLinear(torch.nn.Linear(16, 24), r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    compiled = torch.compile(layer, fullgraph=True)(x)
    compiled.sum().backward()
    assert_close(compiled, eager)
    for got, want in zip([x.grad, layer.lora_A.grad, layer.lora_B.grad], eager_grads, strict=True):
        assert_close(got, want)


def test_backward_uses_the_forward_dropout_mask_and_keep_rate_is_1_minus_p():
    dropout_p, M, K = 0.1, 2048, 64
    forward_mask, backward_mask = observed_dropout_masks(M, K, dropout_p)
    assert torch.equal(forward_mask, backward_mask)
    n = forward_mask.numel()
    keep_rate = forward_mask.float().mean().item()
    assert abs(keep_rate - (1 - dropout_p)) <= 3 * math.sqrt(dropout_p * (1 - dropout_p) / n)


def test_dropout_matches_a_reference_that_stores_the_mask():
    """Forward and all gradients equal plain autograd applied with the very mask regenerated from the seed."""
    torch.manual_seed(0)
    layer = lorafast.LoraLinear(torch.nn.Linear(12, 10), r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False)
    x = torch.randn(9, 12, requires_grad=True)
    rng_state = torch.get_rng_state()
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.set_rng_state(rng_state)  # the forward's seed is the first draw after that state
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    mask = reference.dropout_keep_mask(seed, (9, 12), 0.3, x.device)
    assert 0 < mask.sum() < mask.numel()
    x_ref = x.detach().clone().requires_grad_(True)
    A_ref, B_ref = (
        layer.lora_A.detach().clone().requires_grad_(True),
        layer.lora_B.detach().clone().requires_grad_(True),
    )
    y_ref = x_ref @ layer.weight.t() + layer.bias + layer.scaling * ((x_ref * mask / 0.7) @ A_ref.t()) @ B_ref.t()
    y_ref.backward(grad_y)
    assert_close(y, y_ref)
    for got, want in [(x.grad, x_ref.grad), (layer.lora_A.grad, A_ref.grad), (layer.lora_B.grad, B_ref.grad)]:
        assert_close(got, want)


def test_eager_seed_is_drawn_on_the_host_whatever_the_default_device():
    """The eager dropout seed is a CPU draw even under ``torch.set_default_device`` (here "meta",
    where a tensor has no value to read): on a GPU default device it would cost a launch per call
    and a synchronizing read in the reference path."""
    torch.manual_seed(0)
    layer = lorafast.LoraLinear(torch.nn.Linear(12, 10), r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False)
    x = torch.randn(9, 12, requires_grad=True)
    rng_state = torch.get_rng_state()
    want = layer(x)
    torch.set_rng_state(rng_state)
    with torch.device("meta"):
        got = layer(x)
    assert got.device == x.device
    assert torch.equal(got, want)  # the same CPU generator's draw, so the same mask


def test_saved_memory_is_x_plus_u_only_and_shared_input_saved_once():
    M, K, N, r = 256, 128, 96, 16
    torch.manual_seed(0)
    config = dict(r=r, lora_alpha=32, lora_dropout=0.1)
    layers = [lorafast.LoraLinear(torch.nn.Linear(K, N, dtype=torch.bfloat16), **config).train() for _ in range(3)]
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    x_bytes, u_bytes = x.numel() * x.element_size(), M * r * 4
    parameters = [p for layer in layers for p in layer.parameters()]
    one = saved_activation_bytes(lambda: layers[0](x), parameters)
    shared = saved_activation_bytes(lambda: [layer(x) for layer in layers], parameters)

    peft_layer = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(K, N, dtype=torch.bfloat16)),
        peft.LoraConfig(target_modules=["0"], **config),
    ).train()
    peft_bytes = saved_activation_bytes(lambda: peft_layer(x), list(peft_layer.parameters()))
    print(
        f"\nsaved bytes per bf16 LoRA linear, M={M} K={K} r={r} dropout 0.1: lorafast {one}, PEFT {peft_bytes}, "
        f"x alone {x_bytes}"
    )
    assert one == x_bytes + u_bytes  # the bound, bytes(x) + M·r·4, exactly
    assert shared == x_bytes + 3 * u_bytes
    assert peft_bytes > one


@pytest.mark.parametrize("frozen", ["input", "adapter"])
def test_backward_computes_and_saves_only_the_gradients_asked_for(frozen):
    """x without a gradient (a frozen embedding's output): no dX, so no ``dY W``; a frozen adapter:
    no dA / dB, and neither x nor u is kept (dX needs only du and the regenerated mask)."""
    run = partial_gradient_run(frozen, reference)
    assert run["flags"] == [(frozen != "input", frozen != "adapter")]
    for got, want, name in zip(run["partial"], run["full"], ["dX", "dA", "dB"], strict=True):
        if (name == "dX") == (frozen == "input"):
            assert got is None, name
        else:
            assert torch.equal(got, want), name
    expected = run["x_bytes"] + 70 * 4 * 4 if frozen == "input" else 0  # x and u [70, 4] fp32, or nothing
    assert run["saved"] == expected


def test_reference_backward_skips_what_is_not_needed():
    x, weight, _, lora_A, lora_B = (t.detach() if t is not None else t for t in _operands())
    grad_y, u = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    full = reference.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 0.5, 0.0, None)
    only_x = reference.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 0.5, 0.0, None, needs_grad_lora=False)
    only_lora = reference.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 0.5, 0.0, None, needs_grad_x=False)
    assert only_x[1] is None and only_x[2] is None and torch.equal(only_x[0], full[0])
    assert only_lora[0] is None and torch.equal(only_lora[1], full[1]) and torch.equal(only_lora[2], full[2])


def test_non_contiguous_and_3d_inputs_match_reference():
    torch.manual_seed(0)
    layer = lorafast.LoraLinear(torch.nn.Linear(8, 6), r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(4, 8, 5).transpose(1, 2)  # [4, 5, 8], non-contiguous
    expected = reference.naive_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 2.0, 0.0)
    assert_close(layer(x), expected)
    assert_close(layer(x[:, 1]), expected[:, 1])  # a strided 2D view


def test_wrong_input_shape_and_dtype_are_named():
    layer = lorafast.LoraLinear(torch.nn.Linear(8, 6), r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\], got \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))


def test_backend_selection(monkeypatch):
    assert lorafast.get_backend() == "auto"
    assert ops.use_triton(torch.device("cpu")) is False
    with pytest.raises(ValueError, match="unknown lorafast backend 'cuda'"):
        lorafast.set_backend("cuda")
    lorafast.set_backend("torch")
    try:
        assert ops.use_triton(torch.device("cpu")) is False
    finally:
        lorafast.set_backend("auto")


def _backend_in_fresh_process(value: str) -> subprocess.CompletedProcess:
    code = "import lorafast; print(lorafast.get_backend())"
    env = {**os.environ, "LORAFAST_BACKEND": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_backend_environment_variable():
    assert _backend_in_fresh_process("torch").stdout.strip() == "torch"
    failed = _backend_in_fresh_process("fast")
    assert failed.returncode != 0 and "unknown lorafast backend 'fast'" in failed.stderr


def test_lora_weights_narrower_than_x_never_round_the_frozen_product():
    """bf16 LoRA weights on an fp32 layer: y and dX are the frozen layer's exactly while B = 0 (as
    PEFT), and with a small B (a LoRA term ~1e-3, whose bf16 rounding is ~1e-5) within fp32's
    tolerance of the exact result: the sum is in fp32, not in the LoRA weights' bf16 (which
    would be off by ~1e-2 on outputs ~10)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(64, 48), torch.randn(40, 48), torch.randn(40)
    grad_y = torch.randn(64, 40)
    lora_A, lora_B = torch.randn(4, 48, dtype=torch.bfloat16), torch.zeros(40, 4, dtype=torch.bfloat16)
    y, u = reference.lora_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.0, None)
    grad_x = reference.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 2.0, 0.0, None)[0]
    assert torch.equal(y, torch.nn.functional.linear(x, weight, bias)) and torch.equal(grad_x, grad_y @ weight)
    lora_B = (torch.randn(40, 4) * 1e-4).to(torch.bfloat16)
    y, u = reference.lora_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.0, None)
    grad_x = reference.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 2.0, 0.0, None)[0]
    exact = reference.lora_forward(*(t.double() for t in (x, weight, bias, lora_A, lora_B)), 2.0, 0.0, None)[0]
    exact_grad_x = grad_y.double() @ weight.double() + 2.0 * (grad_y.double() @ lora_B.double()) @ lora_A.double()
    assert_close(y, exact.float(), torch.float32)
    assert_close(grad_x, exact_grad_x.float(), torch.float32)
