"""lorafast: fused Triton LoRA layers for PyTorch and transformers."""
