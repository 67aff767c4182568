"""save_adapter / load_adapter: PEFT's file format both ways, strict loading, atomic saving."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
from models import minilm, tiny_distilbert_classifier, tiny_llama
from tolerances import assert_close

import lorafast
from lorafast.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


def _llama_output(model, inputs):  # any model with logits
    return model(**inputs).logits


def _minilm_output(model, inputs):
    return model(**inputs).last_hidden_state


# name → (builder, LoraConfig fields, output selector, input factory)
CASES = {
    "llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]),
        _llama_output,
        lambda: dict(input_ids=torch.randint(0, 128, (2, 9))),
    ),
    "minilm-bias-all": (
        minilm,
        dict(target_modules=["query", "value"], bias="all", modules_to_save=["pooler.dense"]),
        _minilm_output,
        lambda: dict(input_ids=torch.randint(0, 30522, (2, 7))),
    ),
    "minilm-bias-lora-only": (
        minilm,
        dict(target_modules=["query", "key"], bias="lora_only", use_rslora=True, rank_pattern={"key": 2}),
        _minilm_output,
        lambda: dict(input_ids=torch.randint(0, 30522, (2, 7))),
    ),
    # PEFT trains a copy of a modules_to_save module: lm_head tied to the input embeddings is
    # trained apart from them
    "llama-tied-lm-head": (
        functools.partial(tiny_llama, tie_word_embeddings=True),
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        _llama_output,
        lambda: dict(input_ids=torch.randint(0, 128, (2, 9))),
    ),
    # a target inside a modules_to_save module (pooler.dense) gets no adapter: the module is trained whole
    "minilm-target-in-modules-to-save": (
        minilm,
        dict(target_modules=["query", "dense"], modules_to_save=["pooler"]),
        _minilm_output,
        lambda: dict(input_ids=torch.randint(0, 30522, (2, 7))),
    ),
    # PEFT's modules_to_save rule is a plain name suffix: "classifier" names pre_classifier too
    "distilbert-classifier-suffix": (
        tiny_distilbert_classifier,
        dict(target_modules=["q_lin", "v_lin"], modules_to_save=["classifier"]),
        _llama_output,
        lambda: dict(input_ids=torch.randint(0, 128, (2, 9))),
    ),
}


def _trained_lorafast_model(case: str) -> torch.nn.Module:
    """A lorafast model whose every trainable tensor (A, B, biases, modules_to_save) moved away from its start."""
    build, fields, _, _ = CASES[case]
    model = lorafast.apply_lora(build(), lorafast.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _trained_peft_model(case: str) -> peft.PeftModel:
    build, fields, _, _ = CASES[case]
    model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **fields))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def _assert_same_output_and_not_inert(case: str, loaded, reference) -> None:
    """``loaded`` computes what ``reference`` does, and that differs from the plain base model."""
    build, _, select_output, make_inputs = CASES[case]
    torch.manual_seed(0)
    inputs = make_inputs()
    with torch.no_grad():
        expected = select_output(reference, inputs)
        assert_close(select_output(loaded, inputs), expected, torch.float32)
        assert (expected - select_output(build(), inputs)).abs().max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_lorafast_adapter_loads_in_peft_with_the_same_output(case, tmp_path):
    model = _trained_lorafast_model(case)
    lorafast.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(CASES[case][0](), tmp_path).eval()
    _assert_same_output_and_not_inert(case, peft_model, model)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorafast_with_the_same_output(case, tmp_path):
    peft_model = _trained_peft_model(case)
    peft_model.save_pretrained(tmp_path)
    model = lorafast.load_adapter(CASES[case][0](), tmp_path)
    _assert_same_output_and_not_inert(case, model, peft_model)
    trainable = {
        re.sub(r"\.(lora_[AB])$", r".\1.weight", name)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    peft_trainable = {
        name.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", "")
        for name, parameter in peft_model.named_parameters()
        if parameter.requires_grad
    }
    assert trainable == {name.replace(".base_layer", "") for name in peft_trainable}


def test_peft_sequence_classification_adapter_loads(tmp_path):
    """PEFT's SEQ_CLS adapters list modules_to_save ["classifier", "score"]; BERT has no "score"."""
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False)
    peft_model = peft.get_peft_model(minilm(num_labels=3), config).eval()
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path)
    model = lorafast.load_adapter(minilm(num_labels=3), tmp_path)
    assert model.lora_config.modules_to_save == ["classifier"] and model.classifier.weight.requires_grad
    ids = torch.randint(0, 30522, (2, 7))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert_close(model(input_ids=ids).logits, expected, torch.float32)
        assert (expected - minilm(num_labels=3)(input_ids=ids).logits).abs().max() > 1e-2


def test_saved_config_and_keys_are_peft_s(tmp_path):
    model = _trained_lorafast_model("llama")
    lorafast.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"  # the model is a LlamaForCausalLM
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["modules_to_save"] == ["lm_head"]
    keys = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.weight" in keys
    assert len(keys) == 2 * 3 * 2 + 1


def test_target_modules_are_full_paths_when_leaf_names_would_select_more(tmp_path):
    config = lorafast.LoraConfig(r=2, lora_alpha=2, target_modules=["attention.output.dense"], init_lora_weights=False)
    model = lorafast.apply_lora(minilm(), config)
    lorafast.save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"]
    assert targets == [f"encoder.layer.{i}.attention.output.dense" for i in range(6)]
    peft_model = peft.PeftModel.from_pretrained(minilm(), tmp_path)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules()) == 6


def test_peft_key_variants_load(tmp_path):
    """Keys with ``.lora_A.default.weight`` (some PEFT versions) and without the ``base_model.model.`` prefix."""
    model = _trained_lorafast_model("llama")
    lorafast.save_adapter(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    renamed = {
        key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A.default.weight"): value
        for key, value in tensors.items()
    }
    safetensors.torch.save_file(renamed, tmp_path / WEIGHTS_NAME)
    _assert_same_output_and_not_inert("llama", lorafast.load_adapter(tiny_llama(), tmp_path), model)


def test_legacy_pickle_adapter_loads(tmp_path):
    """PEFT before safetensors wrote adapter_model.bin (a pickled state dict)."""
    model = _trained_lorafast_model("llama")
    lorafast.save_adapter(model, tmp_path)
    torch.save(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME), tmp_path / LEGACY_WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    _assert_same_output_and_not_inert("llama", lorafast.load_adapter(tiny_llama(), tmp_path), model)
    torch.save(torch.zeros(3), tmp_path / LEGACY_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"adapter_model\.bin hold a Tensor, not a dict"):
        lorafast.load_adapter(tiny_llama(), tmp_path)


def test_load_into_an_already_adapted_model(tmp_path):
    model = _trained_lorafast_model("llama")
    lorafast.save_adapter(model, tmp_path)
    fields = CASES["llama"][1]
    target = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(r=4, lora_alpha=8, **fields))
    _assert_same_output_and_not_inert("llama", lorafast.load_adapter(target, tmp_path), model)
    other_alpha = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(r=4, lora_alpha=16, **fields))
    with pytest.raises(ValueError, match=r"lora_alpha=8.*lora_alpha=16"):
        lorafast.load_adapter(other_alpha, tmp_path)


def _edit_tensors(edit):
    def corrupt(directory: Path) -> None:
        tensors = safetensors.torch.load_file(directory / WEIGHTS_NAME)
        edit(tensors)
        safetensors.torch.save_file(tensors, directory / WEIGHTS_NAME)

    return corrupt


def _edit_config(edit):
    def corrupt(directory: Path) -> None:
        config = json.loads((directory / CONFIG_NAME).read_text())
        edit(config)
        (directory / CONFIG_NAME).write_text(json.dumps(config))

    return corrupt


def _truncate(directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

BAD_ADAPTERS = {
    "missing key": (_edit_tensors(lambda t: t.pop(B_KEY)), r"lacks 1 tensor.*layers\.0\.self_attn\.q_proj\.lora_B"),
    "extra key": (
        _edit_tensors(lambda t: t.update({"base_model.model.model.norm.lora_A.weight": torch.zeros(4, 64)})),
        r"no place for.*model\.norm\.lora_A\.weight",
    ),
    "shape mismatch": (
        _edit_tensors(lambda t: t.update({B_KEY: torch.zeros(64, 3)})),
        r"q_proj\.lora_B\.weight' has shape \(64, 3\), the model expects \(64, 4\)",
    ),
    "config without r": (_edit_config(lambda c: c.pop("r")), r"field 'r' is missing"),
    "config without lora_alpha": (_edit_config(lambda c: c.pop("lora_alpha")), r"field 'lora_alpha' is missing"),
    "invalid r": (_edit_config(lambda c: c.update(r=0)), r"LoraConfig\.r must be a positive integer"),
    "not LoRA": (_edit_config(lambda c: c.update(peft_type="PREFIX_TUNING")), r"peft_type is 'PREFIX_TUNING'"),
    "DoRA": (_edit_config(lambda c: c.update(use_dora=True)), r"use_dora=True is a PEFT option"),
    "truncated safetensors": (_truncate, r"cannot read adapter weights .*adapter_model\.safetensors"),
    "garbage safetensors": (
        lambda d: (d / WEIGHTS_NAME).write_bytes(b"\xff" * 64),
        r"cannot read adapter weights .*adapter_model\.safetensors",
    ),
    "invalid JSON": (lambda d: (d / CONFIG_NAME).write_text("{r: 4"), r"adapter_config\.json is not valid JSON"),
    "another model's adapter": (
        _edit_config(lambda c: c.update(target_modules=["query", "value"])),
        r"does not fit this model.*target_modules \['query', 'value'\] matched no linear layer",
    ),
}


@pytest.mark.parametrize("bad", BAD_ADAPTERS)
def test_bad_adapter_is_an_error_naming_the_problem_and_leaves_the_model_plain(bad, tmp_path):
    corrupt, message = BAD_ADAPTERS[bad]
    lorafast.save_adapter(_trained_lorafast_model("llama"), tmp_path)
    corrupt(tmp_path)
    model = tiny_llama()
    before = {name: (parameter.clone(), parameter.requires_grad) for name, parameter in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        lorafast.load_adapter(model, tmp_path)
    assert not list(lorafast.lora_layers(model)) and not hasattr(model, "lora_config")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name], value) and after[name].requires_grad == requires_grad, name


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_adapter_file(missing, tmp_path):
    lorafast.save_adapter(_trained_lorafast_model("llama"), tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        lorafast.load_adapter(tiny_llama(), tmp_path)


def test_save_needs_a_lorafast_adapter(tmp_path):
    with pytest.raises(ValueError, match="no lorafast adapter"):
        lorafast.save_adapter(tiny_llama(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def _failing_save_file(tensors, filename, metadata=None):
    """Write half a file, then fail, as an interrupted save would."""
    Path(filename).write_bytes(b"partial")
    raise OSError("disk full")


def test_interrupted_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    adapter_dir = tmp_path / "adapter"
    lorafast.save_adapter(_trained_lorafast_model("llama"), adapter_dir)
    (adapter_dir / "README.md").write_text("kept")
    before = {path.name: path.read_bytes() for path in adapter_dir.iterdir()}
    changed = _trained_lorafast_model("llama")
    with torch.no_grad():
        changed.lm_head.weight.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        lorafast.save_adapter(changed, adapter_dir)
    with pytest.raises(OSError, match="disk full"):
        lorafast.save_adapter(changed, tmp_path / "new_adapter")
    assert {path.name: path.read_bytes() for path in adapter_dir.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    lorafast.save_adapter(changed, adapter_dir)
    assert (adapter_dir / "README.md").read_text() == "kept"
    assert (adapter_dir / WEIGHTS_NAME).read_bytes() != before[WEIGHTS_NAME]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_staging_stays_on_the_target_s_filesystem(tmp_path, monkeypatch):
    """A rename across filesystems fails (EXDEV), and a mount point cannot be renamed (EBUSY): an
    existing target is staged inside itself, and a mount point (a Docker volume, here a stand-in)
    replaced whole keeps its directory and gets exactly the new entries."""
    from lorafast.adapters import atomic_directory

    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("kept")
    with atomic_directory(target, replace_whole=False) as staging:
        assert staging.parent == target
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt", "new.txt"]
    monkeypatch.setattr("os.path.ismount", lambda path: Path(path) == target)
    (target / "old_dir").mkdir()
    inode = target.stat().st_ino
    with atomic_directory(target, replace_whole=True) as staging:
        assert staging.parent == target
        (staging / "new.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and (target / "new.txt").read_text() == "newer"
    assert target.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
