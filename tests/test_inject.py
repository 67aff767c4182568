"""apply_lora: which modules are adapted, what is frozen, parameter sharing; merge, unmerge, merge_and_unload."""

from __future__ import annotations

import pytest
import torch
from models import LLAMA_PROJECTIONS, tiny_llama
from tolerances import TOLERANCES, assert_close
from transformers import GPT2Config, GPT2LMHeadModel

import lorafast


def _adapted_names(model):
    return sorted(name for name, _ in lorafast.lora_layers(model))


def _proj_names(projections, layers=2):
    prefix = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return sorted(f"model.layers.{i}.{prefix.get(p, 'mlp')}.{p}" for i in range(layers) for p in projections)


@pytest.mark.parametrize(
    ("target_modules", "expected"),
    [
        (["q_proj", "v_proj"], _proj_names(["q_proj", "v_proj"])),
        (["self_attn.q_proj"], _proj_names(["q_proj"])),
        (r"model\.layers\.1\.mlp\.(up|down)_proj", ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]),
        ("all-linear", _proj_names(LLAMA_PROJECTIONS)),  # lm_head, the output head, is left alone
        ([torch.nn.Linear], sorted(_proj_names(LLAMA_PROJECTIONS) + ["lm_head"])),
    ],
)
def test_target_module_forms(target_modules, expected):
    model = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(target_modules=target_modules))
    assert _adapted_names(model) == expected


def test_exclude_modules_and_default_targets():
    config = lorafast.LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])
    model = lorafast.apply_lora(tiny_llama(), config)
    assert _adapted_names(model) == _proj_names(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    assert _adapted_names(lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig())) == _proj_names(["q_proj", "v_proj"])


def test_target_matching_nothing_raises():
    with pytest.raises(ValueError, match="target_modules.*matched no linear layer"):
        lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="modules_to_save.*'classifier'"):
        lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_freezing_sharing_devices_and_counts():
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    weight_storage = q_proj.weight.data_ptr()
    config = lorafast.LoraConfig(r=4, target_modules=LLAMA_PROJECTIONS, modules_to_save=["lm_head"])
    lorafast.apply_lora(model, config)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight is q_proj.weight and layer.weight.data_ptr() == weight_storage and not layer.weight.requires_grad
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (64, 4) and layer.lora_A.dtype == torch.float32
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if n.endswith(("lora_A", "lora_B"))}
    assert len(lora_names) == 2 * 7 * 2 and trainable - lora_names == {"lm_head.weight"}
    count, total = lorafast.count_parameters(model)
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if n in lora_names)
    assert count == lora_numel + model.lm_head.weight.numel()
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + lora_numel


def test_init_modes_and_lora_dtype():
    model = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(target_modules=["q_proj"]), lora_dtype=torch.bfloat16)
    _, layer = next(lorafast.lora_layers(model))
    assert layer.lora_A.dtype == torch.bfloat16 and torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.std() > 0
    gaussian = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    _, layer = next(lorafast.lora_layers(gaussian))
    assert 0.15 < layer.lora_A.std().item() < 0.35  # std 1/r = 0.25


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def test_bias_modes():
    config = dict(target_modules=["c_attn"])
    model = lorafast.apply_lora(_gpt2(), lorafast.LoraConfig(bias="lora_only", **config))
    trainable_biases = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert trainable_biases == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    model = lorafast.apply_lora(_gpt2(), lorafast.LoraConfig(bias="all", **config))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))


def _random_adapters(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lorafast.lora_layers(model):
            layer.lora_B.normal_(std=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip_and_merge_and_unload(dtype):
    model = lorafast.apply_lora(tiny_llama(dtype=dtype), lorafast.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS))
    _random_adapters(model)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        unmerged = model(ids).logits
        weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
        lorafast.merge(model)
        lorafast.merge(model)  # merging twice is a no-op
        merged = model(ids).logits
        assert all(layer.merged for _, layer in lorafast.lora_layers(model))
        lorafast.unmerge(model)
        for name, parameter in model.named_parameters():
            if name in weights:
                assert_close(parameter, weights[name], dtype)
        assert_close(model(ids).logits, unmerged, dtype)
        plain = lorafast.merge_and_unload(model)
        assert not list(lorafast.lora_layers(plain))
        assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert "lora_A" not in "".join(plain.state_dict())
        assert_close(plain(ids).logits, unmerged, dtype)
    tolerance = TOLERANCES[dtype]
    assert (merged - unmerged).abs().max() <= 4 * (tolerance["atol"] + tolerance["rtol"] * unmerged.abs().max())


def test_merge_and_unload_keeps_parameters_replaced_after_apply_lora():
    """The base modules merge_and_unload puts back get the layers' current parameters, also ones
    replaced after apply_lora: by ``load_state_dict(assign=True)`` and by a dtype conversion that
    overwrites parameters (the unloaded model used to hold the stale ones: logits off by ~0.5)."""
    ids = torch.randint(0, 128, (2, 7))
    config = lorafast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    model = lorafast.apply_lora(tiny_llama(), config)
    _random_adapters(model)
    model.load_state_dict(lorafast.apply_lora(tiny_llama(seed=1), config).state_dict() | {
        name: value for name, value in model.state_dict().items() if "lora_" in name
    }, assign=True)  # fmt: skip
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(lorafast.merge_and_unload(model)(ids).logits, expected)
    model = lorafast.apply_lora(tiny_llama(), config)
    _random_adapters(model)
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(lorafast.merge_and_unload(model)(ids).logits, expected)


class _HalvedLinear(torch.nn.Linear):
    def forward(self, x):
        return 0.5 * super().forward(x)


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (lambda model: setattr(model.model.layers[1].self_attn, "v_proj", _HalvedLinear(64, 32)), "has a forward of its own"),
        (lambda model: model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, i, o: o), "it has hooks"),
        (lambda model: torch.nn.utils.parametrizations.weight_norm(model.model.layers[1].self_attn.v_proj), "parametrized"),
    ],
    ids=["own-forward", "hook", "parametrized"],
)
def test_a_target_whose_output_is_not_its_weights_product_is_refused(prepare, reason):
    """lorafast's layer computes x Wᵀ + b from the weights and never calls the module, so a
    matched module with a forward of its own, a hook or a parametrized weight is an error naming
    it (PEFT calls it; lorafast used to replace it and silently compute something else), and the
    model is left as it was; exclude_modules leaves it out."""
    model = tiny_llama()
    prepare(model)
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=rf"cannot adapt 1 matched module.*layers\.1\.self_attn\.v_proj: .*{reason}"):
        lorafast.apply_lora(model, lorafast.LoraConfig(**config))
    assert not list(lorafast.lora_layers(model)) and all(p.requires_grad for p in model.parameters())
    lorafast.apply_lora(model, lorafast.LoraConfig(**config, exclude_modules=["layers.1.self_attn.v_proj"]))
    assert len(list(lorafast.lora_layers(model))) == 3


def test_merged_layer_runs_the_base_matmul_only():
    layer = lorafast.LoraLinear(torch.nn.Linear(8, 8), r=2, lora_alpha=2, init_lora_weights=False)
    layer.merge()
    x = torch.randn(3, 8)
    assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert lorafast.merge(torch.nn.Sequential(layer)) is not None
    with pytest.raises(ValueError, match="no lorafast LoRA layers"):
        lorafast.merge(torch.nn.Linear(2, 2))


def test_gpt2_conv1d_is_adapted_and_merges():
    model = _gpt2()
    lorafast.apply_lora(model, lorafast.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    conv = model.transformer.h[0].attn.c_attn
    assert conv.fan_in_fan_out and conv.base_weight.shape == (96, 32)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        unmerged = model(ids).logits
        plain = lorafast.merge_and_unload(model)
        assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert_close(plain(ids).logits, unmerged)


def _enable_activation_checkpointing(model, use_reentrant: bool) -> None:
    """transformers' activation checkpointing (``gradient_checkpointing_enable`` before 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_dropout_masks(use_reentrant):
    """Recomputation under checkpointing must draw the forward's dropout seed again (checkpoint
    restores the RNG state the seed comes from): the same loss and bit-identical gradients."""

    def loss_and_grads(checkpointing: bool):
        config = lorafast.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=LLAMA_PROJECTIONS)
        model = lorafast.apply_lora(tiny_llama(), config).train()
        torch.manual_seed(1)
        for _, layer in lorafast.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 would hide the LoRA branch
        if checkpointing:
            _enable_activation_checkpointing(model, use_reentrant)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads = loss_and_grads(True)
    assert torch.equal(checkpointed_loss, loss)
    assert grads.keys() == checkpointed_grads.keys() and len(grads) == 4 * len(LLAMA_PROJECTIONS)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(checkpointed_grads[name], grad), name
