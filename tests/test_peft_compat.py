"""patch_peft / unpatch_peft: PEFT models computing through lorafast's fused op, and PEFT still working around it."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from models import BERT_PROJECTIONS, LLAMA_PROJECTIONS, minilm, tiny_llama
from tolerances import assert_close

import lorafast
from lorafast import peft_compat


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its inputs from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls patched layers make to ``lorafast.ops.lora_linear``."""
    calls = []
    original = peft_compat.ops.lora_linear

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(peft_compat.ops, "lora_linear", counting)
    return calls


def _peft_llama(**fields) -> peft.PeftModel:
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_PROJECTIONS, init_lora_weights=False, **fields)
    return peft.get_peft_model(tiny_llama(), config)


def _peft_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


CASES = {
    "llama": (
        lambda: _peft_llama(),
        lambda: dict(input_ids=torch.randint(0, 128, (2, 11))),
        lambda out: out.logits,
    ),
    "minilm": (
        lambda: peft.get_peft_model(
            minilm(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=BERT_PROJECTIONS, init_lora_weights=False)
        ),
        lambda: dict(input_ids=torch.randint(0, 30522, (2, 9))),
        lambda out: torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()]),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_patched_peft_matches_peft_logits_and_lora_grads(case, fused_calls):
    build, make_inputs, select_output = CASES[case]
    torch.manual_seed(0)
    inputs = make_inputs()
    peft_model = build()
    patched = lorafast.patch_peft(copy.deepcopy(peft_model))
    results = []
    for model in (patched, peft_model):
        output = select_output(model(**inputs))
        output.square().mean().backward()
        results.append((output, _lora_grads(model)))
    (output, grads), (peft_output, peft_grads) = results
    assert len(fused_calls) == len(_peft_layers(peft_model)) > 0
    assert_close(output, peft_output, torch.float32)
    assert grads.keys() == peft_grads.keys()
    for name in grads:
        assert grads[name] is not None, name
        assert_close(grads[name], peft_grads[name], torch.float32, msg=name)


def test_dropout_is_applied_in_training_only(fused_calls):
    peft_model = _peft_llama(lora_dropout=0.5).eval()
    patched = lorafast.patch_peft(copy.deepcopy(peft_model))
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert_close(patched(ids).logits, peft_model(ids).logits, torch.float32)
        patched.train()
        assert (patched(ids).logits - peft_model(ids).logits).abs().max() > 1e-3
    assert len(fused_calls) == 2 * len(_peft_layers(peft_model))


def _saved_config(directory) -> dict:
    """adapter_config.json with target_modules sorted (PEFT keeps a set: its order varies between copies)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return config


def test_save_pretrained_disable_adapter_and_merge_and_unload_after_patching(tmp_path, fused_calls):
    ids = torch.randint(0, 128, (2, 11))
    peft_model = _peft_llama()
    patched = lorafast.patch_peft(copy.deepcopy(peft_model))
    with torch.no_grad():
        expected = peft_model(ids).logits
        base_logits = tiny_llama()(ids).logits
        patched.save_pretrained(tmp_path / "patched")
        peft_model.save_pretrained(tmp_path / "plain")
        weights = "adapter_model.safetensors"
        assert (tmp_path / "patched" / weights).read_bytes() == (tmp_path / "plain" / weights).read_bytes()
        assert _saved_config(tmp_path / "patched") == _saved_config(tmp_path / "plain")
        fused_calls.clear()
        with patched.disable_adapter():
            assert_close(patched(ids).logits, base_logits, torch.float32)
        assert not fused_calls
        assert_close(patched(ids).logits, expected, torch.float32)
        patched.merge_adapter()
        assert_close(patched(ids).logits, expected, torch.float32)
        patched.unmerge_adapter()
        merged = patched.merge_and_unload()
        assert not _peft_layers(merged)
        assert_close(merged(ids).logits, expected, torch.float32)


def test_set_adapter_switches_the_fused_adapter(fused_calls):
    ids = torch.randint(0, 128, (2, 11))
    peft_model = _peft_llama()
    second = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model.add_adapter("second", second)
    patched = lorafast.patch_peft(copy.deepcopy(peft_model))
    with torch.no_grad():
        for model in (patched, peft_model):
            model.set_adapter("second")
        fused_calls.clear()
        assert_close(patched(ids).logits, peft_model(ids).logits, torch.float32)
    assert len(fused_calls) == 2 * 2  # q_proj and v_proj of two layers have "second"; the rest run the base only


def test_unsupported_layers_stay_on_peft_and_are_listed_in_one_warning(fused_calls):
    ids = torch.randint(0, 128, (2, 11))
    peft_model = _peft_llama()
    dora = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    peft_model.add_adapter("dora", dora)
    peft_model.base_model.set_adapter(["default", "dora"])
    patched = copy.deepcopy(peft_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorafast.patch_peft(patched)
    messages = [str(w.message) for w in caught if "lorafast.patch_peft" in str(w.message)]
    assert len(messages) == 1
    assert "2 PEFT LoRA layer(s)" in messages[0] and "LoRA variant (DoraLinearVariant): " in messages[0]
    assert "layers.0.self_attn.q_proj" in messages[0] and "layers.1.self_attn.q_proj" in messages[0]
    assert "several active adapters" not in messages[0]  # only the DoRA layers have two adapters
    q_proj = patched.base_model.model.model.layers[0].self_attn.q_proj
    k_proj = patched.base_model.model.model.layers[0].self_attn.k_proj
    assert not peft_compat.is_patched(q_proj) and peft_compat.is_patched(k_proj)
    with torch.no_grad():
        assert_close(patched(ids).logits, peft_model(ids).logits, torch.float32)
    assert len(fused_calls) == len(_peft_layers(peft_model)) - 2


def _assert_patched_matches_peft_with_fallbacks(peft_model, warning: str, fallbacks: int, fused_calls) -> None:
    """patch_peft warns ``warning`` (a regex), the patched copy computes PEFT's logits, and all
    layers but ``fallbacks`` ran the fused op."""
    ids = torch.randint(0, 128, (2, 11))
    patched = copy.deepcopy(peft_model)
    with pytest.warns(UserWarning, match=warning):
        lorafast.patch_peft(patched)
    with torch.no_grad():
        assert_close(patched(ids).logits, peft_model(ids).logits, torch.float32)
    assert len(fused_calls) == len(_peft_layers(peft_model)) - fallbacks


def test_a_base_layer_with_a_hook_stays_on_peft(fused_calls):
    """PEFT calls its base layer, so a forward hook there (or accelerate's offloading, which
    replaces its forward) changes what the layer computes; the fused op would skip it."""
    peft_model = _peft_llama()
    base = peft_model.base_model.model.model.layers[1].mlp.down_proj.get_base_layer()
    base.register_forward_hook(lambda module, inputs, output: output * 0.5)
    warning = r"base layer: it has hooks: base_model\.model\.model\.layers\.1\.mlp\.down_proj"
    _assert_patched_matches_peft_with_fallbacks(peft_model, warning, 1, fused_calls)


def test_several_active_adapters_fall_back_to_peft(fused_calls):
    peft_model = _peft_llama()
    peft_model.add_adapter(
        "second", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False)
    )
    peft_model.base_model.set_adapter(["default", "second"])
    warning = r"several active adapters: .*layers\.0\.self_attn\.v_proj"
    _assert_patched_matches_peft_with_fallbacks(peft_model, warning, 2, fused_calls)


def test_unpatch_reverts_and_patching_twice_is_a_no_op(fused_calls):
    patched = lorafast.patch_peft(lorafast.patch_peft(_peft_llama()))
    layers = _peft_layers(patched)
    assert all(peft_compat.is_patched(layer) for layer in layers)
    lorafast.unpatch_peft(patched)
    assert not any("forward" in layer.__dict__ for layer in layers)
    patched(torch.randint(0, 128, (1, 4)))
    assert not fused_calls
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lorafast.patch_peft(tiny_llama())


def test_hf_trainer_trains_a_patched_model_like_peft(tmp_path, fused_calls):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (8, 12))
    dataset = [dict(input_ids=row, labels=row) for row in ids]
    trained = []
    for patch in (True, False):
        model = _peft_llama()
        if patch:
            lorafast.patch_peft(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patch)),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        transformers.Trainer(model=model, args=args, train_dataset=dataset).train()
        trained.append({name: p.detach() for name, p in model.named_parameters() if "lora_" in name})
    assert fused_calls
    start = {name: p for name, p in _peft_llama().named_parameters() if "lora_" in name}
    for name, value in trained[0].items():
        assert (value - start[name]).abs().max() > 1e-3, name
        assert_close(value, trained[1][name], torch.float32, msg=name)
