"""The benchmark suite behind ``lorafast bench``: providers, modes, shapes and the runner.

Providers (each computes the same function with the same weights: frozen W ``[N, K]``, LoRA
factors A ``[r, K]`` and B ``[N, r]`` in fp32, scaling ``s = alpha / r``, dropout ``p``)::

    base                 nn.Linear alone, no LoRA: the floor every LoRA layer is measured against
    naive                x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ written plainly (lorafast.reference.naive_lora_linear)
    naive+compile        torch.compile of the naive layer (skipped with the reason if compiling fails)
    peft                 peft.tuners.lora.layer.Linear, made by peft.get_peft_model
    lorafast[<backend>]  lorafast.LoraLinear with set_backend(<backend>): "torch" always,
                         "triton" when CUDA is present and lorafast.kernels has the fused kernels

Modes: ``forward`` (training forward, autograd graph recorded), ``backward`` (of a retained
graph), ``forward+backward``, ``inference-unmerged`` and ``inference-merged`` (no grad, eval),
``decode`` (inference-unmerged at M = 1 … 64). Plus a whole training step (forward, backward,
AdamW) of a 2-layer Llama decoder with LoRA on all seven projections: lorafast vs PEFT.

The timing, memory counting and reporting all come from :mod:`lorafast.benchmark`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import lorafast
from lorafast import ops, reference
from lorafast.benchmark import (
    FLOOR_PROVIDER,
    PEFT_PROVIDER,
    BenchRow,
    Step,
    Timing,
    TimingBudget,
    compare_times,
    copy_bandwidth_gbps,
    environment,
    fill_relative_metrics,
    peak_memory_bytes,
    reset_grads,
    saved_activation_bytes,
)

LORA_DTYPE = torch.float32  # PEFT's default for the adapter weights, and lorafast's
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class LayerCase:
    """One LoRA linear: ``[tokens, in_features] → [tokens, out_features]`` with rank ``rank``."""

    in_features: int
    out_features: int
    tokens: int  # M = batch · seq
    rank: int
    dropout: float

    def __post_init__(self) -> None:
        if min(self.in_features, self.out_features, self.tokens, self.rank) <= 0:
            raise ValueError(f"LayerCase sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LayerCase.dropout must be in [0, 1), got {self.dropout}")

    @property
    def label(self) -> str:
        return f"{self.in_features}->{self.out_features} M={self.tokens} r={self.rank} p={self.dropout:g}"

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank  # scaling s = 2


@dataclass(frozen=True)
class TrainStepCase:
    """A Llama decoder (``LlamaConfig``) trained for one step on ``batch × seq`` tokens."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    batch: int
    seq: int
    rank: int
    dropout: float

    @property
    def label(self) -> str:
        return f"Llama {self.layers}L h={self.hidden} ffn={self.intermediate} B={self.batch} S={self.seq} r={self.rank}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Sweep:
    """Every mode in ``modes`` for every case in ``cases``."""

    cases: tuple[LayerCase, ...]
    modes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What one ``lorafast bench`` run measures, and how long it times each measurement."""

    sweeps: tuple[Sweep, ...]
    train_steps: tuple[TrainStepCase, ...]
    budget: TimingBudget = field(default_factory=TimingBudget)


LLAMA3_8B_PROJECTIONS = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
LORAFUSION_WIDTHS = (4096, 5120, 8192)
LORAFUSION_SEQ = 256
LORAFUSION_BATCHES = (8, 16, 32)
RANKS = (8, 16, 64, 128)
DROPOUTS = (0.0, 0.1)
TRAINING_TOKENS = 8192  # e.g. batch 4 × seq 2048
DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
TRAINING_MODES = ("forward", "backward", "forward+backward")
INFERENCE_MODES = ("inference-unmerged", "inference-merged")


def llama8b_train_step(batch: int, seq: int) -> TrainStepCase:
    """Two decoder layers at Llama-3-8B width (GQA 32/8 heads), a small vocabulary, r = 16."""
    return TrainStepCase(4096, 14336, 32, 8, layers=2, vocab=1024, batch=batch, seq=seq, rank=16, dropout=0.1)


def full_plan() -> Plan:
    """The whole matrix (meant for a GPU: about a thousand measurements)."""
    llama = [
        LayerCase(k, n, TRAINING_TOKENS, rank, p)
        for (k, n), rank, p in itertools.product(LLAMA3_8B_PROJECTIONS, RANKS, DROPOUTS)
    ]
    lorafusion = [  # without the cases the Llama sweep has already (4096², batch 32: M = 8192, r = 16)
        case
        for width, batch, p in itertools.product(LORAFUSION_WIDTHS, LORAFUSION_BATCHES, DROPOUTS)
        if (case := LayerCase(width, width, batch * LORAFUSION_SEQ, 16, p)) not in llama
    ]
    inference = [
        LayerCase(k, n, TRAINING_TOKENS, rank, 0.0)
        for (k, n), rank in itertools.product(LLAMA3_8B_PROJECTIONS, (16, 64))
    ]
    decode = [LayerCase(k, n, m, 16, 0.0) for (k, n), m in itertools.product(LLAMA3_8B_PROJECTIONS, DECODE_TOKENS)]
    return Plan(
        sweeps=(
            Sweep(tuple(llama), TRAINING_MODES),
            Sweep(tuple(lorafusion), TRAINING_MODES),
            Sweep(tuple(inference), INFERENCE_MODES),
            Sweep(tuple(decode), ("decode",)),
        ),
        train_steps=(llama8b_train_step(batch=4, seq=1024),),
    )


def quick_plan(device: torch.device) -> Plan:
    """A reduced set: on CUDA two Llama projections; on the CPU a 1024-wide layer that finishes in about a minute."""
    if device.type == "cuda":
        training = (LayerCase(4096, 4096, TRAINING_TOKENS, 16, 0.0), LayerCase(4096, 4096, TRAINING_TOKENS, 16, 0.1))
        training += (LayerCase(4096, 14336, TRAINING_TOKENS, 16, 0.0),)
        inference = (LayerCase(4096, 4096, TRAINING_TOKENS, 16, 0.0),)
        decode = tuple(LayerCase(4096, 4096, m, 16, 0.0) for m in (1, 16, 64))
        return Plan(
            sweeps=(Sweep(training, TRAINING_MODES), Sweep(inference, INFERENCE_MODES), Sweep(decode, ("decode",))),
            train_steps=(llama8b_train_step(batch=1, seq=1024),),
        )
    training = (LayerCase(1024, 1024, 512, 16, 0.0), LayerCase(1024, 1024, 512, 16, 0.1))
    return Plan(
        sweeps=(
            Sweep(training, TRAINING_MODES),
            Sweep((LayerCase(1024, 1024, 512, 16, 0.0),), INFERENCE_MODES),
            Sweep(tuple(LayerCase(1024, 1024, m, 16, 0.0) for m in (1, 16)), ("decode",)),
        ),
        train_steps=(TrainStepCase(256, 688, 4, 2, layers=2, vocab=1024, batch=2, seq=128, rank=16, dropout=0.1),),
        budget=TimingBudget(cpu_seconds=0.3, cpu_warmup_calls=1, cpu_min_calls=3, cpu_max_calls=20),
    )


# --------------------------------------------------------------------------- work models


def flop_count(case: LayerCase, mode: str, with_lora: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) the mode must do: the base GEMMs plus, with LoRA, the rank-r products.

    forward ``2MKN + 2Mr(K + N)``; backward (no dW: W is frozen) ``2MNK + 4Mr(K + N)``.
    """
    m, k, n, r = case.tokens, case.in_features, case.out_features, case.rank
    forward = 2 * m * k * n + (2 * m * r * (k + n) if with_lora else 0)
    backward = 2 * m * n * k + (4 * m * r * (k + n) if with_lora else 0)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}.get(mode, forward)


def bytes_moved(case: LayerCase, mode: str, element_bytes: int, with_lora: bool = True) -> int:
    """The fewest bytes the mode must read and write (every tensor once; LoRA factors and u in fp32).

    forward: x, W, y (+ A, B, and u written for backward when training); backward: dY, W, dX
    (+ x for dA, u, A, B, dA, dB); inference: x, W, y (+ A, B unmerged).
    """
    m, k, n, r = case.tokens, case.in_features, case.out_features, case.rank
    lora_bytes = LORA_DTYPE.itemsize
    factors = r * (k + n) * lora_bytes if with_lora else 0
    inference = (m * k + n * k + m * n) * element_bytes + factors
    forward = inference + (m * r * lora_bytes if with_lora else 0)
    backward = (m * n + n * k + m * k) * element_bytes
    if with_lora:
        backward += m * k * element_bytes + m * r * lora_bytes + 2 * factors
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}.get(mode, inference)


# --------------------------------------------------------------------------- weights and inputs


@dataclass
class LayerWeights:
    """The one set of weights every provider of a case gets."""

    weight: torch.Tensor  # [N, K], the activation dtype
    lora_A: torch.Tensor  # [r, K], fp32
    lora_B: torch.Tensor  # [N, r], fp32
    lora_alpha: float
    dropout: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


def random_lora_factors(
    generator: torch.Generator, rank: int, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, K], B [N, r])`` in fp32, both non-zero (B is not PEFT's zero init, so the LoRA branch counts)."""
    device = generator.device
    lora_A = torch.randn(rank, in_features, generator=generator, device=device, dtype=LORA_DTYPE) / in_features**0.5
    lora_B = torch.randn(out_features, rank, generator=generator, device=device, dtype=LORA_DTYPE) / rank**0.5
    return lora_A, lora_B


def make_layer_weights(case: LayerCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LayerWeights:
    generator = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(case.out_features, case.in_features, generator=generator, device=device, dtype=dtype)
    lora_A, lora_B = random_lora_factors(generator, case.rank, case.in_features, case.out_features)
    return LayerWeights(weight / case.in_features**0.5, lora_A, lora_B, case.lora_alpha, case.dropout)


@dataclass
class LayerInputs:
    x: torch.Tensor  # [M, K], requires grad (an intermediate activation)
    grad_y: torch.Tensor  # [M, N]


def make_layer_inputs(case: LayerCase, device: torch.device, dtype: torch.dtype, seed: int = 1) -> LayerInputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.tokens, case.in_features, generator=generator, device=device, dtype=dtype)
    grad_y = torch.randn(case.tokens, case.out_features, generator=generator, device=device, dtype=dtype)
    return LayerInputs(x.requires_grad_(True), grad_y)


def _frozen_linear(weights: LayerWeights) -> nn.Linear:
    out_features, in_features = weights.weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device=weights.weight.device, dtype=weights.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weights.weight)
    return linear.requires_grad_(False)


def missing_package(name: str) -> str | None:
    """Why ``import name`` fails (``"<name> is not installed"``), or None when it imports."""
    try:
        importlib.import_module(name)
    except ImportError as error:
        return f"{name} is not installed ({error})"
    return None


@contextlib.contextmanager
def using_backend(name: str) -> Iterator[None]:
    """Run the block with ``lorafast.set_backend(name)``, restoring the previous backend after."""
    previous = lorafast.get_backend()
    lorafast.set_backend(name)
    try:
        yield
    finally:
        lorafast.set_backend(previous)


# --------------------------------------------------------------------------- providers


class NaiveLoraLinear(nn.Module):
    """:func:`lorafast.reference.naive_lora_linear` as a module: frozen ``weight``, trainable ``lora_A`` / ``lora_B``."""

    def __init__(self, weights: LayerWeights) -> None:
        super().__init__()
        self.weight = nn.Parameter(weights.weight.clone(), requires_grad=False)
        self.lora_A = nn.Parameter(weights.lora_A.clone())
        self.lora_B = nn.Parameter(weights.lora_B.clone())
        self.scaling = weights.scaling
        self.dropout = weights.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.naive_lora_linear(
            x, self.weight, None, self.lora_A, self.lora_B, self.scaling, self.dropout, self.training
        )


class Provider:
    """One implementation of the LoRA linear. Subclasses build a module from :class:`LayerWeights`."""

    name: str
    merges = False  # whether it has a merged inference form
    adapts_models = False  # whether it takes part in the training-step benchmark
    failure_is_skip = False  # a failure means "not available here" (torch.compile), not a bug

    def supports(self, mode: str) -> bool:
        return mode != "inference-merged" or self.merges

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def activated(self) -> contextlib.AbstractContextManager:
        """The context the provider's modules run in (e.g. a lorafast backend)."""
        return contextlib.nullcontext()

    def build(self, weights: LayerWeights) -> nn.Module:
        raise NotImplementedError

    def merge(self, module: nn.Module) -> None:
        raise NotImplementedError(f"{self.name} has no merged form")

    def adapt_model(self, model: nn.Module, case: TrainStepCase) -> nn.Module:
        raise NotImplementedError(f"{self.name} does not adapt whole models")

    def kernel_path(self, case: LayerCase, mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """Which kernels the provider dispatches to for ``case`` in ``mode`` (None: not a choice it makes)."""
        return None


class BaseLayerProvider(Provider):
    """The frozen ``nn.Linear`` alone: what any LoRA layer costs at the least. It is its own merged form."""

    name = FLOOR_PROVIDER
    merges = True

    def build(self, weights: LayerWeights) -> nn.Module:
        return _frozen_linear(weights)

    def merge(self, module: nn.Module) -> None:
        pass


class NaiveProvider(Provider):
    name = "naive"

    def build(self, weights: LayerWeights) -> nn.Module:
        return NaiveLoraLinear(weights)


class CompiledNaiveProvider(Provider):
    """``torch.compile`` of the naive layer; dynamo's caches are reset per case so no recompile limit is hit."""

    name = "naive+compile"
    failure_is_skip = True

    def build(self, weights: LayerWeights) -> nn.Module:
        torch._dynamo.reset()
        return torch.compile(NaiveLoraLinear(weights))


class _PeftWrapper(nn.Module):
    """The smallest model ``peft.get_peft_model`` can adapt: one linear named ``proj``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PeftProvider(Provider):
    """PEFT's ``lora.Linear`` (adapter weights upcast to fp32, PEFT's default ``autocast_adapter_dtype``)."""

    name = PEFT_PROVIDER
    merges = True
    adapts_models = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return missing_package("peft")

    def _config(self, rank: int, lora_alpha: float, dropout: float, targets: Sequence[str]):
        import peft

        return peft.LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=list(targets))

    def build(self, weights: LayerWeights) -> nn.Module:
        import peft

        config = self._config(weights.rank, weights.lora_alpha, weights.dropout, ["proj"])
        layer = peft.get_peft_model(_PeftWrapper(_frozen_linear(weights)), config).base_model.model.proj
        assign_lora_factors(peft_lora_factors(layer), [(weights.lora_A, weights.lora_B)])
        return layer

    def merge(self, module: nn.Module) -> None:
        module.merge()

    def adapt_model(self, model: nn.Module, case: TrainStepCase) -> nn.Module:
        import peft

        config = self._config(case.rank, 2.0 * case.rank, case.dropout, LLAMA_PROJECTIONS)
        adapted = peft.get_peft_model(model, config)
        assign_lora_factors(peft_lora_factors(adapted), seeded_factors_like(peft_lora_factors(adapted)))
        return adapted


class LorafastProvider(Provider):
    """``lorafast.LoraLinear`` run with ``lorafast.set_backend(backend)``."""

    merges = True
    adapts_models = True

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"lorafast[{backend}]"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.backend != "triton":
            return None
        if device.type != "cuda":
            return "the Triton backend needs CUDA"
        try:
            with using_backend(self.backend):
                pass
        except RuntimeError as error:
            return str(error)
        return None

    def activated(self) -> contextlib.AbstractContextManager:
        return using_backend(self.backend)

    def kernel_path(self, case: LayerCase, mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """The fused kernels' dispatch (``lorafast.kernels.choose_main_gemm`` / ``choose_reduction``):
        the forward's small-M kernel or main GEMM, and in training the backward's main GEMM and how
        dA / dB are summed; asked after the timing, so a main GEMM measured per shape is the one
        the case ran. None off the Triton backend and for merged inference (the base GEMM)."""
        if mode == "inference-merged":
            return None
        with self.activated():
            if not ops.use_triton(device):
                return None
            from lorafast import kernels
        M, K, N = case.tokens, case.in_features, case.out_features
        path = f"fwd {kernels.choose_main_gemm(M, N, K, device, dtype)}"
        if mode in TRAINING_MODES:
            backward = kernels.choose_main_gemm(M, K, N, device, dtype, direction="backward")
            path += f", bwd {backward}, dA/dB {kernels.choose_reduction()}"
        return path

    def build(self, weights: LayerWeights) -> nn.Module:
        layer = lorafast.LoraLinear(
            _frozen_linear(weights), r=weights.rank, lora_alpha=weights.lora_alpha, lora_dropout=weights.dropout
        )
        assign_lora_factors([(layer.lora_A, layer.lora_B)], [(weights.lora_A, weights.lora_B)])
        return layer

    def merge(self, module: nn.Module) -> None:
        module.merge()

    def adapt_model(self, model: nn.Module, case: TrainStepCase) -> nn.Module:
        config = lorafast.LoraConfig(
            r=case.rank, lora_alpha=2.0 * case.rank, lora_dropout=case.dropout, target_modules=list(LLAMA_PROJECTIONS)
        )
        adapted = lorafast.apply_lora(model, config)
        factors = [(layer.lora_A, layer.lora_B) for _, layer in lorafast.lora_layers(adapted)]
        assign_lora_factors(factors, seeded_factors_like(factors))
        return adapted


def default_providers() -> list[Provider]:
    return [
        BaseLayerProvider(),
        NaiveProvider(),
        CompiledNaiveProvider(),
        PeftProvider(),
        LorafastProvider("torch"),
        LorafastProvider("triton"),
    ]


def peft_lora_factors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(A [r, K], B [N, r])`` parameters of every PEFT LoRA linear in ``model``, in module order."""
    from peft.tuners.lora.layer import Linear

    return [
        (module.lora_A["default"].weight, module.lora_B["default"].weight)
        for module in model.modules()
        if isinstance(module, Linear)
    ]


def seeded_factors_like(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh non-zero ``(A, B)`` for each pair, the same for the same shapes in the same order."""
    generator = torch.Generator(device=factors[0][0].device).manual_seed(seed)
    return [
        random_lora_factors(generator, lora_A.shape[0], lora_A.shape[1], lora_B.shape[0]) for lora_A, lora_B in factors
    ]


@torch.no_grad()
def assign_lora_factors(
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]], values: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Copy each ``(A, B)`` of ``values`` into the matching pair of ``targets``."""
    if len(targets) != len(values):
        raise ValueError(f"expected {len(values)} LoRA layers, found {len(targets)}")
    for (target_A, target_B), (value_A, value_B) in zip(targets, values, strict=True):
        target_A.copy_(value_A)
        target_B.copy_(value_B)


# --------------------------------------------------------------------------- modes


def _trainable(module: nn.Module, inputs: LayerInputs) -> tuple[torch.Tensor, ...]:
    return (inputs.x, *(parameter for parameter in module.parameters() if parameter.requires_grad))


def _forward_step(module: nn.Module, inputs: LayerInputs) -> Step:
    module.train()
    return Step(lambda: module(inputs.x))


def _backward_step(module: nn.Module, inputs: LayerInputs) -> Step:
    module.train()
    output = module(inputs.x)
    return Step(lambda: output.backward(inputs.grad_y, retain_graph=True), _trainable(module, inputs))


def _forward_backward_step(module: nn.Module, inputs: LayerInputs) -> Step:
    module.train()
    return Step(lambda: module(inputs.x).backward(inputs.grad_y), _trainable(module, inputs))


def _inference_step(module: nn.Module, inputs: LayerInputs) -> Step:
    module.eval()
    x = inputs.x.detach()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return Step(run)


MODE_STEPS: dict[str, Callable[[nn.Module, LayerInputs], Step]] = {
    "forward": _forward_step,
    "backward": _backward_step,
    "forward+backward": _forward_backward_step,
    "inference-unmerged": _inference_step,
    "inference-merged": _inference_step,
    "decode": _inference_step,
}


def prepare_step(provider: Provider, module: nn.Module, mode: str, inputs: LayerInputs) -> Step:
    """Put ``module`` in the state ``mode`` needs (merging it for ``inference-merged``) and return the step,
    which runs in the provider's context."""
    if mode not in MODE_STEPS:
        raise ValueError(f"unknown benchmark mode {mode!r}; choose from {sorted(MODE_STEPS)}")
    with provider.activated():
        if mode == "inference-merged":
            provider.merge(module)
        step = MODE_STEPS[mode](module, inputs)
    return dataclasses.replace(step, context=provider.activated)


# --------------------------------------------------------------------------- training step


def build_decoder(case: TrainStepCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` for ``case`` (no weights are downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads,
        num_hidden_layers=case.layers,
        vocab_size=case.vocab,
        max_position_embeddings=case.seq,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def make_train_step(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], None]:
    """One step: causal-LM loss on ``input_ids [B, S]``, backward, AdamW on the trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------- runner


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[object | None]:
    """A tqdm bar on stderr counting ``total`` runs; None when disabled or tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield None
        return
    with tqdm(total=total, desc="lorafast bench", unit="run") as bar:
        yield bar


def _failure_status(provider: Provider, error: Exception) -> str:
    first_line = next(iter(str(error).strip().splitlines()), "")
    message = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return f"skipped: torch.compile failed ({message})" if provider.failure_is_skip else f"error: {message}"


@dataclass
class Contender:
    """A provider taking part in one case: its module (or model), what it saves for backward, and
    the status that marks it out of the remaining modes (a torch.compile failure)."""

    provider: Provider
    module: nn.Module
    saved_bytes: int | None = None
    failure: str | None = None


class Runner:
    """Runs a :class:`Plan` on one device and dtype, one :class:`BenchRow` per (case, mode, provider).

    Within a (case, mode) every provider is first called once (which compiles, and turns any
    failure into a row instead of a crash), then all are timed together with
    :func:`~lorafast.benchmark.compare_times`.
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        budget: TimingBudget,
        providers: Sequence[Provider] | None = None,
    ) -> None:
        self.device, self.dtype, self.budget = device, dtype, budget
        self.providers = list(providers) if providers is not None else default_providers()
        self.environment = environment(device)
        self.copy_gbps = copy_bandwidth_gbps(device, budget)
        self.progress = None  # the tqdm bar while a plan runs

    def _row(self, case: LayerCase | TrainStepCase, mode: str, provider: Provider, **metrics) -> BenchRow:
        layer_shape = (case.in_features, case.out_features) if isinstance(case, LayerCase) else (None, None)
        if self.progress is not None:
            self.progress.update(1)
        return BenchRow(
            suite="layer" if isinstance(case, LayerCase) else "train-step",
            case=case.label,
            mode=mode,
            provider=provider.name,
            dtype=str(self.dtype).removeprefix("torch."),
            tokens=case.tokens,
            rank=case.rank,
            dropout=case.dropout,
            in_features=layer_shape[0],
            out_features=layer_shape[1],
            **metrics,
            **self.environment,
        )

    def measurement_count(self, plan: Plan) -> int:
        layer = sum(
            sum(provider.supports(mode) for provider in self.providers for mode in sweep.modes) * len(sweep.cases)
            for sweep in plan.sweeps
        )
        return layer + len(plan.train_steps) * sum(provider.adapts_models for provider in self.providers)

    def run(self, plan: Plan, show_progress: bool = True) -> list[BenchRow]:
        """The plan's rows. Interrupted (Ctrl-C, or SIGINT from bench/gpu_check.sh's stage timeout),
        it returns the rows of the cases finished so far and sets ``self.interrupted``."""
        rows: list[BenchRow] = []
        self.interrupted = False
        with progress_bar(self.measurement_count(plan), show_progress) as self.progress:
            try:
                for sweep in plan.sweeps:
                    for case in sweep.cases:
                        self._show(case.label)
                        rows += self.run_layer_case(case, sweep.modes)
                for case in plan.train_steps:
                    self._show(case.label)
                    rows += self.run_train_step(case)
            except KeyboardInterrupt:
                self.interrupted = True
            finally:
                self.progress = None
        fill_relative_metrics(rows)
        return rows

    def _show(self, label: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(label)

    def _in_provider_order(self, rows: list[BenchRow], modes: Sequence[str]) -> list[BenchRow]:
        provider_index = {provider.name: index for index, provider in enumerate(self.providers)}
        return sorted(rows, key=lambda row: (modes.index(row.mode), provider_index[row.provider]))

    def run_layer_case(self, case: LayerCase, modes: Sequence[str]) -> list[BenchRow]:
        """Every provider on every mode of ``case`` (merged inference last: it merges the weights)."""
        modes = sorted(modes, key=lambda mode: mode == "inference-merged")
        weights = make_layer_weights(case, self.device, self.dtype)
        inputs = make_layer_inputs(case, self.device, self.dtype)
        rows: list[BenchRow] = []
        contenders: list[Contender] = []
        for provider in self.providers:
            provider_modes = [mode for mode in modes if provider.supports(mode)]
            reason = provider.unavailable_reason(self.device)
            if reason is not None:
                rows += [self._row(case, mode, provider, status=f"skipped: {reason}") for mode in provider_modes]
                continue
            try:
                contenders.append(
                    self._build(provider, weights, inputs, training=bool(set(modes) & set(TRAINING_MODES)))
                )
            except Exception as error:  # reported in the rows, the run goes on
                rows += [
                    self._row(case, mode, provider, status=_failure_status(provider, error)) for mode in provider_modes
                ]
        for mode in modes:
            rows += self._measure_mode(case, mode, [c for c in contenders if c.provider.supports(mode)], inputs)
        self._release_memory()
        return self._in_provider_order(rows, modes)

    def _build(self, provider: Provider, weights: LayerWeights, inputs: LayerInputs, training: bool) -> Contender:
        with provider.activated():
            module = provider.build(weights)
            saved = saved_activation_bytes(lambda: module.train()(inputs.x), module.parameters()) if training else None
        return Contender(provider, module, saved)

    def _trial_steps(self, contenders: Sequence[Contender], make_step) -> tuple[dict[str, Step], dict[str, str]]:
        """``make_step(contender)`` for each, called once: the steps that ran, and the failures by provider name."""
        steps, failures = {}, {}
        for contender in contenders:
            name = contender.provider.name
            if contender.failure is not None:
                failures[name] = contender.failure
                continue
            try:
                step = make_step(contender)
                reset_grads(step.grads_to_reset)
                with step.context():
                    step.run()
                steps[name] = step
            except Exception as error:
                failures[name] = _failure_status(contender.provider, error)
                if contender.provider.failure_is_skip:
                    contender.failure = failures[name]
        return steps, failures

    def _compare(
        self,
        case: LayerCase | TrainStepCase,
        mode: str,
        contenders: Sequence[Contender],
        make_step: Callable[[Contender], Step],
        extra_metrics: Callable[[Contender, Timing], dict],
    ) -> list[BenchRow]:
        """Trial-call, then time together, the contenders' steps; one row each (failed ones say why)."""
        steps, failures = self._trial_steps(contenders, make_step)
        timings = compare_times(steps, self.device, self.budget)
        rows = []
        for contender in contenders:
            name = contender.provider.name
            if name in failures:
                rows.append(self._row(case, mode, contender.provider, status=failures[name]))
                continue
            timing = timings[name]
            rows.append(
                self._row(
                    case,
                    mode,
                    contender.provider,
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    samples=timing.samples,
                    peak_memory_bytes=peak_memory_bytes(steps[name], self.device),
                    **extra_metrics(contender, timing),
                )
            )
        return rows

    def _measure_mode(
        self, case: LayerCase, mode: str, contenders: Sequence[Contender], inputs: LayerInputs
    ) -> list[BenchRow]:
        def work_rates(contender: Contender, timing: Timing) -> dict:
            with_lora = not isinstance(contender.provider, BaseLayerProvider) and mode != "inference-merged"
            seconds = timing.median_ms * 1e-3
            gbps = bytes_moved(case, mode, self.dtype.itemsize, with_lora) / seconds / 1e9
            return dict(
                tflops=flop_count(case, mode, with_lora) / seconds / 1e12,
                gbps=gbps,
                roofline_fraction=gbps / self.copy_gbps,
                saved_activation_bytes=contender.saved_bytes if mode in TRAINING_MODES else None,
                kernel_path=contender.provider.kernel_path(case, mode, self.device, self.dtype),
            )

        return self._compare(
            case, mode, contenders, lambda c: prepare_step(c.provider, c.module, mode, inputs), work_rates
        )

    def run_train_step(self, case: TrainStepCase) -> list[BenchRow]:
        """One training step of the decoder with each provider's LoRA (same base weights, same LoRA factors)."""
        providers = [provider for provider in self.providers if provider.adapts_models]
        reasons = {p.name: missing_package("transformers") or p.unavailable_reason(self.device) for p in providers}
        rows = [
            self._row(case, "train-step", p, status=f"skipped: {reasons[p.name]}") for p in providers if reasons[p.name]
        ]
        runnable = [provider for provider in providers if not reasons[provider.name]]
        if runnable:
            generator = torch.Generator(device=self.device).manual_seed(2)
            input_ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=generator, device=self.device)
            base_model = build_decoder(case, self.device, self.dtype)
            contenders = []
            for provider in runnable:
                try:
                    contenders.append(self._adapt(provider, base_model, case, input_ids))
                except Exception as error:
                    rows.append(self._row(case, "train-step", provider, status=_failure_status(provider, error)))
            del base_model
            rows += self._compare(
                case,
                "train-step",
                contenders,
                lambda c: Step(make_train_step(c.module, input_ids), context=c.provider.activated),
                lambda c, timing: dict(
                    tokens_per_s=case.tokens / (timing.median_ms * 1e-3), saved_activation_bytes=c.saved_bytes
                ),
            )
            del contenders
        self._release_memory()
        return self._in_provider_order(rows, ["train-step"])

    def _adapt(
        self, provider: Provider, base_model: nn.Module, case: TrainStepCase, input_ids: torch.Tensor
    ) -> Contender:
        with provider.activated():
            model = provider.adapt_model(copy.deepcopy(base_model), case).train()
            saved = saved_activation_bytes(
                lambda: model(input_ids=input_ids, labels=input_ids).loss, model.parameters()
            )
        return Contender(provider, model, saved)

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run_plan(
    plan: Plan, device: torch.device, dtype: torch.dtype, show_progress: bool = True
) -> tuple[list[BenchRow], float, bool]:
    """Run ``plan``; returns the rows (ratios filled in), the measured copy bandwidth in GB/s and
    whether the run was interrupted (the rows then are the cases finished before)."""
    runner = Runner(device, dtype, plan.budget)
    rows = runner.run(plan, show_progress)
    return rows, runner.copy_gbps, runner.interrupted
