"""``LoraTrainer``: HF ``transformers.Trainer`` whose checkpoints hold the LoRA adapter, not the whole model.

Use it exactly like ``Trainer`` on a model adapted with ``lorafast.apply_lora``::

    from lorafast.trainer import LoraTrainer
    trainer = LoraTrainer(model=model, args=TrainingArguments(...), train_dataset=..., processing_class=tokenizer)
    trainer.train()
    trainer.save_model("out")          # out/adapter_config.json + out/adapter_model.safetensors (PEFT format)

Every checkpoint (``checkpoint-N/``) and ``save_model()`` write the adapter with
``lorafast.save_adapter`` (LoRA A/B, trained biases, ``modules_to_save``), the tokenizer and the
training arguments; ``resume_from_checkpoint`` and ``load_best_model_at_end`` read it back with
``lorafast.load_adapter``. A model without lorafast layers (a plain model, or a PEFT model, patched
with ``lorafast.patch_peft`` or not) is saved and loaded exactly as ``Trainer`` does; PEFT's own
saving already writes only the adapter.

This module is not imported by ``import lorafast`` because importing ``transformers.Trainer`` takes
seconds.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from lorafast.adapters import load_adapter, save_adapter
from lorafast.inject import lora_layers


def has_lorafast_layers(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


class LoraTrainer(Trainer):
    """``Trainer`` that saves and restores a lorafast model's adapter instead of its full state dict."""

    def _lorafast_model(self) -> nn.Module | None:
        """The unwrapped model when it has lorafast layers, else None (then ``Trainer``'s own logic applies)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if has_lorafast_layers(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._lorafast_model()
        if model is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(model, output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = model if model is not None else self._lorafast_model()
        if target is None or not has_lorafast_layers(target):
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        load_adapter(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self._lorafast_model()
        if model is None:
            super()._load_best_model()
            return
        load_adapter(model, self.state.best_model_checkpoint)
