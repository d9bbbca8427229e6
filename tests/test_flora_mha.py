"""nn.MultiheadAttention kind: projections adapted in place, merged, saved, exchanged with PEFT."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import flora
from tuckerlib.io import AdapterError, open_adapter


class Block(nn.Module):
    """Self-attention then a Linear head (MultiheadAttention needs three inputs)."""

    def __init__(self, dim: int = 8, heads: int = 2, **options: object):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, **options)
        self.head = nn.Linear(dim, 3)
        self.kdim, self.vdim = self.attn.kdim, self.attn.vdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = (
            x[..., : self.kdim]
            if self.kdim <= x.shape[-1]
            else F.pad(x, (0, self.kdim - x.shape[-1]))
        )
        v = (
            x[..., : self.vdim]
            if self.vdim <= x.shape[-1]
            else F.pad(x, (0, self.vdim - x.shape[-1]))
        )
        return self.head(self.attn(x, k, v, need_weights=False)[0])


SEPARATE = {"kdim": 6, "vdim": 5}
X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def _randomize(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                for p in (adapter.core, *adapter.factors):
                    p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def _adapted(options: dict, **config: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Block(**options).eval()
    model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(target_modules=["attn"], **config))
    _randomize(model)
    return base, model


def _reference(base: nn.Module, model: nn.Module) -> nn.Module:
    """``base`` with every adapted weight replaced by ``W + ΔW``."""
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in flora.adapted_layers(model).items():
            reference.get_parameter(name).add_(layer.delta_weight())
    return reference


@pytest.mark.parametrize("options", [{}, SEPARATE], ids=["packed", "separate"])
def test_inject_adapts_the_projection_weights(options: dict) -> None:
    base, model = _adapted(options, ranks=3)
    layers = flora.adapted_layers(model)
    expected = (
        ["attn.in_proj_weight", "attn.out_proj.weight"]
        if not options
        else [
            "attn.q_proj_weight",
            "attn.k_proj_weight",
            "attn.v_proj_weight",
            "attn.out_proj.weight",
        ]
    )
    assert list(layers) == expected
    assert {layer.kind for layer in layers.values()} == {"MultiheadAttention"}
    assert all(isinstance(layer, flora.MultiheadAttentionWeight) for layer in layers.values())
    assert isinstance(model.attn, nn.MultiheadAttention)
    assert flora.trainable_parameters(model) == sum(
        layer.n_adapter_params for layer in layers.values()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(X), _reference(base, model)(X))
        assert not torch.allclose(model(X), base(X))


@pytest.mark.parametrize("options", [{}, SEPARATE], ids=["packed", "separate"])
def test_training_reaches_every_projection(options: dict) -> None:
    _, model = _adapted(options, ranks=2)
    model.train()
    model(X).square().sum().backward()
    for name, layer in flora.adapted_layers(model).items():
        assert layer.core.grad is not None, name
        assert layer.core.grad.abs().sum() > 0, name


@pytest.mark.parametrize("options", [{}, SEPARATE], ids=["packed", "separate"])
def test_merge_unmerge_unload(options: dict) -> None:
    base, model = _adapted(options, ranks=3)
    with torch.no_grad():
        adapted = model(X)
        flora.merge(model)
        torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
        state = flora.merged_state_dict(model)
        torch.testing.assert_close(
            state["attn.out_proj.weight"], _reference(base, model).attn.out_proj.weight
        )
        flora.unmerge(model)
        torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    merged = flora.unload(model)
    assert type(merged.attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(merged(X), adapted, rtol=1e-5, atol=1e-6)
    # (A deep copy of a parametrized module shares its class with the original,
    # so each model is unloaded once here; see torch.nn.utils.parametrize.)
    _, other = _adapted(options, ranks=3)
    plain = flora.unload(other, merge=False)
    assert type(plain.attn) is nn.MultiheadAttention
    for key, value in base.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


@pytest.mark.parametrize("options", [{}, SEPARATE], ids=["packed", "separate"])
def test_named_adapters_save_and_load(options: dict, tmp_path) -> None:
    base, model = _adapted(options, ranks=3)
    flora.inject(model, flora.FLoRAConfig(target_modules=["attn"], ranks=2), adapter_name="b")
    _randomize(model, seed=7)
    flora.set_adapter(model, ["default", "b"])
    with torch.no_grad():
        both = model(X)
    for name in ("default", "b"):
        flora.save_adapter(model, tmp_path / name, adapter_name=name)
    loaded = flora.load_adapter(copy.deepcopy(base), tmp_path / "default")
    flora.load_adapter(loaded, tmp_path / "b", adapter_name="b")
    flora.set_adapter(loaded, ["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), both)
    record = flora.read_adapter(tmp_path / "b").layers["attn.out_proj.weight"]
    assert record.kind == "MultiheadAttention"


def test_a_record_of_another_weight_is_refused_by_name(tmp_path) -> None:
    base, model = _adapted({}, ranks=2)
    delta = flora.adapted_layers(model)["attn.out_proj.weight"].adapters["default"]
    with pytest.raises(
        ValueError, match=r"layer 'head\.weight' is no weight that kind MultiheadAttention"
    ):
        flora.attach_adapter(copy.deepcopy(base), "x", {"head.weight": copy.deepcopy(delta)})


def test_out_proj_alone_is_refused_as_peft_ignores_it() -> None:
    with pytest.raises(
        TypeError, match=r"module 'attn\.out_proj' is a NonDynamicallyQuantizableLinear"
    ):
        flora.inject(Block(), flora.FLoRAConfig(target_modules=["out_proj"]))


def _peft_model(base: nn.Module, directory) -> nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


def test_export_lora_equals_peft_and_imports_back(tmp_path) -> None:
    base, model = _adapted({}, ranks=(3, 2))
    flora.export_lora(model, tmp_path / "lora")
    config = peft.PeftConfig.from_pretrained(tmp_path / "lora")
    assert config.target_modules == {"attn"}
    peft_model = _peft_model(base, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(X), model(X), rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload().state_dict()
    ours = flora.merged_state_dict(model)
    for key in ("attn.in_proj_weight", "attn.out_proj.weight"):
        torch.testing.assert_close(merged[key], ours[key], rtol=1e-5, atol=1e-6)
    back = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    assert set(flora.adapted_layers(back)) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    with torch.no_grad():
        torch.testing.assert_close(back(X), model(X), rtol=1e-5, atol=1e-5)


def test_export_fills_the_half_peft_always_has(tmp_path) -> None:
    base, model = _adapted({}, ranks=2)
    only_in = copy.deepcopy(base)
    delta = flora.adapted_layers(model)["attn.in_proj_weight"].adapters["default"]
    flora.attach_adapter(only_in, "default", {"attn.in_proj_weight": copy.deepcopy(delta)})
    flora.export_lora(only_in, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(
            _peft_model(base, tmp_path / "lora")(X), only_in(X), rtol=1e-5, atol=1e-5
        )


def test_peft_lora_of_an_attention_imports_with_its_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    base = Block().eval()
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["attn"], init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "peft")
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(X), peft_model.eval()(X), rtol=1e-5, atol=1e-5)


def test_out_proj_pairs_read_as_the_saving_peft_release_applies_them(tmp_path) -> None:
    # PEFT <= 0.21.2 adds the out_proj pair twice (huggingface/peft#3774); a
    # later release (per the adapter's peft_version) is read as written.
    torch.manual_seed(0)
    base = Block().eval()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    weights = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    prefix = "base_model.model.attn.base_layer.out_proj."
    once = 2 * weights[prefix + "lora_B.weight"] @ weights[prefix + "lora_A.weight"]
    for version, factor in (("0.21.2", 2), ("0.22.0", 1)):
        path.write_text(json.dumps({**json.loads(path.read_text()), "peft_version": version}))
        model = flora.import_lora(copy.deepcopy(base), tmp_path / "peft")
        delta = flora.adapted_layers(model)["attn.out_proj.weight"].delta_weight()
        torch.testing.assert_close(delta, factor * once, rtol=1e-5, atol=1e-6)


def test_separate_qkv_weights_have_no_lora_form(tmp_path) -> None:
    _, model = _adapted(SEPARATE, ranks=2)
    with pytest.raises(
        flora.LoraConversionError, match=r"attn\.q_proj_weight.*packed in_proj_weight"
    ):
        flora.export_lora(model, tmp_path / "lora")


@settings(max_examples=15, deadline=None)
@given(
    heads=st.sampled_from([1, 2]),
    separate=st.booleans(),
    ranks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_the_updated_attention(heads: int, separate: bool, ranks, seed: int) -> None:
    torch.manual_seed(seed)
    options = SEPARATE if separate else {}
    base = Block(8, heads, **options).eval()
    model = flora.inject(
        copy.deepcopy(base), flora.FLoRAConfig(target_modules=["attn"], ranks=ranks)
    )
    _randomize(model, seed)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(base, model)(x), rtol=1e-4, atol=1e-5)
        flora.merge(model)
        torch.testing.assert_close(model(x), _reference(base, model)(x), rtol=1e-4, atol=1e-5)


class Mixed(nn.Module):
    """An attention beside a Linear: a config asking what the attention cannot do is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.fc(x))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dropout": 0.1}, r"dropout must be 0 for a MultiheadAttention layer, got 0\.1"),
        ({"bias": True}, r"bias=True asks for bias updates, which a MultiheadAttention adapter"),
    ],
    ids=["dropout", "bias"],
)
def test_what_peft_has_not_for_attention_is_refused_by_name(options, message) -> None:
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    config = flora.FLoRAConfig(target_modules=["attn", "fc"], **options)
    with pytest.raises(ValueError, match=rf"layer 'block\.attn\.in_proj_weight': {message}"):
        flora.inject(model, config)
    assert type(model.fc) is nn.Linear  # nothing changed
    assert not torch.nn.utils.parametrize.is_parametrized(model.block.attn)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Without the attention the same options hold for the Linear.
    flora.inject(model, flora.FLoRAConfig(target_modules=["fc"], **options))
    assert isinstance(model.fc, flora.Linear)


def test_a_saved_attention_record_with_dropout_is_refused_by_both_readers(tmp_path) -> None:
    _, model = _adapted({}, ranks=2)
    flora.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["layers"]["attn.in_proj_weight"]["dropout"] = 0.1
    path.write_text(json.dumps(config))
    message = r"attn\.in_proj_weight.*dropout must be 0 for a MultiheadAttention layer"
    with pytest.raises(ValueError, match=message):
        flora.read_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match=message):
        flora.load_adapter(Block(), tmp_path / "a")
    with pytest.raises(AdapterError, match=message), open_adapter(tmp_path / "a"):
        pass


def test_peft_lora_dropout_on_an_attention_imports_as_none_as_peft_runs_it(tmp_path) -> None:
    torch.manual_seed(0)
    base = Block().eval()
    config = peft.LoraConfig(
        r=2, target_modules=["attn"], lora_dropout=0.3, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path / "peft")
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "peft")
    assert {layer.spec.dropout for layer in flora.adapted_layers(model).values()} == {0.0}
    model.train()
    peft_model.train()  # PEFT merges the pair into the weights: its dropout never runs
    with torch.no_grad():
        torch.testing.assert_close(model(X), peft_model(X), rtol=1e-5, atol=1e-5)
