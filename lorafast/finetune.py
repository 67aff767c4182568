"""``lorafast finetune``: LoRA fine-tuning of a local transformers checkpoint on a CSV / TSV / JSONL file.

The job: read the data (``lorafast.datasets``), load the model (``AutoModelForSequenceClassification``
for ``seq-cls``, ``AutoModelForCausalLM`` for ``causal-lm``), adapt it with ``lorafast.apply_lora``,
train with AdamW and a linear learning-rate decay (a tqdm bar shows the loss and tokens/s),
evaluate (accuracy for classification; mean token loss and perplexity ``exp(loss)`` for a
causal LM), then write into ``--out``:

- ``adapter/``       the adapter in PEFT's format (``lorafast.save_adapter``),
- ``merged/``        the merged model (``merge_and_unload`` + ``save_pretrained``) and the tokenizer,
- ``metrics.json``   the evaluation before and after training, the per-step losses, parameter
                     counts, adapter size, the merged-vs-unmerged output difference and timings,
- ``loss_curve.png`` the per-step training loss (needs matplotlib).

Everything is written into a temporary folder beside ``--out`` and renamed into place at the
end, so a failed run leaves no half-written output. The same ``--seed`` gives the same metrics
(all but ``timing``). The building blocks (``load_model``, ``tokenize``, ``train``, ``evaluate``)
are public so other jobs (the demo, the PEFT comparison bench) run the same loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafast.config import LoraConfig
from lorafast.datasets import LABEL_COLUMN_NAMES, TEXT_COLUMN_NAMES, LabelSet, TextData, load_text_data
from lorafast.export import TOKENIZER_FILES, from_pretrained_checked
from lorafast.inject import apply_lora, count_parameters, merge_and_unload

TASKS = ("seq-cls", "causal-lm")
# Names transformers gives the (newly initialised) head of a sequence classifier; PEFT keeps the same ones trainable.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# How many evaluation examples the merged-vs-unmerged output check runs.
MERGE_CHECK_EXAMPLES = 64
IGNORE_INDEX = -100  # label id transformers' losses skip (padding in a causal-LM batch)


@dataclass
class TrainingOptions:
    """Optimisation settings: AdamW at ``lr`` decaying linearly to 0, gradient norm clipped to 1."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-4
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")


@dataclass
class Examples:
    """Tokenised examples: ``encodings[i]`` is the tokenizer's dict for text i, ``labels[i]`` its class id."""

    encodings: list[dict[str, list[int]]]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.encodings)

    def subset(self, indices: list[int]) -> Examples:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return Examples([self.encodings[i] for i in indices], labels)


@dataclass
class TrainLog:
    """What ``train`` measured: the loss of every optimizer step, tokens seen, wall and CPU seconds."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    if Path(model_dir).is_dir() and not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(  # transformers would build an empty tokenizer that reads every word as [UNK]
            f"--model {model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) beside the model"
        )
    tokenizer = from_pretrained_checked(AutoTokenizer, model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"--model {model_dir}: the tokenizer has neither a pad nor an EOS token to pad batches with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str | Path, task: str, label_set: LabelSet | None, pad_token_id: int) -> nn.Module:
    """The checkpoint as a sequence classifier over ``label_set`` (new head if needed) or as a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "causal-lm":
        model = from_pretrained_checked(AutoModelForCausalLM, model_dir)
    else:
        model = from_pretrained_checked(
            AutoModelForSequenceClassification,
            model_dir,
            num_labels=len(label_set.names),
            id2label=dict(enumerate(label_set.names)),
            label2id={name: i for i, name in enumerate(label_set.names)},
            ignore_mismatched_sizes=True,
        )
    model.config.pad_token_id = pad_token_id
    return model


def classifier_head_names(model: nn.Module) -> list[str]:
    """The sequence-classification head's module name(s), to keep trainable (``modules_to_save``)."""
    heads = [name for name in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if not heads:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__} (looked for {CLASSIFIER_HEAD_NAMES})"
        )
    return heads


def check_lengths(examples: Examples, path: str | Path, task: str, max_length: int, positions: int | None) -> None:
    """The tokenized texts must fit the model's ``positions`` (else it fails on its position
    embeddings mid-run: ``--max-length`` above them, or below the tokenizer's special tokens,
    where it does not truncate) and, for a causal LM, hold two tokens or more (a batch with
    nothing to predict has a NaN mean loss, which training would step on)."""
    lengths = [len(encoding["input_ids"]) for encoding in examples.encodings]
    if positions is not None and max(lengths) > positions:
        raise ValueError(
            f"{path}: a text is {max(lengths)} tokens with --max-length {max_length}, more than the model's "
            f"{positions} positions; lower --max-length"
        )
    if task == "causal-lm" and min(lengths) < 2:
        row = lengths.index(min(lengths)) + 1
        raise ValueError(f"{path}: row {row} is a single token; causal-lm texts need a next token to predict")


def tokenize(tokenizer, data: TextData, max_length: int) -> Examples:
    """Tokenise every text, truncated to ``max_length`` tokens (padding happens per batch)."""
    encoded = tokenizer(data.texts, truncation=True, max_length=max_length)
    encodings = [{key: encoded[key][i] for key in encoded} for i in range(len(data.texts))]
    return Examples(encodings, data.labels)


def collate(tokenizer, examples: Examples, task: str) -> dict[str, torch.Tensor]:
    """One padded batch: ``input_ids``/``attention_mask`` ``[B, T]`` and ``labels`` (``[B]`` class ids or ``[B, T]`` tokens)."""
    batch = dict(tokenizer.pad(examples.encodings, return_tensors="pt"))
    if task == "causal-lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    else:
        batch["labels"] = torch.tensor(examples.labels, dtype=torch.long)
    return batch


def batch_order(size: int, options: TrainingOptions, epoch: int) -> list[list[int]]:
    """The example indices of each batch of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    return [order[start : start + options.batch_size] for start in range(0, size, options.batch_size)]


def train(model: nn.Module, tokenizer, examples: Examples, task: str, options: TrainingOptions) -> TrainLog:
    """Train the model's trainable parameters; returns the per-step losses and timings.

    The tqdm bar's postfix shows the last step's loss and the tokens (non-padding) per second.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    steps_per_epoch = math.ceil(len(examples) / options.batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=options.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * options.epochs)
    log = TrainLog()
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    with tqdm(total=steps_per_epoch * options.epochs, desc="training", unit="step") as bar:
        for epoch in range(options.epochs):
            for indices in batch_order(len(examples), options, epoch):
                batch = collate(tokenizer, examples.subset(indices), task)
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                log.losses.append(loss.item())
                log.tokens += int(batch["attention_mask"].sum())
                bar.update()
                bar.set_postfix(loss=f"{log.losses[-1]:.4f}", tok_s=f"{log.tokens / (time.perf_counter() - start):.0f}")
    log.seconds, log.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return log


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: Examples, task: str, batch_size: int) -> dict[str, float]:
    """``{"accuracy", "loss"}`` (mean cross-entropy per example) for ``seq-cls``;
    ``{"loss", "perplexity"}`` (mean cross-entropy per predicted token, and its exp) for ``causal-lm``."""
    model.eval()
    loss_sum, weight_sum, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(tokenizer, examples.subset(list(range(start, min(start + batch_size, len(examples))))), task)
        output = model(**batch)
        if task == "causal-lm":
            weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the loss averages over shifted targets
        else:
            weight = len(batch["labels"])
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += output.loss.item() * weight
        weight_sum += weight
    if weight_sum == 0:
        raise ValueError("nothing to evaluate: every evaluation text is a single token (no next-token target)")
    loss = loss_sum / weight_sum
    if task == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return {"accuracy": correct / len(examples), "loss": loss}


@torch.no_grad()
def output_logits(model: nn.Module, tokenizer, examples: Examples, task: str) -> torch.Tensor:
    """The model's logits on one batch of ``examples`` in eval mode (``[B, C]`` or ``[B, T, V]``)."""
    model.eval()
    return model(**collate(tokenizer, examples, task)).logits


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Refuse an ``--out`` that holds anything (outputs are never mixed with an earlier run's).
    Nothing is created until the outputs are written (``atomic_directory``), so a run that fails
    before leaves no folders behind."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir} already exists and is not an empty directory; choose a new one")
    existing = next(path for path in (out_dir.absolute(), *out_dir.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out_dir}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out {out_dir}: {existing} is not writable")
    return out_dir


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plot_loss_curve(losses: list[float], path: Path, title: str) -> None:
    """Per-step training loss and its moving average, as a PNG (matplotlib's Agg canvas, no display)."""
    from matplotlib.figure import Figure

    window = max(1, len(losses) // 20)
    smoothed = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))
    ]
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, label="loss per step")
    axes.plot(steps, smoothed, color="tab:blue", label=f"moving average ({window} steps)")
    axes.set(xlabel="optimizer step", ylabel="training loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


@dataclass
class FinetuneJob:
    """Everything ``lorafast finetune`` takes (see ``register`` for the meaning of each field)."""

    model_dir: str
    train_file: str
    out_dir: str
    task: str = "seq-cls"
    eval_file: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | str | None = None
    training: TrainingOptions = field(default_factory=TrainingOptions)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.task == "causal-lm" and self.label_column is not None:
            raise ValueError("--label-column is for --task seq-cls; a causal LM trains on the text alone")
        self.lora_config()  # validates r, alpha, dropout and target_modules before anything is loaded

    def lora_config(self, modules_to_save: list[str] | None = None) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            modules_to_save=modules_to_save,
        )


def finetune(job: FinetuneJob) -> dict[str, Any]:
    """Run the whole job (read, train, evaluate, write ``job.out_dir``) and return the metrics."""
    from transformers import AutoConfig, set_seed

    out_dir = prepare_output_dir(job.out_dir)
    classify = job.task == "seq-cls"
    train_data, label_set = load_text_data(job.train_file, job.text_column, job.label_column, with_labels=classify)
    eval_data = train_data
    if job.eval_file is not None:
        eval_data, _ = load_text_data(job.eval_file, job.text_column, job.label_column, classify, label_set)
    tokenizer = load_tokenizer(job.model_dir)
    special = tokenizer.num_special_tokens_to_add()
    if job.training.max_length <= special:  # the tokenizer would not truncate at all
        raise ValueError(f"--max-length {job.training.max_length} leaves no room beside {special} special tokens")
    train_examples = tokenize(tokenizer, train_data, job.training.max_length)
    eval_examples = tokenize(tokenizer, eval_data, job.training.max_length)
    positions = getattr(from_pretrained_checked(AutoConfig, job.model_dir), "max_position_embeddings", None)
    for examples, path in ((train_examples, job.train_file), (eval_examples, job.eval_file or job.train_file)):
        check_lengths(examples, path, job.task, job.training.max_length, positions)
    set_seed(job.training.seed)
    model = load_model(job.model_dir, job.task, label_set, tokenizer.pad_token_id)
    config = job.lora_config(modules_to_save=classifier_head_names(model) if classify else None)
    apply_lora(model, config)
    batch_size = job.training.batch_size
    before = evaluate(model, tokenizer, eval_examples, job.task, batch_size)
    log = train(model, tokenizer, train_examples, job.task, job.training)
    after = evaluate(model, tokenizer, eval_examples, job.task, batch_size)
    trainable, total = count_parameters(model)
    metrics = {
        "task": job.task,
        "model": str(job.model_dir),
        "train_file": str(job.train_file),
        "eval_split": "eval" if job.eval_file is not None else "train (no --eval file)",
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "labels": list(label_set.names) if classify else None,
        "lora": {
            k: v
            for k, v in config.to_dict().items()
            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
        },
        "training": asdict(job.training),
        "parameters": {"trainable": trainable, "total": total},
        "eval_before": before,
        "eval": after,
        "steps": len(log.losses),
        "loss_curve": log.losses,
    }
    check_examples = eval_examples.subset(list(range(min(MERGE_CHECK_EXAMPLES, len(eval_examples)))))
    write_outputs(out_dir, model, tokenizer, metrics, log, check_examples)
    return metrics


def write_outputs(
    out_dir: Path, model: nn.Module, tokenizer, metrics: dict, log: TrainLog, check_examples: Examples
) -> None:
    """Write adapter, merged model, metrics and loss curve into a staging folder beside ``out_dir``, then rename it.

    Adds to ``metrics``: ``adapter_bytes``, ``merged_max_abs_logit_diff`` (max |merged − unmerged|
    logits on ``check_examples``) and ``timing``. The model is merged and unloaded in place.
    """
    from lorafast.adapters import atomic_directory, save_adapter

    task = metrics["task"]
    with atomic_directory(out_dir, replace_whole=True) as staging:
        save_adapter(model, staging / "adapter")
        unmerged_logits = output_logits(model, tokenizer, check_examples, task)
        merge_and_unload(model)
        merged_logits = output_logits(model, tokenizer, check_examples, task)
        model.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
        metrics["adapter_bytes"] = directory_bytes(staging / "adapter")
        metrics["merged_max_abs_logit_diff"] = (merged_logits - unmerged_logits).abs().max().item()
        metrics["timing"] = {
            "train_seconds": log.seconds,
            "train_cpu_seconds": log.cpu_seconds,
            "train_tokens": log.tokens,
            "tokens_per_second": log.tokens / log.seconds if log.seconds > 0 else None,
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if importlib.util.find_spec("matplotlib") is not None:
            plot_loss_curve(
                log.losses, staging / "loss_curve.png", f"lorafast {task}: {Path(metrics['train_file']).name}"
            )
        else:
            print("matplotlib is not installed: no loss_curve.png (the per-step losses are in metrics.json)")


def summary_lines(metrics: dict[str, Any], out_dir: str | Path) -> list[str]:
    """A short human-readable report of a finished job."""
    quality = "accuracy" if metrics["task"] == "seq-cls" else "perplexity"
    params = metrics["parameters"]
    return [
        f"{quality} on {metrics['eval_split']} ({metrics['eval_examples']} examples): "
        f"{metrics['eval_before'][quality]:.4f} before, {metrics['eval'][quality]:.4f} after "
        f"{metrics['steps']} steps ({metrics['timing']['train_seconds']:.1f} s, "
        f"{metrics['timing']['tokens_per_second']:.0f} tokens/s)",
        f"trainable parameters: {params['trainable']:,} of {params['total']:,} "
        f"({100 * params['trainable'] / params['total']:.2f}%)",
        f"adapter on disk: {metrics['adapter_bytes'] / 1024:.1f} KiB; "
        f"merged vs unmerged max |logit difference|: {metrics['merged_max_abs_logit_diff']:.2e}",
        f"wrote {out_dir}/: {', '.join(sorted(p.name + '/' * p.is_dir() for p in Path(out_dir).iterdir()))}",
    ]


def parse_target_modules(value: str | None) -> list[str] | str | None:
    """``"all-linear"`` stays a string; ``"query,value"`` becomes ``["query", "value"]``."""
    if value is None or value == "all-linear":
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--target-modules {value!r} names no module")
    return names


def add_lora_and_training_arguments(parser: argparse.ArgumentParser, defaults: FinetuneJob) -> None:
    """The LoRA and optimisation options, shared by ``finetune`` and ``demo`` (with each job's defaults)."""
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=defaults.r, help="adapter rank (default %(default)s)")
    lora.add_argument(
        "--lora-alpha", type=float, default=defaults.lora_alpha, help="scaling = alpha / r (default %(default)s)"
    )
    lora.add_argument(
        "--lora-dropout",
        type=float,
        default=defaults.lora_dropout,
        help="dropout on the adapter input (default %(default)s)",
    )
    lora.add_argument(
        "--target-modules",
        default=defaults.target_modules
        if isinstance(defaults.target_modules, str | None)
        else ",".join(defaults.target_modules),
        help="comma-separated module names, or all-linear (default: PEFT's default for the model type, "
        "e.g. query,value for BERT, q_proj,v_proj for Llama)",
    )
    training = parser.add_argument_group("training")
    options = defaults.training
    training.add_argument("--epochs", type=int, default=options.epochs, help="default %(default)s")
    training.add_argument("--batch-size", type=int, default=options.batch_size, help="default %(default)s")
    training.add_argument(
        "--lr",
        type=float,
        default=options.lr,
        help="AdamW peak learning rate, decaying linearly to 0 (default %(default)s)",
    )
    training.add_argument(
        "--max-length", type=int, default=options.max_length, help="tokens kept per text (default %(default)s)"
    )
    training.add_argument(
        "--seed",
        type=int,
        default=options.seed,
        help="seeds the head init, LoRA init, dropout and batch order (default %(default)s)",
    )


def lora_and_training_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``FinetuneJob`` fields the shared options set."""
    return dict(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=parse_target_modules(args.target_modules),
        training=TrainingOptions(args.epochs, args.batch_size, args.lr, args.max_length, args.seed),
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="LoRA fine-tune a local checkpoint on a CSV/TSV/JSONL file",
        description="LoRA fine-tuning of a local transformers checkpoint. Writes OUT/adapter (PEFT format), "
        "OUT/merged (merged model + tokenizer), OUT/metrics.json and OUT/loss_curve.png.",
    )
    parser.add_argument("--model", required=True, help="local checkpoint directory (config, weights, tokenizer)")
    parser.add_argument("--train", required=True, help="training data: .csv, .tsv or .jsonl")
    parser.add_argument("--eval", help="evaluation data, same format (default: evaluate on the training data)")
    parser.add_argument(
        "--task", choices=TASKS, required=True, help="sequence classification or causal language modelling"
    )
    parser.add_argument(
        "--text-column", help=f"column with the text (default: first of {', '.join(TEXT_COLUMN_NAMES)})"
    )
    parser.add_argument(
        "--label-column", help=f"seq-cls: column with the label (default: first of {', '.join(LABEL_COLUMN_NAMES)})"
    )
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    add_lora_and_training_arguments(parser, FinetuneJob(model_dir="", train_file="", out_dir=""))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    job = FinetuneJob(
        model_dir=args.model,
        train_file=args.train,
        eval_file=args.eval,
        out_dir=args.out,
        task=args.task,
        text_column=args.text_column,
        label_column=args.label_column,
        **lora_and_training_fields(args),
    )
    metrics = finetune(job)
    print("\n".join(summary_lines(metrics, job.out_dir)))
    return 0
