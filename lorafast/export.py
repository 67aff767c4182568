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

from lorafast.adapters import atomic_directory, load_adapter
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


def load_base_model(model_dir: str | Path, dtype: str = "auto") -> nn.Module:
    """The model in ``model_dir``, built with the first class of ``config.architectures`` that transformers has."""
    config = from_pretrained_checked(transformers.AutoConfig, model_dir)
    architectures = [name for name in getattr(config, "architectures", None) or [] if hasattr(transformers, name)]
    model_class = getattr(transformers, architectures[0]) if architectures else transformers.AutoModel
    return from_pretrained_checked(model_class, model_dir, dtype=DTYPES[dtype]).eval()


def merge_adapter_into_model(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto", overwrite: bool = False
) -> Path:
    """Load base + adapter, merge, and write the merged model (and tokenizer files) to ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out_dir} is not empty (pass --overwrite to replace it)")
    model = load_adapter(load_base_model(model_dir, dtype), adapter_dir)
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
