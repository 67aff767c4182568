"""pytest-benchmark cases for what runs on a CPU: ``pytest bench/ --benchmark-only``.

Not part of the unit-test run (``testpaths = ["tests"]``). The providers, modes and steps are
the ones ``lorafast bench`` uses (``lorafast.benchmark_suite``); pytest-benchmark does the
timing and the statistics here. Group by mode to compare providers::

    pytest bench/ --benchmark-only --benchmark-group-by=param:mode --benchmark-columns=median,iqr
"""

from __future__ import annotations

import functools

import pytest
import torch

from lorafast.benchmark import reset_grads
from lorafast.benchmark_suite import (
    INFERENCE_MODES,
    TRAINING_MODES,
    LayerCase,
    TrainStepCase,
    build_decoder,
    default_providers,
    make_layer_inputs,
    make_layer_weights,
    make_train_step,
    prepare_step,
)

CPU = torch.device("cpu")
DTYPE = torch.float32
TRAINING_CASE = LayerCase(512, 512, 256, 16, dropout=0.1)
INFERENCE_CASE = LayerCase(512, 512, 256, 16, dropout=0.0)
DECODE_CASE = LayerCase(512, 512, 1, 16, dropout=0.0)
TRAIN_STEP_CASE = TrainStepCase(256, 688, 4, 2, layers=2, vocab=1024, batch=2, seq=128, rank=16, dropout=0.1)
PROVIDERS = {provider.name: provider for provider in default_providers()}
ROUNDS = 10

LAYER_CASES = [
    *((mode, TRAINING_CASE) for mode in TRAINING_MODES),
    *((mode, INFERENCE_CASE) for mode in INFERENCE_MODES),
    ("decode", DECODE_CASE),
]


@functools.cache
def _inputs(case: LayerCase):
    return make_layer_weights(case, CPU, DTYPE), make_layer_inputs(case, CPU, DTYPE)


@pytest.mark.parametrize("provider_name", list(PROVIDERS))
@pytest.mark.parametrize(("mode", "case"), LAYER_CASES, ids=[mode for mode, _ in LAYER_CASES])
def test_layer(benchmark, provider_name, mode, case):
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable_reason(CPU)
    if reason is not None or not provider.supports(mode):
        pytest.skip(reason or f"{provider_name} has no {mode} form")
    weights, inputs = _inputs(case)
    benchmark.extra_info.update(case=case.label, mode=mode, provider=provider_name)
    with provider.activated():
        module = provider.build(weights)
    step = prepare_step(provider, module, mode, inputs)
    with step.context():
        benchmark.pedantic(
            step.run, setup=functools.partial(reset_grads, step.grads_to_reset), rounds=ROUNDS, warmup_rounds=2
        )


@pytest.mark.parametrize("provider_name", [name for name, provider in PROVIDERS.items() if provider.adapts_models])
@pytest.mark.parametrize("mode", ["train-step"])
def test_train_step(benchmark, provider_name, mode):
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable_reason(CPU)
    if reason is not None:
        pytest.skip(reason)
    benchmark.extra_info.update(case=TRAIN_STEP_CASE.label, mode=mode, provider=provider_name)
    input_ids = torch.randint(0, TRAIN_STEP_CASE.vocab, (TRAIN_STEP_CASE.batch, TRAIN_STEP_CASE.seq))
    with provider.activated():
        model = provider.adapt_model(build_decoder(TRAIN_STEP_CASE, CPU, DTYPE), TRAIN_STEP_CASE)
        benchmark.pedantic(make_train_step(model, input_ids), rounds=ROUNDS, warmup_rounds=1)
