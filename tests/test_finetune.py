"""``lorafast finetune`` / ``lorafast demo``: each CLI path, each data error, reproducibility, the demo's parts.

Fast models only: the real MiniLM on a handful of sentences for ``seq-cls`` and a tiny Llama (with
MiniLM's tokenizer, so real text) for ``causal-lm``. What a run writes is checked against what it
claims: the merged model reloaded from disk gives the reported metrics, and PEFT loading the saved
adapter onto the base model gives the merged model's logits.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import lorafast
from lorafast import cli, demo, finetune
from lorafast.datasets import LabelSet, load_text_data
from tests.models import minilm_dir, tiny_llama
from tests.tolerances import TOLERANCES, assert_close

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "24"]


def shipped_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (demo.DEMO_DATA / name).read_text().splitlines()]


SENTENCES = shipped_rows("sentiment_train.jsonl")[:24]


def write_table(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Rows as CSV / TSV (by suffix) or JSONL, with the given column order."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({c: row[c] for c in columns}) + "\n" for row in rows))
        return path
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows({c: row[c] for c in columns} for row in rows)
    return path


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def without_timing(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "timing"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama whose vocabulary is MiniLM's tokenizer's, with that tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def examples_of(path: Path, tokenizer, task: str, label_set: LabelSet | None = None) -> finetune.Examples:
    data, _ = load_text_data(path, with_labels=task == "seq-cls", label_set=label_set)
    return finetune.tokenize(tokenizer, data, max_length=24)


def test_seq_cls_csv_and_tsv_end_to_end(tmp_path: Path, capsys, tokenizer) -> None:
    """Detected columns in any order (label first in CSV, other names in TSV); every output checked."""
    train_rows = [{"sentence": r["text"], "label": r["label"]} for r in SENTENCES[:16]]
    eval_rows = [{"review": r["text"], "sentiment": r["label"]} for r in SENTENCES[16:]]
    train = write_table(tmp_path / "train.csv", train_rows, ["label", "sentence"])
    evaluation = write_table(tmp_path / "eval.tsv", eval_rows, ["sentiment", "review"])
    out = tmp_path / "out"
    argv = ["finetune", "--model", minilm_dir(), "--train", str(train), "--eval", str(evaluation)]
    argv += ["--task", "seq-cls", "--out", str(out), "--r", "4", "--lora-alpha", "8", "--lr", "5e-3", *FAST]
    code, stdout, _ = run_cli(capsys, argv)
    assert code == 0
    assert "accuracy on eval (8 examples)" in stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["negative", "positive"]
    assert metrics["steps"] == 2 and len(metrics["loss_curve"]) == 2
    assert all(math.isfinite(loss) for loss in metrics["loss_curve"])
    assert metrics["lora"]["modules_to_save"] == ["classifier"]
    config = AutoModelForSequenceClassification.from_pretrained(out / "merged").config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    expected_trainable = layers * 2 * 4 * (hidden + hidden) + (hidden * 2 + 2)  # query+value LoRA, r=4; new head
    assert metrics["parameters"]["trainable"] == expected_trainable
    assert metrics["merged_max_abs_logit_diff"] <= TOLERANCES[torch.float32]["atol"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert config.id2label == {0: "negative", 1: "positive"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.tsv", "out", "train.csv"]  # no staging left

    # The merged model on disk reproduces the reported evaluation ...
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    label_set = LabelSet(("negative", "positive"), integer=False)
    eval_examples = examples_of(evaluation, tokenizer, "seq-cls", label_set)
    reloaded = finetune.evaluate(merged, tokenizer, eval_examples, "seq-cls", batch_size=8)
    assert reloaded["accuracy"] == metrics["eval"]["accuracy"]
    assert_close(torch.tensor(reloaded["loss"]), torch.tensor(metrics["eval"]["loss"]))
    # ... and PEFT, loading the adapter (LoRA + trained head) onto the base, gives the merged logits.
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter")
    assert_close(
        finetune.output_logits(with_adapter, tokenizer, eval_examples, "seq-cls"),
        finetune.output_logits(merged, tokenizer, eval_examples, "seq-cls"),
    )


def test_seq_cls_integer_labels_from_jsonl_with_named_columns(tmp_path: Path, capsys) -> None:
    rows = [{"id": i, "body": r["text"], "y_true": i % 3} for i, r in enumerate(SENTENCES[:12])]
    train = write_table(tmp_path / "train.jsonl", rows, ["id", "body", "y_true"])
    argv = [
        "finetune",
        "--model",
        minilm_dir(),
        "--train",
        str(train),
        "--task",
        "seq-cls",
        "--out",
        str(tmp_path / "o"),
    ]
    code, stdout, _ = run_cli(capsys, [*argv, "--text-column", "body", "--label-column", "y_true", *FAST])
    assert code == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["labels"] == ["0", "1", "2"] and metrics["eval_split"].startswith("train")
    assert "accuracy on train" in stdout


def test_causal_lm_jsonl_trains_and_reports_perplexity(tmp_path: Path, capsys, tiny_llama_dir, tokenizer) -> None:
    train = write_table(
        tmp_path / "lm.jsonl", [{"n": i, "text": r["text"]} for i, r in enumerate(SENTENCES)], ["n", "text"]
    )
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(tiny_llama_dir), "--train", str(train), "--task", "causal-lm", "--out", str(out)]
    code, stdout, _ = run_cli(capsys, [*argv, "--target-modules", "all-linear", "--lr", "1e-2", "--epochs", "3"])
    assert code == 0 and "perplexity on train" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert metrics["eval"]["loss"] < metrics["eval_before"]["loss"]  # training lowered the loss on its own data
    assert metrics["eval"]["perplexity"] == pytest.approx(math.exp(metrics["eval"]["loss"]))
    assert metrics["lora"]["target_modules"] == "all-linear"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    reloaded = finetune.evaluate(merged, tokenizer, examples_of(train, tokenizer, "causal-lm"), "causal-lm", 16)
    assert_close(torch.tensor(reloaded["loss"]), torch.tensor(metrics["eval"]["loss"]))


def test_same_seed_same_metrics(tmp_path: Path, tiny_llama_dir) -> None:
    train = write_table(tmp_path / "lm.csv", SENTENCES[:16], ["text", "label"])

    def run(seed: int, name: str) -> dict:
        job = finetune.FinetuneJob(
            model_dir=str(tiny_llama_dir),
            train_file=str(train),
            out_dir=str(tmp_path / name),
            task="causal-lm",
            lora_dropout=0.2,
            training=finetune.TrainingOptions(epochs=2, batch_size=4, lr=5e-3, max_length=24, seed=seed),
        )
        return without_timing(finetune.finetune(job))

    first, again, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert first == again
    assert first["loss_curve"] != other["loss_curve"]


def bad_label_rows(labels: list) -> list[dict]:
    return [{"text": r["text"], "label": label} for r, label in zip(SENTENCES, labels, strict=False)]


@pytest.mark.parametrize(
    ("files", "extra", "message"),
    [
        ({}, ["--train", "missing.csv"], "missing.csv: no such file"),
        ({"t.txt": "hello\n"}, ["--train", "t.txt"], "unsupported file type '.txt'"),
        ({"t.csv": "text,label\n"}, ["--train", "t.csv"], "t.csv: the data set is empty"),
        ({"t.jsonl": "\n\n"}, ["--train", "t.jsonl"], "t.jsonl: the data set is empty"),
        (
            {"t.jsonl": '{"text": "a", "label": 1}\n{"text": oops}\n'},
            ["--train", "t.jsonl"],
            "line 2 is not valid JSON",
        ),
        ({"t.csv": "text,label\nfine,1\nx,1,extra\n"}, ["--train", "t.csv"], "line 3 has a different number of fields"),
        (
            {"t.csv": bad_label_rows([0, 1])},
            ["--train", "t.csv", "--text-column", "body"],
            "unknown text column 'body'",
        ),
        ({"t.csv": bad_label_rows([0, 1])}, ["--train", "t.csv", "--label-column", "y"], "unknown label column 'y'"),
        ({"t.csv": [{"words": "a", "label": 0}]}, ["--train", "t.csv"], "cannot tell which column holds the text"),
        (
            {"t.jsonl": bad_label_rows(["good", 1, "bad"])},
            ["--train", "t.jsonl"],
            "labels mix integers (row 2) and strings (row 1)",
        ),
        ({"t.csv": bad_label_rows(["0.5", "1.5"])}, ["--train", "t.csv"], "row 1 has label '0.5', which is neither"),
        ({"t.jsonl": bad_label_rows([True, False])}, ["--train", "t.jsonl"], "row 1 has label True, which is neither"),
        ({"t.jsonl": bad_label_rows([None, 1])}, ["--train", "t.jsonl"], "row 1 has label None"),
        (
            {"t.csv": bad_label_rows([-1, 1])},
            ["--train", "t.csv"],
            "row 1 has label -1; integer labels must be class ids",
        ),
        ({"t.csv": bad_label_rows(["pos", "pos"])}, ["--train", "t.csv"], "needs at least two classes"),
        ({"t.csv": bad_label_rows([0, 10**9])}, ["--train", "t.csv"], "2 classes go up to 1000000000; renumber"),
        (
            {"t.csv": [{"text": "word " * 600, "label": 0}, {"text": "short", "label": 1}]},
            ["--train", "t.csv", "--max-length", "1000"],
            "t.csv: a text is 602 tokens with --max-length 1000, more than the model's 512 positions",
        ),
        ({"t.csv": bad_label_rows([0, 1])}, ["--train", "t.csv", "--max-length", "2"], "beside 2 special tokens"),
        ({"t.csv": b"text,label\ncaf\xe9,1\nthe end,0\n"}, ["--train", "t.csv"], "t.csv: not UTF-8 text"),
        (
            {"t.csv": bad_label_rows([0, 1]), "f": "a file"},
            ["--train", "t.csv", "--out", "f/sub"],
            "is a file, so the folder cannot be made",
        ),
        ({"t.jsonl": [{"text": "", "label": 1}]}, ["--train", "t.jsonl"], "row 1 has 'text' = ''"),
        (
            {"t.csv": bad_label_rows(["pos", "neg"]), "e.csv": bad_label_rows(["pos", "meh"])},
            ["--train", "t.csv", "--eval", "e.csv"],
            "e.csv: labels ['meh'] do not occur in the training labels ['neg', 'pos']",
        ),
        (
            {"t.csv": bad_label_rows([0, 1]), "e.csv": bad_label_rows([1, 2])},
            ["--train", "t.csv", "--eval", "e.csv"],
            "e.csv: label 2 is not a training class id (0 … 1)",
        ),
        (
            {"t.csv": bad_label_rows([0, 1]), "e.csv": bad_label_rows(["a", "b"])},
            ["--train", "t.csv", "--eval", "e.csv"],
            "e.csv: labels are strings but the training labels are not",
        ),
        (
            {"t.csv": bad_label_rows([0, 1])},
            ["--train", "t.csv", "--epochs", "0"],
            "--epochs must be a positive integer",
        ),
        ({"t.csv": bad_label_rows([0, 1])}, ["--train", "t.csv", "--lr", "nan"], "--lr must be a positive number"),
        (
            {"t.csv": bad_label_rows([0, 1])},
            ["--train", "t.csv", "--r", "0"],
            "LoraConfig.r must be a positive integer",
        ),
        ({"t.csv": bad_label_rows([0, 1]), "out/x": "earlier run"}, ["--train", "t.csv"], "is not an empty directory"),
        (
            {"t.csv": bad_label_rows([0, 1])},
            ["--train", "t.csv", "--model", "nowhere"],
            "--model nowhere: no such directory",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys, monkeypatch, files, extra, message) -> None:
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        Path(name).parent.mkdir(exist_ok=True)
        if isinstance(content, str):
            Path(name).write_text(content)
        elif isinstance(content, bytes):
            Path(name).write_bytes(content)
        else:
            write_table(Path(name), content, list(content[0]))
    argv = ["finetune", "--model", minilm_dir(), "--task", "seq-cls", "--out", "out", *extra]
    code, _, stderr = run_cli(capsys, argv)
    assert code == 2
    assert stderr.startswith("lorafast finetune: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not Path("out").exists() or "out/x" in files  # nothing written


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    """transformers 5 builds an empty tokenizer there, which reads every word as [UNK]."""
    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("bare")
    write_table(Path("t.csv"), bad_label_rows([0, 1]), ["text", "label"])
    code, _, stderr = run_cli(capsys, ["finetune", "--model", "bare", "--task", "causal-lm", "--train", "t.csv", "--out", "o"])
    assert code == 2 and "--model bare: no tokenizer files" in stderr and not Path("o").exists()


def test_causal_lm_texts_need_a_next_token() -> None:
    """A single-token text leaves a batch of them nothing to predict: a NaN loss training would step on."""
    examples = finetune.Examples([{"input_ids": [5, 6]}, {"input_ids": [7]}])
    finetune.check_lengths(examples, "t.jsonl", "seq-cls", 16, 64)
    with pytest.raises(ValueError, match="t.jsonl: row 2 is a single token"):
        finetune.check_lengths(examples, "t.jsonl", "causal-lm", 16, 64)


def test_causal_lm_refuses_a_label_column(tmp_path: Path, capsys, tiny_llama_dir) -> None:
    train = write_table(tmp_path / "t.csv", SENTENCES[:4], ["text", "label"])
    argv = ["finetune", "--model", str(tiny_llama_dir), "--train", str(train), "--task", "causal-lm"]
    code, _, stderr = run_cli(capsys, [*argv, "--label-column", "label", "--out", str(tmp_path / "o")])
    assert code == 2 and "--label-column is for --task seq-cls" in stderr


def test_failure_while_writing_leaves_no_output(tmp_path: Path, monkeypatch, tiny_llama_dir) -> None:
    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(finetune, "plot_loss_curve", broken_plot)
    train = write_table(tmp_path / "t.jsonl", SENTENCES[:4], ["text"])
    job = finetune.FinetuneJob(str(tiny_llama_dir), str(train), str(tmp_path / "out"), task="causal-lm")
    with pytest.raises(OSError, match="disk full"):
        finetune.finetune(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark; the columns are still text and label."""
    from lorafast.datasets import read_rows

    (tmp_path / "t.csv").write_bytes("text,label\nfine,1\n".encode("utf-8-sig"))
    (tmp_path / "t.jsonl").write_bytes('{"text": "fine", "label": 1}\n'.encode("utf-8-sig"))
    assert read_rows(tmp_path / "t.csv") == [{"text": "fine", "label": "1"}]
    assert read_rows(tmp_path / "t.jsonl") == [{"text": "fine", "label": 1}]


def test_label_set_maps_names_in_sorted_order_and_digits_as_ids(tmp_path: Path) -> None:
    names = LabelSet.from_labels(["pos", "neg", "neutral", "pos"], "f")
    assert names.names == ("neg", "neutral", "pos") and names.encode(["pos", "neg"], "f") == [2, 0]
    ids = LabelSet.from_labels(["2", " 0", "+1"], "f")  # CSV gives strings
    assert ids.integer and ids.names == ("0", "1", "2") and ids.encode([2, "1"], "f") == [2, 1]


def test_target_modules_parsing() -> None:
    assert finetune.parse_target_modules("query, value") == ["query", "value"]
    assert finetune.parse_target_modules("all-linear") == "all-linear"
    assert finetune.parse_target_modules(None) is None
    with pytest.raises(ValueError, match="names no module"):
        finetune.parse_target_modules(" , ")


# ---- the demo ----


def test_shipped_sentiment_data_is_balanced_and_disjoint() -> None:
    train, held_out = shipped_rows("sentiment_train.jsonl"), shipped_rows("sentiment_eval.jsonl")
    assert (len(train), len(held_out)) == (300, 98)
    for rows in (train, held_out):
        labels = [row["label"] for row in rows]
        assert labels.count("positive") == labels.count("negative")
    train_texts, held_out_texts = {row["text"] for row in train}, {row["text"] for row in held_out}
    assert len(train_texts) == 300 and len(held_out_texts) == 98 and not train_texts & held_out_texts


def test_naive_lora_copy_computes_the_same_outputs_and_gradients() -> None:
    config = lorafast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = lorafast.apply_lora(tiny_llama(), config)
    naive = demo.with_naive_lora(model)
    assert (
        sum(isinstance(m, demo.NaiveLoraLinear) for m in naive.modules())
        == 14
        == len(list(lorafast.lora_layers(model)))
    )
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs = [m(input_ids=tokens, labels=tokens) for m in (model, naive)]
    assert_close(outputs[1].logits, outputs[0].logits)
    for output in outputs:
        output.loss.backward()
    naive_grads = {n: p.grad for n, p in naive.named_parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert_close(naive_grads[name.replace(".lora_", ".layer.lora_")], parameter.grad, msg=name)


def test_step_times_measures_both_and_leaves_weights_alone() -> None:
    model = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    fused, naive = demo.step_times(model, {"input_ids": tokens, "labels": tokens}, steps=3)
    assert fused > 0 and naive > 0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


def test_demo_runs_end_to_end_on_a_slice(tmp_path: Path, capsys, monkeypatch) -> None:
    """``lorafast demo`` itself (real MiniLM), on 16 + 8 of the shipped sentences to stay fast."""
    data = tmp_path / "data"
    data.mkdir()
    for name, count in (("sentiment_train.jsonl", 16), ("sentiment_eval.jsonl", 8)):
        (data / name).write_text("".join(json.dumps(row) + "\n" for row in shipped_rows(name)[:count]))
    monkeypatch.setattr(demo, "DEMO_DATA", data)
    monkeypatch.setattr(demo, "TIMED_STEPS", 3)
    code, stdout, _ = run_cli(capsys, ["demo", "--epochs", "1", "--max-length", "16", "--out", str(tmp_path / "d")])
    assert code == 0
    for expected in ("accuracy on eval (8 examples)", "trainable parameters: ", "adapter on disk: ", "ratio "):
        assert expected in stdout
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["labels"] == ["negative", "positive"]


def test_a_failed_run_leaves_no_folders_and_a_stopped_one_no_staging(tmp_path: Path, capsys, monkeypatch) -> None:
    """A run that fails before writing creates no part of --out's path; SIGTERM (a scheduler's
    stop) and Ctrl-C while outputs are staged remove the staging folder, Ctrl-C with a one-line
    message instead of a traceback."""
    import os
    import signal

    from lorafast import export
    from lorafast.adapters import atomic_directory

    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "--model", minilm_dir(), "--task", "seq-cls", "--train", "missing.csv", "--out", "deep/er/out"]
    assert run_cli(capsys, argv)[0] == 2 and not Path("deep").exists()

    def stopped_while_writing(stop):
        def merge(model_dir, adapter_dir, out_dir, **kwargs):
            with atomic_directory(out_dir, replace_whole=True) as staging:
                (staging / "model.safetensors").write_text("half")
                stop()

        return merge

    argv = ["merge", "--model", str(tmp_path), "--adapter", str(tmp_path), "--out", "out"]
    monkeypatch.setattr(export, "merge_adapter_into_model", stopped_while_writing(lambda: os.kill(os.getpid(), signal.SIGTERM)))
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "merge_adapter_into_model", stopped_while_writing(interrupt))
    code, _, stderr = run_cli(capsys, argv)
    assert code == 130 and stderr == "lorafast merge: interrupted\n" and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not cli._exit_on_sigterm
