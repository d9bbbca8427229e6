"""Model-level FLoRA: inject, targets, freezing, training, merge, unload, init modes."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import flora
import tuckerlib


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.reshape(2, -1, 6), self.weight).reshape(x.shape)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.depthwise = nn.Conv1d(6, 6, 3, padding=1, groups=6)
        self.norm = nn.LayerNorm(6)
        self.experts = _Experts()
        self.head = nn.Linear(6, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx).transpose(1, 2)
        h = self.depthwise(torch.relu(self.conv(h))).transpose(1, 2)
        return self.head(self.experts(self.norm(h)))


def _net() -> tuple[_Net, torch.Tensor]:
    torch.manual_seed(0)
    return _Net(), torch.randint(0, 10, (2, 5))


ALL = flora.FLoRAConfig(ranks=3, target_parameters=["norm.weight", "experts.weight"])
ALL.target_modules = ["embed", "conv", "depthwise", "head"]


def _randomize(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for p in (layer.core, *layer.factors):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def test_inject_every_kind_and_count_parameters() -> None:
    model, idx = _net()
    expected = model(idx)
    flora.inject(model, ALL)
    layers = flora.adapted_layers(model)
    assert set(layers) == {"embed", "conv", "depthwise", "head", "norm.weight", "experts.weight"}
    assert layers["depthwise"].ranks == (3, 1, 3)
    assert torch.equal(model(idx), expected)
    total = sum(tuckerlib.tucker_params(layer.shape, layer.ranks) for layer in layers.values())
    assert flora.trainable_parameters(model) == total
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".core" in n or ".factors." in n for n in trainable)


def test_target_matching_rules() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    config = flora.FLoRAConfig(target_modules=["1.0", "1"], exclude_modules=["1"])
    with pytest.raises(TypeError, match="Sequential"):
        flora.inject(copy.deepcopy(model), flora.FLoRAConfig(target_modules=["1"]))
    suffix = flora.inject(copy.deepcopy(model), flora.FLoRAConfig(target_modules=["0"]))
    assert set(flora.adapted_layers(suffix)) == {"0", "1.0"}
    regex = flora.inject(copy.deepcopy(model), flora.FLoRAConfig(target_modules=r"1\.\d"))
    assert set(flora.adapted_layers(regex)) == {"1.0", "1.1"}
    excluded = flora.inject(copy.deepcopy(model), config)
    assert set(flora.adapted_layers(excluded)) == {"1.0"}
    pattern = flora.FLoRAConfig(
        ranks=3, rank_pattern={r"1\.\d": (2, 2), "1.1": 1}, target_modules="all-linear"
    )
    ranked = flora.inject(copy.deepcopy(model), pattern)
    # The exact name beats the regex; ranks are usable ones (equal for a matrix).
    assert {n: layer.ranks for n, layer in flora.adapted_layers(ranked).items()} == {
        "0": (3, 3),
        "1.0": (2, 2),
        "1.1": (1, 1),
    }


def test_inject_errors_leave_model_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="matches no name"):
        flora.inject(model, flora.FLoRAConfig(target_modules=["missing"]))
    with pytest.raises(TypeError, match="ReLU"):
        flora.inject(model, flora.FLoRAConfig(target_modules=["1"]))
    with pytest.raises(ValueError, match="matches no module"):
        flora.inject(nn.Sequential(nn.ReLU()), flora.FLoRAConfig(target_modules="all-linear"))
    assert type(model[0]) is nn.Linear
    assert model[0].weight.requires_grad
    flora.inject(model, flora.FLoRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        flora.inject(model, flora.FLoRAConfig(target_modules=["0"]))
    assert type(model[0].base_layer) is nn.Linear


def test_training_on_digits_lowers_loss_and_keeps_base() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data[:256], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flora.inject(model, flora.FLoRAConfig(ranks=4, target_modules="all-linear"))
    optimizer = torch.optim.Adam(
        flora_params := [p for p in model.parameters() if p.requires_grad], lr=0.05
    )
    assert len(flora_params) == 6
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for name in ("0", "2"):
        for key in ("weight", "bias"):
            assert torch.equal(getattr(model[int(name)].base_layer, key), before[f"{name}.{key}"])


def test_merge_unmerge_model_and_unload() -> None:
    model, idx = _net()
    originals = dict(model.named_children())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flora.inject(model, ALL)
    _randomize(model)
    adapted = model(idx)
    # deepcopy shares torch's generated parametrized classes between copies,
    # so the twin is built afresh and given the same state.
    twin, _ = _net()
    flora.inject(twin, ALL)
    twin.load_state_dict(model.state_dict())
    flora.merge(twin)
    torch.testing.assert_close(twin(idx), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        flora.merge(twin)
    flora.unmerge(twin)
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        flora.unmerge(twin)
    torch.testing.assert_close(twin(idx), adapted, rtol=1e-5, atol=1e-5)
    flora.unload(twin, merge=True)
    assert not flora.adapted_layers(twin)
    assert type(twin.conv) is nn.Conv1d
    torch.testing.assert_close(twin(idx), adapted, rtol=1e-5, atol=1e-5)

    flora.unload(model, merge=False)
    assert dict(model.named_children()) == originals
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hosvd_start_equals_base_and_unloads_back(dtype: torch.dtype) -> None:
    model, idx = _net()
    model.to(dtype)
    expected = model(idx)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = flora.FLoRAConfig(
        ranks=3,
        scale=2.0,
        init="hosvd",
        target_modules=ALL.target_modules,
        target_parameters=ALL.target_parameters,
    )
    flora.inject(model, config)
    conv = model.conv
    assert conv.core.abs().max() > 0
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(model(idx), expected, rtol=1000 * eps, atol=1000 * eps)
    w0 = weights["conv.weight"]
    approx = tuckerlib.hosvd(w0, conv.ranks).to_tensor()
    torch.testing.assert_close(conv.delta_weight(), approx, rtol=100 * eps, atol=100 * eps)
    torch.testing.assert_close(conv.base_layer.weight, w0 - approx, rtol=100 * eps, atol=100 * eps)
    flora.merge(model)
    torch.testing.assert_close(conv.base_layer.weight, w0, rtol=100 * eps, atol=100 * eps)
    flora.unmerge(model)
    flora.unload(model, merge=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=100 * eps, atol=100 * eps)


def test_gaussian_init_starts_at_base() -> None:
    model, idx = _net()
    expected = model(idx)
    flora.inject(model, flora.FLoRAConfig(init="gaussian", target_modules=["head"]))
    assert torch.equal(model(idx), expected)
    assert model.head.ranks == (3, 3)
    torch.testing.assert_close(model.head.factors[1].std(), torch.tensor(1 / 3), rtol=0.5, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ranks": {"Dense": 4}},
        {"dropout": 1.5},
        {"scale": float("nan")},
        {"init": "pissa"},
        {"forward": "fast"},
        {"target_modules": "("},
        {"rank_pattern": {"fc": 0}},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case names its own field
        flora.FLoRAConfig(**kwargs)


def test_config_round_trip_and_defaults() -> None:
    config = flora.FLoRAConfig(ranks={"Conv2d": (8, 8, 1, 1)}, rank_pattern={"a": 2})
    assert flora.FLoRAConfig.from_dict(config.to_dict()) == config
    assert config.ranks_for("Linear") == flora.DEFAULT_RANKS["Linear"]
    assert config.ranks_for("Conv2d", "a") == 2
    with pytest.raises(ValueError, match="unknown fields"):
        flora.FLoRAConfig.from_dict({"rank": 4})


def test_merged_state_dict_loads_into_the_plain_model() -> None:
    model, idx = _net()
    plain, _ = _net()
    config = flora.FLoRAConfig(
        ranks=3,
        target_modules=["embed", "conv", "depthwise"],
        target_parameters=ALL.target_parameters,
        modules_to_save=["head"],
    )
    flora.inject(model, config)
    _randomize(model)
    with torch.no_grad():
        model.head.copies["default"].bias.add_(1.0)
    state = flora.merged_state_dict(model)
    assert sorted(state) == sorted(plain.state_dict())
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(idx), model(idx), rtol=1e-5, atol=1e-5)
    with flora.disable_adapter(model):
        plain.load_state_dict(flora.merged_state_dict(model))
        torch.testing.assert_close(plain(idx), model(idx), rtol=1e-5, atol=1e-5)
