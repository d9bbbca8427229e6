"""FLoRA on bitsandbytes bases (QLoRA): nf4, fp4 and int8 Linear layers on the CPU backend.

The base stays quantized and frozen, ``unload`` without a merge gives back the
very module and bytes, merging rounds ``W + ΔW`` to the quantization grid
(checked against the dequantized reference within one step of that grid, and
against PEFT's LoRA merge on the same module), adapters save, load, export and
import. bitsandbytes rewrites its own storage after a forward (int8 scales
move to ``module.state``; on CPUs with AVX512-BF16, 4-bit weights are repacked
in eval mode), so every merge test runs after train and eval forwards; the
repacked 4-bit layout is built here with bitsandbytes' own converter, as its
forward would on such a CPU.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from bnb_cases import IN, MODES, OUT, QUANTS
from bnb_cases import quantized_base as _base
from bnb_cases import randomize as _randomize
from bnb_cases import run as _run
from bnb_cases import same_bytes as _same_bytes
from bnb_cases import snapshot as _snapshot
from bnb_cases import step as _step
from tiny_models import tiny_bert_config
from torch import nn

import flora
from flora.layers.bnb import (
    QuantizedLinear,
    dequantize_weight,
    is_quantized,
    quantization,
    quantize_weight,
    requantize_into,
)

bnb = pytest.importorskip("bitsandbytes")


def _model(quant: str, **config: object) -> nn.Sequential:
    model = nn.Sequential(_base(quant), nn.ReLU(), nn.Linear(OUT, 8))
    options = {"ranks": 4, "target_modules": ["0"], **config}
    return flora.inject(model, flora.FLoRAConfig(**options))


# -- injecting --------------------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANTS)
def test_inject_wraps_the_quantized_module_and_trains_only_the_adapter(quant) -> None:
    base = _base(quant)
    model = flora.inject(
        nn.Sequential(base, nn.ReLU(), nn.Linear(OUT, 8)),
        flora.FLoRAConfig(ranks=4, target_modules="all-linear"),
    )
    layer = model[0]
    assert type(layer) is QuantizedLinear
    assert layer.base_layer is base
    assert type(model[2]) is flora.Linear
    assert layer.kind == "Linear"
    assert layer.shape == (OUT, IN)
    assert layer.ranks == (4, 4)
    assert quantization(base) == quant
    assert is_quantized(base)
    assert layer.core.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{i}.adapters.default.{t}" for i in (0, 2) for t in ("core", "factors.0", "factors.1")
    }
    x = torch.randn(5, IN, requires_grad=True)
    _randomize(layer)
    model.train()
    model(x).square().sum().backward()
    assert base.weight.grad is None
    assert base.bias.grad is None
    assert layer.core.grad.abs().sum() > 0
    assert layer.factors[1].grad.abs().sum() > 0
    assert x.grad is not None


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("forward", ["factorized", "dense"])
def test_forward_is_the_base_output_plus_the_branch(quant, mode, forward) -> None:
    model = _model(quant, forward=forward)
    layer, x = model[0], torch.randn(6, IN)
    _randomize(layer)
    out = _run(model[:1], mode, x)
    expected = layer.base_layer(x) + F.linear(x, layer.delta_weight().detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_branch_runs_in_float32_beside_a_bfloat16_compute_dtype() -> None:
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.bfloat16).to("cpu")
    layer = QuantizedLinear(base, ranks=4)
    _randomize(layer)
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    out = layer(x)
    assert layer.core.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    branch = F.linear(x.float(), layer.delta_weight().detach())
    torch.testing.assert_close(out, base(x) + branch.to(torch.bfloat16))


# -- unload, merge, unmerge --------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANTS)
def test_unload_without_merge_gives_back_the_module_bit_for_bit(quant) -> None:
    base, x = _base(quant), torch.randn(4, IN)
    model = nn.Sequential(base)
    for mode in MODES:  # bitsandbytes settles its own storage in its first forwards
        _run(model, mode, x)
    before, weight = _snapshot(base), base.weight
    flora.inject(model, flora.FLoRAConfig(ranks=4, target_modules=["0"]))
    _randomize(model[0])
    for mode in MODES:
        _run(model, mode, x)
    flora.unload(model, merge=False)
    assert model[0] is base
    assert base.weight is weight
    assert _same_bytes(base, before)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("mode", MODES)
def test_merge_rounds_the_sum_to_the_grid_with_a_warning(quant, mode) -> None:
    model, x = _model(quant), torch.randn(4, IN)
    layer = model[0]
    _randomize(layer)
    _run(model, mode, x)  # the layout merge meets is the one after a forward
    original = dequantize_weight(layer.base_layer)
    reference = original + layer.delta_weight().detach()
    with pytest.warns(UserWarning, match=rf"quantized base layer \({quant}\).*rounded"):
        flora.merge(model)
    merged = dequantize_weight(layer.base_layer)
    assert layer.merged
    assert not torch.equal(merged, original)
    assert ((merged - reference).abs() <= _step(quant, reference)).all()
    assert ((layer.effective_weight() - merged).abs() == 0).all()
    _run(model, mode, x)  # the merged layer runs
    with pytest.warns(UserWarning, match="does not give the original quantized weight back"):
        flora.unmerge(model)
    restored = dequantize_weight(layer.base_layer)
    assert ((restored - original).abs() <= 2 * _step(quant, reference)).all()


@pytest.mark.parametrize("quant", QUANTS)
def test_merged_weight_equals_peft_merge_on_the_same_module(quant, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = nn.Sequential(_base(quant))
    original = copy.deepcopy(model)
    flora.inject(model, flora.FLoRAConfig(ranks=4, target_modules=["0"]))
    _randomize(model[0])
    flora.export_lora(model, tmp_path / "lora")
    setattr(original, "is_loaded_in_8bit" if quant == "int8" else "is_loaded_in_4bit", True)
    theirs = peft.PeftModel.from_pretrained(original, tmp_path / "lora")
    assert type(theirs.base_model.model[0]).__module__ == "peft.tuners.lora.bnb"
    x = torch.randn(5, IN)
    torch.testing.assert_close(_run(theirs, "eval", x), _run(model, "eval", x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flora.merge(model)
        merged = theirs.merge_and_unload()
    ours, peft_weight = dequantize_weight(model[0].base_layer), dequantize_weight(merged[0])
    # The same dequantize, add, quantize; ΔW differs by float32 rounding only.
    torch.testing.assert_close(ours, peft_weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("quant", QUANTS)
def test_safe_merge_refuses_non_finite_results_and_changes_nothing(quant) -> None:
    model = _model(quant)
    layer = model[0]
    before = _snapshot(layer.base_layer)
    with torch.no_grad():
        layer.core.fill_(float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no rounding warning: nothing is merged
        with pytest.raises(ValueError, match=r"layer '0'.*NaN or infinite"):
            flora.merge(model)
        with pytest.raises(ValueError, match=r"layer '0'.*NaN or inf"):
            flora.unload(model)
    assert not layer.merged
    assert type(model[0]) is QuantizedLinear
    assert _same_bytes(layer.base_layer, before)


@pytest.mark.parametrize("quant", QUANTS)
def test_unload_with_merge_leaves_a_quantized_model_computing_the_merged_weight(quant) -> None:
    model, x = _model(quant), torch.randn(3, IN)
    _randomize(model[0])
    expected = dequantize_weight(model[0].base_layer) + model[0].delta_weight().detach()
    with pytest.warns(UserWarning, match="quantized base layer"):
        flora.unload(model)
    assert is_quantized(model[0])
    assert model[0].weight.requires_grad is False
    assert ((dequantize_weight(model[0]) - expected).abs() <= _step(quant, expected)).all()
    model(x)


def test_a_base_quantized_from_bfloat16_weights_stays_bfloat16_after_a_merge() -> None:
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.bfloat16)
    base = base.to(torch.bfloat16).to("cpu")  # as from_pretrained(torch_dtype=bfloat16) does
    assert base.weight.quant_state.dtype == torch.bfloat16
    model = flora.inject(nn.Sequential(base), flora.FLoRAConfig(ranks=4, target_modules=["0"]))
    layer = model[0]
    _randomize(layer)
    assert layer.core.dtype == torch.float32
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16
    reference = dequantize_weight(base).float() + layer.delta_weight().detach()
    with pytest.warns(UserWarning, match="quantized base layer"):
        flora.merge(model)
    merged = dequantize_weight(base)
    assert merged.dtype == torch.bfloat16
    assert base.weight.quant_state.dtype == torch.bfloat16
    assert ((merged.float() - reference).abs() <= _step("nf4", reference)).all()


# -- bitsandbytes layouts -------------------------------------------------------------------


def _repack(base: nn.Module) -> None:
    """What the eval forward of a Linear4bit does on a CPU with AVX512-BF16."""
    functional = bnb.functional
    base.weight.data, state = functional._convert_weight_packed_for_cpu(
        base.weight.data, base.weight.quant_state
    )
    base.weight.quant_state = state


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_the_cpu_repacked_4bit_layout_dequantizes_and_merges(quant) -> None:
    base = _base(quant)
    plain = dequantize_weight(base)
    _repack(base)
    assert base.weight.quant_state.packing_format_for_cpu
    repacked = dequantize_weight(base)
    # The repacked layout keeps the block scales in bfloat16: 2^-8 relative.
    torch.testing.assert_close(repacked, plain, rtol=2**-8, atol=0)
    layer = QuantizedLinear(base, ranks=4)
    _randomize(layer)
    reference = repacked + layer.delta_weight().detach()
    with pytest.warns(UserWarning, match="quantized base layer"):
        layer.merge()
    state = base.weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False)
    assert state.dtype == torch.float32
    assert ((dequantize_weight(base) - reference).abs() <= _step(quant, reference)).all()


def test_plain_block_scales_merge_and_stay_plain() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    base = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compress_statistics=False)
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")
    assert not base.weight.quant_state.nested
    assert ((dequantize_weight(base) - linear.weight).abs() <= _step("nf4", linear.weight)).all()
    layer = QuantizedLinear(base, ranks=4)
    _randomize(layer)
    reference = dequantize_weight(base) + layer.delta_weight().detach()
    with pytest.warns(UserWarning, match="quantized base layer"):
        layer.merge()
    assert not base.weight.quant_state.nested
    assert ((dequantize_weight(base) - reference).abs() <= _step("nf4", reference)).all()


def test_int8_scales_are_read_before_and_after_the_first_forward() -> None:
    base = _base("int8")
    before = dequantize_weight(base)
    assert base.weight.SCB is not None
    assert base.state.SCB is None
    _run(nn.Sequential(base), "train", torch.randn(2, IN))
    assert base.weight.SCB is None
    assert base.state.SCB is not None
    assert torch.equal(dequantize_weight(base), before)


@pytest.mark.parametrize("quant", QUANTS)
def test_requantizing_the_dequantized_weight_keeps_it(quant) -> None:
    base = _base(quant)
    _run(nn.Sequential(base), "eval", torch.randn(2, IN))
    weight = dequantize_weight(base)
    fresh = quantize_weight(base, weight)
    assert fresh.requires_grad is False
    assert base.weight is not fresh
    requantize_into(base, weight)
    torch.testing.assert_close(dequantize_weight(base), weight, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match=r"weight must have shape \(64, 128\)"):
        quantize_weight(base, weight.T)


# -- adapters: named, saved, exported ----------------------------------------------------------


@pytest.mark.parametrize("quant", QUANTS)
def test_named_adapters_switch_on_a_quantized_base(quant) -> None:
    model, x = _model(quant), torch.randn(3, IN)
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]), adapter_name="other")
    _randomize(model[0].adapters["other"], seed=5)
    first = _run(model, "eval", x)
    flora.set_adapter(model, "other")
    second = _run(model, "eval", x)
    assert not torch.equal(first, second)
    flora.set_adapter(model, "default")
    flora.delete_adapter(model, "other")
    torch.testing.assert_close(_run(model, "eval", x), first)


@pytest.mark.parametrize("quant", QUANTS)
def test_save_and_load_round_trip_without_the_quantized_base(quant, tmp_path) -> None:
    model, x = _model(quant), torch.randn(3, IN)
    fresh = copy.deepcopy(flora.unload(copy.deepcopy(model), merge=False))
    _randomize(model[0])
    flora.save_adapter(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    from safetensors.torch import load_file

    tensors = load_file(next(tmp_path.glob("*.safetensors")))
    assert all(
        "base_layer" not in key and tensor.dtype == torch.float32 for key, tensor in tensors.items()
    ), files
    size = sum(t.numel() for t in tensors.values())
    assert size == 4 * 4 + (OUT + IN) * 4
    flora.load_adapter(fresh, tmp_path)
    assert type(fresh[0]) is QuantizedLinear
    torch.testing.assert_close(_run(fresh, "eval", x), _run(model, "eval", x), rtol=0, atol=0)


@pytest.mark.parametrize("quant", QUANTS)
def test_lora_export_and_import_round_trip_on_a_quantized_base(quant, tmp_path) -> None:
    model, x = _model(quant), torch.randn(3, IN)
    _randomize(model[0])
    flora.save_adapter(model, tmp_path / "flora")
    plain = flora.unload(copy.deepcopy(model), merge=False)
    flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=plain)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["target_modules"] == ["0"]
    flora.import_lora(plain, tmp_path / "lora")
    assert type(plain[0]) is QuantizedLinear
    assert plain[0].core.dtype == torch.float32
    torch.testing.assert_close(_run(plain, "eval", x), _run(model, "eval", x))


# -- refusals -----------------------------------------------------------------------------


def test_a_4bit_layer_not_yet_quantized_is_refused_by_name() -> None:
    model = nn.Sequential(bnb.nn.Linear4bit(IN, OUT, quant_type="nf4"))
    with pytest.raises(ValueError, match=r"layer '0'.*not quantized yet.*moved to a device"):
        flora.inject(model, flora.FLoRAConfig(target_modules=["0"]))
    assert type(model[0]) is bnb.nn.Linear4bit


def test_an_int8_layer_with_float_weights_is_refused_by_name() -> None:
    model = nn.Sequential(bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True).to("cpu"))
    with pytest.raises(ValueError, match=r"layer '0'.*has_fp16_weights=False"):
        flora.inject(model, flora.FLoRAConfig(target_modules=["0"]))


def test_quantized_linear_refuses_a_plain_linear() -> None:
    with pytest.raises(TypeError, match="bitsandbytes Linear4bit or Linear8bitLt, got a Linear"):
        QuantizedLinear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="got a Linear"):
        dequantize_weight(nn.Linear(4, 4))


def test_merged_state_dict_refuses_a_quantized_base() -> None:
    model = _model("nf4")
    with pytest.raises(ValueError, match=r"layer '0' has a quantized base \(nf4\).*flora\.unload"):
        flora.merged_state_dict(model)


def test_flora_imports_and_adapts_without_bitsandbytes() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, flora\n"
        "m = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)),"
        " flora.FLoRAConfig(target_modules='all-linear'))\n"
        "assert type(m[0]) is flora.Linear and 'bitsandbytes' not in [k for k, v in"
        " sys.modules.items() if v is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_hosvd_init_is_refused_before_anything_changes(tmp_path) -> None:
    model = nn.Sequential(_base("nf4"), nn.ReLU(), nn.Linear(OUT, 8))
    before = _snapshot(model)
    config = flora.FLoRAConfig(ranks=4, target_modules=["0", "2"], init="hosvd")
    with pytest.raises(ValueError, match=r"layer '0': init='hosvd'.*quantized base \(nf4\)"):
        flora.inject(model, config)
    assert type(model[0]) is bnb.nn.Linear4bit
    assert type(model[2]) is nn.Linear
    assert _same_bytes(model, before)
    with pytest.raises(ValueError, match=r"adapter 'default': init='hosvd'"):
        QuantizedLinear(model[0], ranks=4, init="hosvd")
    # A saved hosvd adapter (trained on a full-precision base) is refused too.
    plain = nn.Sequential(nn.Linear(IN, OUT))
    flora.save_adapter(
        flora.inject(plain, flora.FLoRAConfig(ranks=4, target_modules=["0"], init="hosvd")),
        tmp_path,
    )
    quantized = nn.Sequential(_base("nf4"))
    with pytest.raises(ValueError, match=r"layer '0': init='hosvd'"):
        flora.load_adapter(quantized, tmp_path)
    assert type(quantized[0]) is bnb.nn.Linear4bit


def test_a_transformers_model_loaded_in_4bit_trains_saves_and_loads(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        num_labels=3,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    quantization_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )

    def load() -> nn.Module:
        return transformers.BertForSequenceClassification.from_pretrained(
            tmp_path / "base", quantization_config=quantization_config, device_map="cpu"
        )

    model = flora.inject(load(), flora.FLoRAConfig(ranks=4, target_modules="all-linear"))
    layers = flora.adapted_layers(model)
    assert {type(layer) for layer in layers.values()} == {QuantizedLinear}
    assert "classifier" not in layers  # the output layer, as PEFT's all-linear
    assert len(layers) == 2 * 6 + 1  # q, k, v, attention output, MLP in and out; the pooler
    ids = torch.randint(0, 100, (2, 8))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    restored = flora.load_adapter(load(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("mode", MODES)
def test_an_int8_merge_beyond_float16_range_is_refused_and_changes_nothing(mode) -> None:
    # bitsandbytes quantizes int8 weights from float16: W + ΔW beyond ±65504 would
    # quantize to garbage (PEFT writes it). Refused, safe or not, naming the layer.
    model = _model("int8", init="gaussian")
    layer = model[0]
    _run(model, mode, torch.randn(2, IN))  # scales move to module.state
    before = _snapshot(layer.base_layer)
    with torch.no_grad():
        layer.core.zero_()
        out_factor, in_factor = layer.factors
        layer.core[0, 0] = 1e5 / (out_factor[:, 0].abs().max() * in_factor[:, 0].abs().max())
    largest = (dequantize_weight(layer.base_layer) + layer.delta_weight()).abs().max().item()
    assert 65504 < largest < 3e38  # finite in float32, infinite in float16
    message = (
        r"layer '0': merging \['default'\]: the merged weight has entries up to .* "
        r"beyond float16's ±65504.* nothing was merged"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no rounding warning: nothing is merged
        for safe in (True, False):
            with pytest.raises(ValueError, match=message):
                flora.merge(model, safe=safe)
        with pytest.raises(ValueError, match=r"layer '0': the merged weight has entries .*float16"):
            flora.unload(model)
        with pytest.raises(ValueError, match=r"beyond float16's ±65504"):
            requantize_into(layer.base_layer, layer.effective_weight())
    assert not layer.merged
    assert type(model[0]) is QuantizedLinear
    assert _same_bytes(layer.base_layer, before)


def test_a_4bit_merge_beyond_its_float16_source_range_is_refused() -> None:
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.float16)
    base = base.to(torch.float16).to("cpu")  # as from_pretrained(torch_dtype=float16) does
    assert base.weight.quant_state.dtype == torch.float16
    model = nn.Sequential(base)
    model = flora.inject(model, flora.FLoRAConfig(ranks=4, target_modules=["0"], init="gaussian"))
    before = _snapshot(base)
    with torch.no_grad():
        model[0].core.fill_(1e6)
    with pytest.raises(ValueError, match=r"layer '0': merging .* beyond float16's ±65504"):
        flora.merge(model, safe=False)
    assert not model[0].merged
    assert _same_bytes(base, before)
