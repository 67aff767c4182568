"""HF ``Trainer``: a lorafast model under ``LoraTrainer`` and a patched PEFT model under ``Trainer``.

Each runs 3 steps on a tiny Llama and checks: the loss is finite, every LoRA parameter moved, no
frozen base parameter moved, and the checkpoint holds the adapter and no full model weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import lorafast
from lorafast.trainer import LoraTrainer
from tests.models import tiny_llama
from tests.tolerances import assert_close

FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
STEPS = 3


def token_dataset(vocab_size: int = 128, count: int = 12, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (count, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def training_arguments(output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=STEPS,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copies of the (trainable, frozen) parameters by name."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def check_training_effect(model: torch.nn.Module, before: tuple[dict, dict], trainer: Trainer) -> None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    trainable_before, frozen_before = before
    after = dict(model.named_parameters())
    assert trainable_before, "nothing was trainable"
    for name, value in trainable_before.items():
        assert not torch.equal(after[name].detach(), value), f"LoRA parameter {name} did not change"
    for name, value in frozen_before.items():
        assert torch.equal(after[name].detach(), value), f"frozen parameter {name} changed"


def check_adapter_only(checkpoint: Path) -> None:
    files = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & set(FULL_MODEL_FILES), files


def test_lora_trainer_trains_and_checkpoints_the_adapter(tmp_path: Path) -> None:
    model = lorafast.apply_lora(
        tiny_llama(), lorafast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    before = snapshot(model)
    trainer = LoraTrainer(model=model, args=training_arguments(tmp_path), train_dataset=token_dataset())
    trainer.train()
    check_training_effect(model, before, trainer)
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    check_adapter_only(checkpoint)

    # The checkpoint's adapter reproduces the trained model: loaded into a fresh base, same logits.
    probe = token_dataset(count=2)[0]["input_ids"][None]
    model.eval()
    reloaded = lorafast.load_adapter(tiny_llama(), checkpoint).eval()
    with torch.no_grad():
        assert_close(reloaded(probe).logits, model(probe).logits)

    # Resuming from it restores the adapter into a freshly initialised lorafast model.
    fresh = lorafast.apply_lora(
        tiny_llama(), lorafast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    resumed = LoraTrainer(model=fresh, args=training_arguments(tmp_path / "resumed"), train_dataset=token_dataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, layer), (_, fresh_layer) in zip(lorafast.lora_layers(model), lorafast.lora_layers(fresh), strict=True):
        assert torch.equal(fresh_layer.lora_A, layer.lora_A), name
        assert torch.equal(fresh_layer.lora_B, layer.lora_B), name


def test_save_model_writes_adapter_and_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tests.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    trainer = LoraTrainer(model=model, args=training_arguments(tmp_path / "run"), processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "final"))
    check_adapter_only(tmp_path / "final")
    assert (tmp_path / "final" / "tokenizer_config.json").is_file()


def test_patched_peft_model_trains_under_plain_trainer(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = lorafast.patch_peft(peft.get_peft_model(tiny_llama(), config))
    before = snapshot(model)
    trainer = Trainer(model=model, args=training_arguments(tmp_path), train_dataset=token_dataset())
    trainer.train()
    check_training_effect(model, before, trainer)
    check_adapter_only(tmp_path / f"checkpoint-{STEPS}")
    patched = [name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.Linear)]
    assert patched and all(lorafast.peft_compat.is_patched(model.get_submodule(name)) for name in patched)


@pytest.mark.parametrize("trainer_class", [Trainer, LoraTrainer])
def test_plain_model_keeps_trainer_full_save(tmp_path: Path, trainer_class) -> None:
    """Without lorafast layers LoraTrainer is Trainer: a full model save."""
    trainer = trainer_class(model=tiny_llama(), args=training_arguments(tmp_path))
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
