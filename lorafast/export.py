"""``lorafast merge``: fold a LoRA adapter into its base model and write a plain transformers model.

    lorafast merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype bfloat16] [--overwrite]

The base model is loaded with the class named in its ``config.json`` ``architectures`` (so a
causal LM keeps its head), the adapter (PEFT's or lorafast's format) is loaded and checked by
``load_adapter``, every LoRA layer is merged (``W + s·B A`` accumulated in fp32, rounded once:
the Triton kernel on CUDA, the reference on CPU) and the result is written with
``save_pretrained``, with the base directory's tokenizer files beside it. The output directory
appears complete or not at all.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import safetensors
import torch
import transformers
from torch import nn

from lorafast.adapters import TASK_TYPES, atomic_directory, load_adapter, read_adapter_tensors, read_task_type
from lorafast.inject import lora_layers, merge_and_unload

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def from_pretrained_checked(auto_class, model_dir: str | Path, **kwargs):
    """``auto_class.from_pretrained(model_dir, **kwargs)``, any failure to read the checkpoint (no
    folder, a corrupt config, missing or truncated weights) a ValueError naming ``--model``."""
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such directory")
    try:
        return auto_class.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--model {model_dir}: cannot load a {auto_class.__name__.removeprefix('Auto')} from it: {first_line}"
        ) from None


def load_base_model(model_dir: str | Path, dtype: str = "auto", adapter_dir: str | Path | None = None) -> nn.Module:
    """The model in ``model_dir``, built with the first class of ``config.architectures`` that
    transformers has; with ``adapter_dir``, with the head its ``task_type`` names when that class
    has another (PEFT's "SEQ_CLS" adapter for a bare checkpoint, as ``lorafast finetune --task
    seq-cls`` on one writes: the classifier, its label count read off the adapter's head weights)."""
    config = from_pretrained_checked(transformers.AutoConfig, model_dir)
    architectures = [name for name in getattr(config, "architectures", None) or [] if hasattr(transformers, name)]
    model_class = getattr(transformers, architectures[0]) if architectures else transformers.AutoModel
    task_type = read_task_type(adapter_dir) if adapter_dir is not None else None
    head = {task: suffix for suffix, task in TASK_TYPES.items()}.get(task_type)
    kwargs = {}
    if head is not None and not model_class.__name__.endswith(head):
        model_class = getattr(transformers, f"AutoModel{head}")
        if task_type == "SEQ_CLS":
            kwargs["num_labels"] = _head_labels(adapter_dir)
    return from_pretrained_checked(model_class, model_dir, dtype=DTYPES[dtype], **kwargs).eval()


#: The output layer's weight of transformers' classification heads ([num_labels, hidden]): BERT,
#: DistilBERT, ... "classifier"; Llama, GPT-2, ... "score"; RoBERTa "classifier.out_proj".
HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def _head_labels(adapter_dir: str | Path) -> int:
    """The label count of a SEQ_CLS adapter: the rows of its saved classification head's output weight."""
    tensors = read_adapter_tensors(Path(adapter_dir))
    rows = {t.shape[0] for key, t in tensors.items() if key.endswith(HEAD_WEIGHTS) and t.dim() == 2}
    if len(rows) != 1:
        raise ValueError(
            f"--adapter {adapter_dir}: task_type SEQ_CLS, but its classification head's output weight "
            f"({', '.join(HEAD_WEIGHTS)}) is {'missing' if not rows else 'ambiguous'}: merge into the "
            "sequence-classification checkpoint it was trained on"
        )
    return rows.pop()


def merge_adapter_into_model(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto", overwrite: bool = False
) -> Path:
    """Load base + adapter, merge, and write the merged model (and tokenizer files) to ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out_dir} is not empty (pass --overwrite to replace it)")
    model = load_adapter(load_base_model(model_dir, dtype, adapter_dir), adapter_dir)
    merged_layers = sum(1 for _ in lora_layers(model))
    merge_and_unload(model)
    with atomic_directory(out_dir, replace_whole=True) as staging:
        model.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, staging / name)
    print(f"merged {merged_layers} LoRA layers of {adapter_dir} into {model_dir} -> {out_dir}")
    return out_dir


def merge_residual_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes each merged ``LoraLinear`` keeps for its bit-exact unmerge (``LoraLinear.merge_residual_bytes``)."""
    return {name: layer.merge_residual_bytes() for name, layer in lora_layers(model)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save a plain transformers model",
        description="Fold a LoRA adapter (PEFT or lorafast format) into its base model and write a plain "
        "transformers model (save_pretrained, plus the base's tokenizer files). The output appears complete or not at all.",
    )
    parser.add_argument("--model", required=True, help="base model directory (config.json + weights)")
    parser.add_argument("--adapter", required=True, help="adapter directory (PEFT or lorafast format)")
    parser.add_argument("--out", required=True, help="directory to write the merged model to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="dtype to load and save the model in")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for flag, path in (("--model", args.model), ("--adapter", args.adapter)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path} is not a directory")
    merge_adapter_into_model(args.model, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    return 0
