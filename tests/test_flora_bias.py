"""Bias updates: an adapter's ``Δb`` runs, merges, combines, saves and goes away exactly."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="flora needs torch")

import torch.nn.functional as F  # noqa: E402, N812
from torch import nn  # noqa: E402

import flora  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _with_bias_update(base: nn.Module, name: str = "default", seed: int = 0) -> flora.FLoRALayer:
    layer_type = {
        nn.Linear: flora.Linear,
        nn.Conv1d: flora.Conv1d,
        nn.Conv2d: flora.Conv2d,
        nn.Conv3d: flora.Conv3d,
    }[type(base)]
    layer = layer_type(base, adapter_name=None)
    spec = flora.LayerSpec.from_template(layer.kind, layer.shape, 2, bias=True, init="gaussian")
    adapter = flora.TuckerDelta.create(spec, base.weight)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.core.copy_(torch.randn(adapter.core.shape, generator=generator))
        adapter.bias.copy_(torch.randn(adapter.bias.shape, generator=generator))
    layer.add_adapter(name, adapter)
    layer.set_adapter(name)
    return layer


def _reference(layer: flora.FLoRALayer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    base = layer.base_layer
    weight = base.weight + sum(layer.delta_weight(n) for n in names)
    bias = base.bias + sum(layer.adapters[n].bias for n in names)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return base._conv_forward(x, weight, bias)


LAYERS = [
    pytest.param(lambda: nn.Linear(6, 5), (3, 6), id="linear"),
    pytest.param(lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7), id="conv1d"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 7, 7), id="conv2d"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3), (3, 7, 7), id="conv2d-unbatched"),
    pytest.param(lambda: nn.Conv3d(2, 4, 2), (1, 2, 4, 4, 4), id="conv3d"),
]


@pytest.mark.parametrize(("make", "shape"), LAYERS)
@pytest.mark.parametrize("forward", ["dense", "factorized", "auto"])
def test_the_bias_update_is_added_to_the_output(make, shape, forward) -> None:
    torch.manual_seed(0)
    layer = _with_bias_update(make())
    layer.forward_mode = forward
    x = torch.randn(shape)
    expected = _reference(layer, x, ["default"])
    torch.testing.assert_close(layer(x), expected, rtol=50 * EPS32, atol=50 * EPS32)


@pytest.mark.parametrize(("make", "shape"), LAYERS[:3])
def test_several_active_adapters_add_their_bias_updates(make, shape) -> None:
    torch.manual_seed(0)
    layer = _with_bias_update(make())
    spec = flora.LayerSpec.from_template(layer.kind, layer.shape, 1, bias=True)
    adapter = flora.TuckerDelta.create(spec, layer.base_layer.weight)
    with torch.no_grad():
        adapter.bias.fill_(0.25)
    layer.add_adapter("other", adapter)
    layer.set_adapter(["default", "other"])
    x = torch.randn(shape)
    expected = _reference(layer, x, ["default", "other"])
    torch.testing.assert_close(layer(x), expected, rtol=50 * EPS32, atol=50 * EPS32)


def test_merge_unmerge_disable_and_remove_restore_the_bias() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    original = base.bias.detach().clone()
    layer = _with_bias_update(base)
    x = torch.randn(4, 6)
    running = layer(x)
    with torch.no_grad():
        layer.disabled = True
        assert torch.equal(layer(x), F.linear(x, base.weight, original))
        layer.disabled = False
    assert torch.equal(layer.effective_bias(), original + layer.adapters["default"].bias.detach())
    layer.merge()
    assert torch.equal(base.bias, original + layer.adapters["default"].bias.detach())
    torch.testing.assert_close(layer(x), running, rtol=50 * EPS32, atol=50 * EPS32)
    layer.unmerge()
    torch.testing.assert_close(base.bias, original, rtol=0, atol=4 * EPS32)
    layer.merge()
    layer.remove_adapter("default")
    torch.testing.assert_close(base.bias, original, rtol=0, atol=4 * EPS32)


TARGETS = ["0", "2", "3"]


def _model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv1d(5, 3, 1), nn.Linear(1, 2, bias=bias))


def _train_bias(model: nn.Module, name: str, value: float) -> None:
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            adapter = layer.adapters[name]
            adapter.core.normal_()
            if adapter.bias is not None:
                adapter.bias.fill_(value)


def test_config_bias_gives_layers_with_a_bias_a_trainable_update() -> None:
    model = flora.inject(
        _model(bias=False), flora.FLoRAConfig(ranks=1, bias=True, target_modules=TARGETS)
    )
    assert model[0].adapters["default"].bias.shape == (5,)
    assert model[2].adapters["default"].bias.shape == (3,)
    assert model[3].adapters["default"].bias is None  # no bias to update
    assert model[0].adapters["default"].spec.n_params == 1 + 5 + 6 + 5
    model[0](torch.randn(4, 6)).sum().backward()
    assert model[0].adapters["default"].bias.grad is not None
    summary_line = flora.summary(model).splitlines()[-1]
    assert summary_line.startswith(f"trainable params: {flora.trainable_parameters(model)} ")


def test_save_load_combine_and_merged_state_dict_carry_the_bias_update(tmp_path) -> None:
    model = _model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in (("a", 0.5), ("b", -2.0)):
        flora.inject(
            model,
            flora.FLoRAConfig(ranks=1, bias=True, init="gaussian", target_modules=TARGETS),
            adapter_name=name,
        )
        _train_bias(model, name, value)
    flora.add_weighted_adapter(model, ["a", "b"], [2.0, 1.0], "mix")
    assert torch.equal(model[0].adapters["mix"].bias, torch.full((5,), -1.0))
    directory = flora.save_adapter(model, tmp_path / "mix", adapter_name="mix")
    assert flora.read_adapter(directory).layers["0"].bias
    fresh = _model()
    fresh.load_state_dict(original)
    flora.load_adapter(fresh, directory)
    flora.set_adapter(model, "mix")
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh[0](x), model[0](x), rtol=0, atol=0)
    merged = flora.merged_state_dict(fresh)
    assert torch.equal(merged["0.bias"], original["0.bias"] - 1.0)
    assert torch.equal(flora.unload(fresh, merge=False)[0].bias, original["0.bias"])


def test_deleting_or_unloading_without_merge_gives_the_base_bias_back_bit_for_bit() -> None:
    model = _model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    flora.inject(
        model, flora.FLoRAConfig(ranks=1, bias=True, init="gaussian", target_modules=TARGETS)
    )
    _train_bias(model, "default", 0.1)
    with flora.disable_adapter(model):
        assert torch.equal(model[0].effective_bias(), original["0.bias"])
    flora.delete_adapter(model, "default")
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
