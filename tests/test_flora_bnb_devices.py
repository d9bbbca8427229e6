"""bitsandbytes bases on every device at hand: the CPU backend here, CUDA where there is one.

The same checks for nf4, fp4 and int8 bases on each device: inject, the
forward against PEFT's LoRA layer for bitsandbytes (``peft.tuners.lora.bnb``)
on the same quantized module, merge and unmerge rounded to the grid (and
equal to PEFT's merge), a training step that leaves the quantized base's
bytes alone, ``unload`` without merge giving back the module bit for bit,
and the refused int8 overflow. The CUDA cases carry the ``gpu`` mark and
skip without a CUDA device; on a GPU machine run
``python3 -m pytest tests/test_flora_bnb_devices.py -q``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from bnb_cases import (
    IN,
    MODES,
    OUT,
    QUANTS,
    quantized_base,
    randomize,
    run,
    same_bytes,
    snapshot,
    step,
)
from torch import nn

import flora
from flora.layers.bnb import QuantizedLinear, dequantize_weight

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]

pytestmark = pytest.mark.parametrize("device", DEVICES)
quants = pytest.mark.parametrize("quant", QUANTS)


@pytest.fixture(autouse=True)
def _exact_matmuls() -> None:
    # TF32 matmuls round to about 1e-3; the comparisons are for float32 arithmetic.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _pair(quant: str, device: str, tmp_path) -> tuple[nn.Module, nn.Module]:
    """FLoRA and PEFT LoRA on copies of one quantized base, with the same update."""
    base = nn.Sequential(quantized_base(quant, device=device))
    original = copy.deepcopy(base)
    ours = flora.inject(base, flora.FLoRAConfig(ranks=4, target_modules=["0"]))
    randomize(ours[0])
    flora.export_lora(ours, tmp_path / "lora")
    setattr(original, "is_loaded_in_8bit" if quant == "int8" else "is_loaded_in_4bit", True)
    theirs = peft.PeftModel.from_pretrained(original, tmp_path / "lora")
    assert type(theirs.base_model.model[0]).__module__ == "peft.tuners.lora.bnb"
    return ours, theirs


@quants
def test_inject_keeps_the_base_quantized_on_its_device(quant, device) -> None:
    base = quantized_base(quant, device=device)
    weight = base.weight
    model = flora.inject(nn.Sequential(base), flora.FLoRAConfig(ranks=4, target_modules=["0"]))
    layer = model[0]
    assert type(layer) is QuantizedLinear
    assert layer.base_layer.weight is weight
    assert {p.device.type for p in (layer.core, *layer.factors)} == {device}
    assert layer.core.dtype == torch.float32
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "0.adapters.default.core",
        *(f"0.adapters.default.factors.{n}" for n in range(2)),
    }


@quants
@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_peft_lora_bnb_on_the_same_base(quant, device, mode, tmp_path) -> None:
    ours, theirs = _pair(quant, device, tmp_path)
    x = torch.randn(5, IN, device=device)
    expected = run(theirs, mode, x)
    for forward in ("factorized", "dense"):
        ours[0].forward_mode = forward
        torch.testing.assert_close(run(ours, mode, x), expected, rtol=1e-5, atol=1e-5)


@quants
def test_merge_and_unmerge_round_to_the_grid_as_peft_merges(quant, device, tmp_path) -> None:
    ours, theirs = _pair(quant, device, tmp_path)
    layer = ours[0]
    x = torch.randn(5, IN, device=device)
    run(ours, "eval", x)  # the layout merge meets is the one after a forward
    original = dequantize_weight(layer.base_layer)
    reference = original + layer.delta_weight().detach()
    with pytest.warns(UserWarning, match=rf"quantized base layer \({quant}\).*rounded"):
        flora.merge(ours)
    merged = dequantize_weight(layer.base_layer)
    assert layer.merged
    assert ((merged - reference).abs() <= step(quant, reference)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peft_merged = theirs.merge_and_unload()
    # The same dequantize, add, quantize; ΔW differs by float32 rounding only, which
    # can move an entry that sits on a rounding boundary of the grid by one step.
    peft_weight = dequantize_weight(peft_merged[0])
    assert ((merged - peft_weight).abs() <= 2 * step(quant, reference)).all()
    assert (merged == peft_weight).float().mean() > 0.99
    run(ours, "eval", x)  # the merged layer runs
    with pytest.warns(UserWarning, match="does not give the original quantized weight back"):
        flora.unmerge(ours)
    restored = dequantize_weight(layer.base_layer)
    assert ((restored - original).abs() <= 2 * step(quant, reference)).all()


@quants
def test_training_leaves_the_base_and_unload_gives_it_back_bit_for_bit(quant, device) -> None:
    base = quantized_base(quant, device=device)
    model = nn.Sequential(base, nn.ReLU(), nn.Linear(OUT, 8, device=device))
    model = flora.inject(model, flora.FLoRAConfig(ranks=4, target_modules=["0"], init="gaussian"))
    x = torch.randn(6, IN, device=device)
    run(model, "eval", x)  # let bitsandbytes settle its storage (int8 scales, CPU repacking)
    before, weight = snapshot(base), base.weight
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    assert model[0].core.grad is not None
    assert base.weight.grad is None
    run(model, "train", x)
    run(model, "eval", x)
    plain = flora.unload(model, merge=False)
    assert plain[0] is base
    assert base.weight is weight
    assert same_bytes(base, before)


def test_an_int8_overflow_is_refused_on_the_device(device) -> None:
    # int8 weights are quantized from float16 (4-bit ones from their own dtype, float32 here).
    model = flora.inject(
        nn.Sequential(quantized_base("int8", device=device)),
        flora.FLoRAConfig(ranks=4, target_modules=["0"], init="gaussian"),
    )
    layer = model[0]
    before = snapshot(layer.base_layer)
    with torch.no_grad():
        layer.core.zero_()
        out_factor, in_factor = layer.factors
        layer.core[0, 0] = 1e5 / (out_factor[:, 0].abs().max() * in_factor[:, 0].abs().max())
    with pytest.raises(ValueError, match=r"layer '0': merging .* beyond float16's ±65504"):
        flora.merge(model)
    assert same_bytes(layer.base_layer, before)
