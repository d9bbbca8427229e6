"""Named adapters: set, disable, delete, combine and merge agree with weights computed by hand."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora
import tuckerlib
from flora.kinds import kind_of_module

F64 = {"dtype": torch.float64}


def _case(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cases: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
        "Linear": lambda: (nn.Linear(5, 4, **F64), torch.randn(3, 5, **F64)),
        "Conv1d": lambda: (nn.Conv1d(4, 6, 3, padding=1, **F64), torch.randn(2, 4, 7, **F64)),
        "Conv2d": lambda: (nn.Conv2d(3, 4, 3, stride=2, **F64), torch.randn(2, 3, 7, 7, **F64)),
        "Conv3d": lambda: (nn.Conv3d(2, 3, 2, **F64), torch.randn(1, 2, 4, 4, 4, **F64)),
        "GroupedConv2d": lambda: (
            nn.Conv2d(4, 6, 3, groups=2, padding=1, **F64),
            torch.randn(2, 4, 5, 5, **F64),
        ),
        "Embedding": lambda: (
            nn.Embedding(9, 5, padding_idx=1, **F64),
            torch.tensor([[0, 1, 8, 3]]),
        ),
        # transformers' Conv1D: weight stored (in, out) = (5, 4), ΔW in the (out, in) map.
        "Conv1D": lambda: (Conv1D(4, 5).double(), torch.randn(3, 5, **F64)),
    }
    return cases[kind]()


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as ΔW's map (Conv1D's stored weight transposed)."""
    return kind_of_module(base).read_weight(base)


def _reference(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, (nn.Linear, Conv1D)):
        return F.linear(x, weight, base.bias)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, weight)
    return base._conv_forward(x, weight, base.bias)


def _hand_delta(layer: flora.AdaptedWeight, name: str) -> torch.Tensor:
    adapter = layer.adapters[name]
    core, factors = adapter.core.detach(), [f.detach() for f in adapter.factors]
    delta = adapter.spec.scale * tuckerlib.tucker_to_tensor(core, factors)
    padding = getattr(layer.base_layer, "padding_idx", None)
    if padding is not None:
        delta[padding] = 0
    return delta


def _randomize(layer: flora.AdaptedWeight, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    adapter = layer.adapters[name]
    with torch.no_grad():
        for p in (adapter.core, *adapter.factors):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    eps = torch.finfo(expected.dtype).eps
    scale = max(float(expected.detach().abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1000 * eps, atol=1000 * eps * scale)


KINDS = ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupedConv2d", "Embedding", "Conv1D"]

lifecycles = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(KINDS),
        "ranks": st.lists(st.integers(1, 3), min_size=2, max_size=3),
        "active": st.lists(st.booleans(), min_size=3, max_size=3),
        "weights": st.lists(st.floats(-2, 2, allow_nan=False), min_size=3, max_size=3),
        "forward": st.sampled_from(["auto", "dense", "factorized"]),
        "seed": st.integers(0, 1000),
    }
)


@given(case=lifecycles)
def test_named_adapters_match_hand_merged_weights(case: dict) -> None:
    base, x = _case(case["kind"])
    w0 = _base_weight(base).detach().clone()
    base_out = base(x)
    model = nn.Sequential(base)
    names = [f"a{i}" for i in range(len(case["ranks"]))]
    for i, (name, rank) in enumerate(zip(names, case["ranks"], strict=True)):
        config = flora.FLoRAConfig(
            ranks=rank, scale=0.5 + i, forward=case["forward"], target_modules=["0"]
        )
        flora.inject(model, config, adapter_name=name)
        _randomize(model[0], name, case["seed"] + i)
    layer = model[0]
    deltas = {name: _hand_delta(layer, name) for name in names}
    active = [n for n, on in zip(names, case["active"], strict=False) if on] or names[:1]

    flora.set_adapter(model, active)
    expected = _reference(base, x, w0 + sum(deltas[n] for n in active))
    _close(model(x), expected)
    with flora.disable_adapter(model):
        assert torch.equal(model(x), base_out)
    flora.merge(model)
    _close(model(x), expected)
    with flora.disable_adapter(model):
        _close(model(x), base_out)
    _close(model(x), expected)
    flora.unmerge(model)

    weights = case["weights"][: len(names)]
    flora.add_weighted_adapter(model, names, weights, "mix")
    combined = sum(w * deltas[n] for n, w in zip(names, weights, strict=True))
    _close(layer.delta_weight("mix"), combined)
    flora.set_adapter(model, "mix")
    _close(model(x), _reference(base, x, w0 + combined))

    flora.set_adapter(model, names[0])
    flora.delete_adapter(model, "mix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # deleting the active adapter says so
        flora.delete_adapter(model, names[0])
    flora.set_adapter(model, names[1:])
    _close(model(x), _reference(base, x, w0 + sum(deltas[n] for n in names[1:])))
    for name in names[1:]:
        flora.delete_adapter(model, name)
    assert model[0] is base
    _close(_base_weight(base), w0)


def test_inactive_adapters_get_no_gradient_and_active_ones_do() -> None:
    base, x = _case("Conv2d")
    model = nn.Sequential(base)
    for name in ("a", "b"):
        flora.inject(
            model,
            flora.FLoRAConfig(ranks=2, init="gaussian", target_modules=["0"]),
            adapter_name=name,
        )
        _randomize(model[0], name, 0)
    layer = model[0]
    assert flora.active_adapters(model) == ["a"]
    assert not any(p.requires_grad for p in layer.adapters["b"].parameters())
    flora.set_adapter(model, "b")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.adapters.b.core",
        "0.adapters.b.factors.0",
        "0.adapters.b.factors.1",
        "0.adapters.b.factors.2",
        "0.adapters.b.factors.3",
    ]
    model(x).square().sum().backward()
    assert all(p.grad is None for p in layer.adapters["a"].parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in layer.adapters["b"].parameters()
    )
    flora.set_adapter(model, ["a", "b"])
    assert all(p.requires_grad for p in layer.adapters.parameters())


def test_hosvd_adapters_change_nothing_while_inactive() -> None:
    # Each "hosvd" adapter takes its start out of the base weight; an adapter
    # that does not run gives it back, so only running adapters change outputs.
    base, x = _case("Linear")
    w0 = base.weight.detach().clone()
    model = nn.Sequential(base)
    for name, rank in (("a", 2), ("b", 3)):
        flora.inject(
            model,
            flora.FLoRAConfig(ranks=rank, init="hosvd", target_modules=["0"]),
            adapter_name=name,
        )
    _close(model(x), F.linear(x, w0, base.bias))
    layer = model[0]
    with torch.no_grad():
        for name in ("a", "b"):
            layer.adapters[name].core.mul_(1.5)
    change = {n: layer.delta_weight(n) - layer.initial_delta(n) for n in ("a", "b")}
    _close(model(x), F.linear(x, w0 + change["a"], base.bias))
    flora.set_adapter(model, "b")
    _close(model(x), F.linear(x, w0 + change["b"], base.bias))
    with flora.disable_adapter(model):
        _close(model(x), F.linear(x, w0, base.bias))
    flora.add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix")
    flora.set_adapter(model, "mix")
    _close(model(x), F.linear(x, w0 + 0.5 * change["a"] + 2.0 * change["b"], base.bias))
    flora.unload(model, merge=False)
    _close(model[0].weight, w0)


def test_weighted_adapter_recompresses_exactly_past_the_mode_size() -> None:
    base = nn.Linear(5, 3, **F64)
    model = nn.Sequential(base)
    for i, name in enumerate(("a", "b")):
        flora.inject(
            model,
            flora.FLoRAConfig(ranks=3, init="gaussian", target_modules=["0"]),
            adapter_name=name,
        )
        _randomize(model[0], name, i)
    layer = model[0]
    flora.add_weighted_adapter(model, ["a", "b"], [1.0, -0.5], "mix")
    # ranks 3 + 3 exceed the output mode (3): compressed to what fits, exactly
    assert layer.adapters["mix"].spec.ranks == (3, 3)
    _close(layer.delta_weight("mix"), layer.delta_weight("a") - 0.5 * layer.delta_weight("b"))


def test_weighted_adapter_over_layers_holding_different_adapters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, **F64), nn.Linear(4, 4, **F64))
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]), adapter_name="a")
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["1"]), adapter_name="b")
    flora.add_weighted_adapter(model, ["a", "b"], [2.0, 3.0], "mix")
    assert model[0].adapter_names == ("a", "mix")
    assert model[1].adapter_names == ("b", "mix")
    _close(model[1].delta_weight("mix"), 3.0 * model[1].delta_weight("b"))


def test_saved_modules_switch_disable_and_train() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    head = model[2]
    x = torch.randn(5, 6)
    base_out = model(x)
    for name in ("a", "b"):
        config = flora.FLoRAConfig(ranks=2, target_modules=["0"], modules_to_save=["2"])
        flora.inject(model, config, adapter_name=name)
    wrapper = model[2]
    assert isinstance(wrapper, flora.ModulesToSave)
    assert wrapper.original_module is head
    assert not any(p.requires_grad for p in head.parameters())
    assert wrapper.weight is wrapper.copies["a"].weight
    with torch.no_grad():
        wrapper.copies["b"].bias.add_(1.0)
    out_a = model(x)
    flora.set_adapter(model, "b")
    assert torch.allclose(model(x), out_a + 1.0)
    assert wrapper.copies["b"].weight.requires_grad
    assert not wrapper.copies["a"].weight.requires_grad
    with flora.disable_adapter(model):
        assert torch.equal(model(x), base_out)
    model(x).sum().backward()
    assert wrapper.copies["b"].weight.grad is not None
    assert head.weight.grad is None
    with pytest.raises(ValueError, match="at most one of them"):
        flora.set_adapter(model, ["a", "b"])
    flora.delete_adapter(model, "a")
    flora.delete_adapter(model, "b")
    assert model[2] is head


def test_disable_adapter_restores_state_after_an_error() -> None:
    base, _x = _case("Linear")
    model = flora.inject(nn.Sequential(base), flora.FLoRAConfig(ranks=2, target_modules=["0"]))
    _randomize(model[0], "default", 0)
    flora.merge(model)
    merged_weight = base.weight.detach().clone()

    def fail_inside() -> None:
        with flora.disable_adapter(model):
            with pytest.raises(RuntimeError, match="disabled"):
                flora.merge(model)
            with pytest.raises(RuntimeError, match="disabled"):
                flora.inject(model, flora.FLoRAConfig(), adapter_name="other")
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail_inside()
    assert model[0].merged
    assert not model[0].disabled
    _close(base.weight, merged_weight)


def test_set_delete_and_merge_refuse_bad_names_without_changes() -> None:
    base, _ = _case("Linear")
    model = flora.inject(
        nn.Sequential(base), flora.FLoRAConfig(ranks=2, target_modules=["0"]), adapter_name="a"
    )
    for call in (
        lambda: flora.set_adapter(model, "missing"),
        lambda: flora.set_adapter(model, []),
        lambda: flora.delete_adapter(model, "missing"),
        lambda: flora.merge(model, adapter_names=["missing"]),
        lambda: flora.add_weighted_adapter(model, ["a"], [1.0, 2.0], "mix"),
        lambda: flora.add_weighted_adapter(model, ["a"], [float("nan")], "mix"),
        lambda: flora.add_weighted_adapter(model, ["a"], [1.0], "a"),
        lambda: flora.inject(model, flora.FLoRAConfig(), adapter_name="bad.name"),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own argument
            call()
    assert flora.adapter_names(model) == ["a"]
    assert flora.active_adapters(model) == ["a"]
    flora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        flora.set_adapter(model, "a")


def test_summary_table_and_peft_line() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(10, 4)
    model = nn.Sequential(embed, nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    model[2].weight = embed.weight  # tied: counted once, as PEFT counts it
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["1"]), adapter_name="a")
    flora.inject(model, flora.FLoRAConfig(ranks=1, target_modules=["1"]), adapter_name="b")
    lines = flora.summary(model).splitlines()
    assert lines[0].split() == ["layer", "kind", "shape", "a*", "b", "params"]
    assert lines[1].split() == ["1", "Linear", "(4,", "4)", "(2,", "2)", "(1,", "1)", "29"]
    trainable = 2 * 2 + 4 * 2 * 2
    total = 40 + 20 + 20 + 9
    assert lines[-1] == (
        f"trainable params: {trainable} || all params: {total} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    assert flora.trainable_parameters(model) == trainable
    frozen = nn.Linear(1000, 1000).requires_grad_(False)
    assert (
        flora.summary(frozen)
        == "trainable params: 0 || all params: 1,001,000 || trainable%: 0.0000"
    )


def test_layer_level_adapters() -> None:
    base, x = _case("Linear")
    layer = flora.Linear(base, ranks=2)
    spec = flora.LayerSpec.from_template("Linear", layer.shape, 3, init="gaussian")
    layer.add_adapter("b", flora.TuckerDelta.create(spec, layer.base_weight()))
    _randomize(layer, "b", 0)
    assert layer.adapter_names == ("default", "b")
    assert torch.equal(layer(x), base(x))  # "b" is inactive, "default" starts at zero
    layer.set_adapter("b")
    _close(layer(x), F.linear(x, base.weight + _hand_delta(layer, "b"), base.bias))
    with pytest.raises(ValueError, match="no adapter"):
        layer.adapter("c")
    layer.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="2 adapters"):
        _ = layer.core
