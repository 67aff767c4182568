"""Bit-exact unmerge (merge residual) and the ``lorafast merge`` export command."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import transformers
from kernel_harness import interpreter_bf16_fixes
from models import LLAMA_PROJECTIONS, minilm, minilm_dir, tiny_llama
from tolerances import assert_close
from transformers.pytorch_utils import Conv1D

import lorafast
from lorafast import cli, reference
from lorafast.export import merge_residual_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view({4: torch.int32, 2: torch.int16}[tensor.element_size()]).clone()


def _trained_like(model: torch.nn.Module, relative_size: float = 0.05) -> None:
    """Give every LoRA B random values scaled so that ‖s·B A‖ = relative_size·‖W‖ (B starts at zero; training grows it)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lorafast.lora_layers(model):
            layer.lora_B.normal_()
            layer.lora_B.mul_(relative_size * layer.weight.float().norm() / layer.delta_weight().norm())


def _peft_unmerge_error(model: torch.nn.Module, config: peft.LoraConfig, dtype: torch.dtype) -> float:
    """Max |W − W after PEFT's merge_adapter + unmerge_adapter| with the same base and the model's A, B."""
    peft_model = peft.get_peft_model(tiny_llama(dtype=dtype), config)
    layers = dict(lorafast.lora_layers(model))
    peft_layers = {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    with torch.no_grad():
        for name, module in peft_layers.items():
            module.lora_A["default"].weight.copy_(layers[name].lora_A)
            module.lora_B["default"].weight.copy_(layers[name].lora_B)
    before = {name: module.get_base_layer().weight.detach().clone() for name, module in peft_layers.items()}
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    return max((m.get_base_layer().weight - before[name]).abs().max().item() for name, m in peft_layers.items())


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_restores_base_weights_bit_for_bit_peft_does_not(dtype):
    config = dict(r=16, lora_alpha=32, target_modules=LLAMA_PROJECTIONS)
    model = lorafast.apply_lora(tiny_llama(dtype=dtype), lorafast.LoraConfig(**config))
    _trained_like(model)
    before = {name: _bits(layer.weight) for name, layer in lorafast.lora_layers(model)}
    lorafast.merge(model)
    residual = merge_residual_bytes(model)
    weight_bytes = sum(layer.weight.nbytes for _, layer in lorafast.lora_layers(model))
    lorafast.unmerge(model)
    for name, layer in lorafast.lora_layers(model):
        assert torch.equal(_bits(layer.weight), before[name]), name
        assert layer.merge_residual_bytes() == 0
    assert all(size > 0 for size in residual.values())  # rounding did lose bits: the residual is doing the work

    peft_error = _peft_unmerge_error(model, peft.LoraConfig(**config), dtype)
    print(
        f"\n{dtype}: lorafast unmerge error 0 (bit-exact), residual {sum(residual.values())} B = "
        f"{100 * sum(residual.values()) / weight_bytes:.1f}% of the adapted weights; PEFT unmerge max error {peft_error:.3g}"
    )
    if dtype != torch.float32:
        assert peft_error > 0


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def merge_backend(request):
    """The reference merge, and the Triton ``lora_merge_`` kernel (the interpreter on CPU)."""
    lorafast.set_backend(request.param)
    assert lorafast.ops.use_triton(torch.device("cpu")) == (request.param == "triton")
    with interpreter_bf16_fixes():
        yield request.param
    lorafast.set_backend("auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [torch.nn.Linear, Conv1D])
def test_layer_unmerge_is_bit_exact_on_each_merge_backend(base, dtype, merge_backend):
    torch.manual_seed(0)
    layer = lorafast.LoraLinear(base(64, 48).to(dtype), r=8, lora_alpha=16)
    _trained_like(torch.nn.Sequential(layer))
    before = _bits(layer.weight)
    layer.merge()
    assert layer.merge_residual_bytes() > 0
    layer.unmerge()
    assert torch.equal(_bits(layer.weight), before)


def test_unmerge_after_editing_the_adapter_is_the_plain_subtraction():
    torch.manual_seed(0)
    layer = lorafast.LoraLinear(torch.nn.Linear(64, 48).to(torch.bfloat16), r=4, lora_alpha=8, init_lora_weights=False)
    layer.merge()
    merged = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.mul_(0.5)
    layer.unmerge()
    expected = reference.merged_weight(merged, layer.lora_A, layer.lora_B, -layer.scaling)
    assert torch.equal(_bits(layer.weight), _bits(expected))


def test_residual_is_reported_and_small_for_a_realistic_bf16_layer():
    """bf16 [1024, 1024] ~ N(0, 0.02), r=16, kaiming A, B ~ N(0, 0.01): a few % of the weight's bytes."""
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 1024, bias=False)
    torch.nn.init.normal_(base.weight, std=0.02)
    layer = lorafast.LoraLinear(base.to(torch.bfloat16), r=16, lora_alpha=32)
    torch.nn.init.normal_(layer.lora_B, std=0.01)
    layer.merge()
    share = layer.merge_residual_bytes() / layer.weight.nbytes
    print(f"\nbf16 1024x1024 r=16: merge residual {layer.merge_residual_bytes()} B = {100 * share:.1f}% of the weight")
    assert 0 < share < 0.25
    assert math.isclose(layer.merge_residual_bytes() % 6, 0)  # int32 index + bf16 value per kept element


def _run_cli(*argv) -> int:
    return cli.main(["merge", *[str(a) for a in argv]])


def test_merge_cli_writes_a_plain_transformers_model_with_the_tokenizer(tmp_path):
    model = lorafast.apply_lora(minilm(), lorafast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _trained_like(model)
    lorafast.save_adapter(model, tmp_path / "adapter")
    assert _run_cli("--model", minilm_dir(), "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged") == 0
    merged = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "BertModel"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = tokenizer(["a merged model", "loads with plain transformers"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        assert (expected - minilm()(**inputs).last_hidden_state).abs().max() > 1e-2
        assert_close(merged(**inputs).last_hidden_state, expected, torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_merge_cli_builds_the_classifier_a_seq_cls_adapter_was_trained_with(tmp_path):
    """An adapter saved from a sequence classifier says task_type SEQ_CLS (as PEFT's); merged into
    the bare checkpoint it was trained from (MiniLM's architectures: BertModel, as `lorafast
    finetune --task seq-cls` starts from), merge builds the classifier with the adapter's label
    count and its trained head, instead of failing on the head's weights."""
    model = lorafast.apply_lora(
        minilm(num_labels=3), lorafast.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])
    )
    _trained_like(model)
    lorafast.save_adapter(model, tmp_path / "adapter")
    assert lorafast.adapters.read_task_type(tmp_path / "adapter") == "SEQ_CLS"
    assert _run_cli("--model", minilm_dir(), "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged") == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 30522, (2, 7))
    with torch.no_grad():
        assert merged.config.num_labels == 3
        assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, torch.float32)


def test_merge_cli_keeps_the_architecture_and_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    argv = ["--model", tmp_path / "base", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged"]
    assert _run_cli(*argv, "--dtype", "bfloat16") == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = copy.deepcopy(peft_model).to(torch.bfloat16).eval()(ids).logits
        assert_close(merged(ids).logits, expected, torch.bfloat16)


def test_merge_cli_errors_leave_no_output(tmp_path, capsys, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = lorafast.apply_lora(tiny_llama(), lorafast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    lorafast.save_adapter(model, tmp_path / "adapter")
    argv = ["--model", tmp_path / "base", "--adapter", tmp_path / "adapter"]

    assert _run_cli(*argv[:2], "--adapter", tmp_path / "nowhere", "--out", tmp_path / "out") == 2
    assert "--adapter" in capsys.readouterr().err
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    assert _run_cli(*argv, "--out", tmp_path / "out") == 2
    assert "'lora_alpha' is missing" in capsys.readouterr().err
    lorafast.save_adapter(model, tmp_path / "adapter")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _failing_save_pretrained)
    assert _run_cli(*argv, "--out", tmp_path / "out") == 2
    assert "error: disk full" in capsys.readouterr().err
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]

    (tmp_path / "broken").mkdir()  # a checkpoint whose weights were cut short
    (tmp_path / "broken" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    weights = (tmp_path / "base" / "model.safetensors").read_bytes()
    (tmp_path / "broken" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert _run_cli("--model", tmp_path / "broken", "--adapter", tmp_path / "adapter", "--out", tmp_path / "out") == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "out").exists()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.safetensors").write_text("old")
    assert _run_cli(*argv, "--out", tmp_path / "out") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run_cli(*argv, "--out", tmp_path / "out", "--overwrite") == 0
    assert not (tmp_path / "out" / "stale.safetensors").exists() and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "broken", "out"]


def _failing_save_pretrained(self, directory, **kwargs):
    (directory / "config.json").write_text("{")
    raise OSError("disk full")
