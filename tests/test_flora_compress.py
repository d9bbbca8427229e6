"""flora.compress: the reported error is the measured one; the default rule is analyze's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flora
from flora.spec import usable_ranks
from tuckerlib.cli import main as tuckerlib_main

_LAYERS = {
    "Linear": lambda: nn.Linear(7, 5),
    "Conv2d": lambda: nn.Conv2d(4, 6, (3, 2)),
    "Embedding": lambda: nn.Embedding(9, 6, padding_idx=2),
}


def _adapted(kind: str, init: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """(model with one trained float64 adapter, the pretrained weight W0)."""
    torch.manual_seed(seed)
    model = nn.Sequential(_LAYERS[kind]()).double()
    weight = model[0].weight.detach().clone()
    flora.inject(model, flora.FLoRAConfig(ranks=4, init=init, scale=0.7, target_modules=["0"]))
    with torch.no_grad():
        for p in (model[0].core, *model[0].factors):
            p.add_(torch.randn_like(p))
    return model, weight


def _change(model: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """What the layer's weight is now minus the pretrained one."""
    return model[0].effective_weight() - weight


@given(
    kind=st.sampled_from(sorted(_LAYERS)),
    init=st.sampled_from(["gaussian", "hosvd"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_the_reported_error_is_the_measured_error(kind, init, seed, data) -> None:
    model, weight = _adapted(kind, init, seed)
    before = _change(model, weight)
    shape = model[0].shape
    ranks = [data.draw(st.integers(1, min(size, 4))) for size in shape]
    errors = flora.compress(model, ranks=ranks)
    after = _change(model, weight)
    measured = float((before - after).norm() / before.norm())
    assert errors["0"] == pytest.approx(measured, rel=1e-6, abs=1e-12)
    assert all(r <= t for r, t in zip(model[0].ranks, ranks, strict=True))
    assert model[0].init == ("zero_core" if init == "hosvd" else init)
    if kind == "Embedding":
        assert not after[2].any()  # the padding row still gets no update


@pytest.mark.parametrize("kind", sorted(_LAYERS))
def test_exact_at_the_multilinear_rank(kind) -> None:
    model, weight = _adapted(kind, "gaussian", 0)
    with torch.no_grad():  # a trained core of multilinear rank 2 in every mode
        core = model[0].core
        core.zero_()
        core[(slice(0, 2),) * core.ndim] = torch.randn((2,) * core.ndim, dtype=core.dtype)
    before = _change(model, weight)
    errors = flora.compress(model, ranks=2)
    assert errors["0"] < 1e-12
    torch.testing.assert_close(_change(model, weight), before, rtol=1e-10, atol=1e-12)
    assert model[0].ranks == usable_ranks((2,) * len(model[0].shape), model[0].shape)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 24, padding_idx=0)
        self.fc = nn.Linear(24, 40)
        self.conv = nn.Conv2d(16, 24, 3)
        self.conv1d = nn.Conv1d(24, 16, 3)
        self.matrix = nn.Parameter(torch.randn(20, 30))

    def forward(self, idx: torch.Tensor, image: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.embed(idx)).sum() + self.conv(image).sum()
        return h + self.conv1d(seq).sum() + (self.matrix @ torch.ones(30)).sum()


def _inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(2)
    idx = torch.tensor([[0, 3, 0, 39]])
    return idx, torch.randn(1, 16, 5, 5, generator=generator), torch.randn(1, 24, 6)


def _three_adapters() -> nn.Module:
    """A trained gaussian adapter, an init="hosvd" one and one on a parameter."""
    torch.manual_seed(0)
    model = _Net()
    targets = ["embed", "fc", "conv"]
    flora.inject(model, flora.FLoRAConfig(ranks=16, init="gaussian", target_modules=targets))
    config = flora.FLoRAConfig(ranks=12, init="hosvd", target_modules=["conv1d"])
    flora.inject(model, config, adapter_name="h")
    config = flora.FLoRAConfig(ranks=12, init="gaussian", target_parameters=["matrix"])
    flora.inject(model, config, adapter_name="p")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                for p in (adapter.core, *adapter.factors):
                    p.add_(torch.randn(p.shape, generator=generator))
    return model


def _analyze(tmp_path: Path, model: nn.Module, adapter_name: str) -> dict[str, dict]:
    directory = flora.save_adapter(model, tmp_path / adapter_name, adapter_name=adapter_name)
    out = tmp_path / f"{adapter_name}.json"
    argv = ["analyze", "--adapter", str(directory), "--format", "json", "--energy", "0.9"]
    assert tuckerlib_main([*argv, "--out", str(out), "--quiet"]) == 0
    return {t["name"]: t for t in json.loads(out.read_text())["tensors"]}


def _specs(model: nn.Module, adapter_name: str) -> dict[str, flora.LayerSpec]:
    return {
        name: layer.adapters[adapter_name].spec
        for name, layer in flora.adapted_layers(model).items()
        if adapter_name in layer.adapters
    }


@pytest.mark.parametrize("adapter_name", ["default", "h", "p"])
@pytest.mark.parametrize("rule", ["budget", "energy"])
def test_compress_chooses_the_ranks_analyze_reports(tmp_path, rule, adapter_name) -> None:
    model = _three_adapters()
    reports = _analyze(tmp_path, model, adapter_name)
    before = _specs(model, adapter_name)
    options = {"energy": 0.9} if rule == "energy" else {}
    errors = flora.compress(model, adapter_name=adapter_name, **options)
    assert errors.keys() == reports.keys() == before.keys()
    for name, spec in _specs(model, adapter_name).items():
        report = reports[name]
        energy = report["energy_ranks"]["0.9"]
        reported = report["recommended_ranks"] if rule == "budget" else energy
        capped = [min(r, c) for r, c in zip(reported, before[name].ranks, strict=True)]
        assert spec.ranks == usable_ranks(capped, spec.shape), name
        if rule == "budget":
            assert capped == reported  # the budget binds: the error is analyze's
            assert errors[name] == pytest.approx(report["tucker_error"], abs=1e-6)


def test_compress_keeps_names_order_activity_and_outputs_where_exact() -> None:
    model = _three_adapters()
    flora.set_adapter(model, ["default", "h", "p"])
    names = flora.adapter_names(model)
    x = _inputs()
    layer = flora.adapted_layers(model)["conv1d"]
    with torch.no_grad():
        reference = model(*x)
        weight = layer.effective_weight()
        pretrained = weight - layer.delta_weight("h") + layer.initial_delta("h")
    for name in ("default", "p"):
        assert max(flora.compress(model, ranks=24, adapter_name=name).values()) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(model(*x), reference, rtol=1e-5, atol=1e-3)
    # The hosvd adapter's change to W0 has ranks up to 2 x 12; ranks never grow past 12.
    error = flora.compress(model, ranks=24, adapter_name="h")["conv1d"]
    with torch.no_grad():
        after = layer.effective_weight()
    measured = float((after - weight).norm() / (weight - pretrained).norm())
    assert error == pytest.approx(measured, rel=1e-3)
    assert _specs(model, "h")["conv1d"].init == "zero_core"
    assert _specs(model, "h")["conv1d"].ranks == (12, 12, 3)
    assert flora.adapter_names(model) == names
    assert flora.active_adapters(model) == ["default", "h", "p"]
    layers = flora.adapted_layers(model).values()
    adapters = [a for layer in layers for a in layer.adapters.values()]
    assert flora.trainable_parameters(model) == sum(a.spec.n_params for a in adapters)


def test_templates_and_rules() -> None:
    model = _three_adapters()
    errors = flora.compress(model, ranks={"Linear": (3, 2), "Conv2d": (None, 4, 2, 2)})
    specs = _specs(model, "default")
    assert specs["fc"].ranks == (2, 2)  # (3, 2) is not usable: R_0 <= R_1
    assert specs["conv"].ranks == (16, 4, 2, 2)
    assert specs["embed"].ranks == (8, 8)  # DEFAULT_RANKS for kinds not named
    assert all(0 < e < 1 for e in errors.values())
    assert flora.compress(model, ranks=64) == pytest.approx(dict.fromkeys(errors, 0.0), abs=1e-6)
    assert _specs(model, "default") == specs  # ranks never grow


def test_refusals_change_nothing() -> None:
    model = _three_adapters()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="give ranks or energy, not both"):
        flora.compress(model, ranks=2, energy=0.9)
    with pytest.raises(ValueError, match=r"energy must lie in \(0, 1\], got 1.5"):
        flora.compress(model, energy=1.5)
    with pytest.raises(TypeError, match="energy must be a real number"):
        flora.compress(model, energy="0.9")
    flora.set_adapter(model, ["default", "h"])
    with pytest.raises(ValueError, match=r"adapters \[.*\] are active; pass adapter_name"):
        flora.compress(model)
    # A template that fits every layer but the last: nothing is compressed.
    ranks = {"Embedding": 2, "Linear": (2, 2), "Conv2d": (2, 2)}
    with pytest.raises(ValueError, match=r"layer 'conv': ranks=\(2, 2\) has 2 entries"):
        flora.compress(model, ranks=ranks, adapter_name="default")
    _assert_state(model, state)
    flora.merge(model, adapter_names=["h"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"adapter 'h' is merged into layers \['conv1d'\]"):
        flora.compress(model, adapter_name="h")
    _assert_state(model, state)


def _assert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[key], value) for key, value in state.items())
