"""transformers' Conv1D kind: GPT-2's projections adapted, merged, saved and exchanged with PEFT."""

from __future__ import annotations

import copy
import logging

import peft
import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

import flora

TARGETS = ["c_attn", "c_proj", "c_fc"]


def _gpt2() -> transformers.GPT2LMHeadModel:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    return transformers.GPT2LMHeadModel(config).eval()


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                for p in (adapter.core, *adapter.factors):
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def _adapted(**options: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = _gpt2()
    model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(target_modules=TARGETS, **options))
    _randomize(model)
    return base, model


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def test_inject_wraps_every_gpt2_projection_as_conv1d() -> None:
    _, model = _adapted(ranks=4)
    layers = flora.adapted_layers(model)
    assert len(layers) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in two blocks
    assert {layer.kind for layer in layers.values()} == {"Conv1D"}
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn, flora.Conv1D)
    assert isinstance(c_attn.base_layer, Conv1D)
    assert c_attn.shape == (96, 32)  # the (out, in) map of the (32, 96) stored weight
    assert tuple(c_attn.weight.shape) == (32, 96)
    assert flora.DEFAULT_RANKS["Conv1D"] == (8, 8)


@pytest.mark.parametrize("mode", ["dense", "factorized", "auto"])
def test_forward_modes_equal_the_merged_dense_reference(mode: str) -> None:
    base, model = _adapted(ranks=4, forward=mode)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in flora.adapted_layers(model).items():
            stored = reference.get_submodule(name).weight
            stored += layer.delta_weight().T  # Conv1D computes x @ W: W gains ΔWᵀ
        expected = reference(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_unload_give_the_base_back() -> None:
    base, model = _adapted(ranks=4)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        adapted = model(IDS).logits
        flora.merge(model)
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
        merged = flora.merged_state_dict(model)["transformer.h.0.attn.c_attn.weight"]
        assert merged.shape == (32, 96)  # stored layout, as the base model saves it
        flora.unmerge(model)
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    plain = flora.unload(model, merge=False)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=1e-6, atol=1e-6)
    assert type(plain.transformer.h[0].attn.c_attn) is Conv1D


def test_named_adapters_and_save_load_round_trip(tmp_path) -> None:
    base, model = _adapted(ranks=3)
    second = flora.FLoRAConfig(target_modules=["c_attn"], ranks=2, init="gaussian")
    flora.inject(model, second, adapter_name="other")
    _randomize(model, seed=5)
    flora.set_adapter(model, ["default", "other"])
    with torch.no_grad():
        both = model(IDS).logits
    for name in ("default", "other"):
        flora.save_adapter(model, tmp_path / name, adapter_name=name)
    loaded = flora.load_adapter(copy.deepcopy(base), tmp_path / "default")
    flora.load_adapter(loaded, tmp_path / "other", adapter_name="other")
    flora.set_adapter(loaded, ["default", "other"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, both, rtol=1e-6, atol=1e-6)
    record = flora.read_adapter(tmp_path / "other").layers["transformer.h.1.attn.c_attn"]
    assert record.kind == "Conv1D"
    assert record.shape == (96, 32)


def _peft_equal(base: torch.nn.Module, model: torch.nn.Module, directory) -> None:
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload().state_dict()
        ours = flora.merged_state_dict(model)
        for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
            torch.testing.assert_close(merged[key], ours[key], rtol=1e-5, atol=1e-6)


def test_export_lora_equals_peft_and_imports_back(tmp_path, caplog) -> None:
    base, model = _adapted(ranks=4, bias=True)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            layer.adapters["default"].bias.normal_()
    flora.export_lora(model, tmp_path / "lora")
    config = peft.PeftConfig.from_pretrained(tmp_path / "lora")
    assert config.fan_in_fan_out is True
    assert config.lora_bias is True
    with caplog.at_level(logging.ERROR):
        _peft_equal(base, model, tmp_path / "lora")
    back = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    assert {layer.kind for layer in flora.adapted_layers(back).values()} == {"Conv1D"}
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_peft_lora_of_gpt2_imports_with_its_outputs(tmp_path) -> None:
    base = _gpt2()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "peft")
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(
            model(IDS).logits, peft_model.eval()(IDS).logits, rtol=1e-5, atol=1e-5
        )
    flora.export_lora(model, tmp_path / "again")
    _peft_equal(base, model, tmp_path / "again")
