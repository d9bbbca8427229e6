"""Grouped and depthwise convolution adapters: the fast weight gradients.

Outputs and gradients of an adapted grouped convolution equal plain autograd
through ``F.convNd(x, W + ΔW)`` in float64, whichever way the weight
gradient runs (PyTorch's own, channels-last copies, or the swapped forward
convolution for depthwise kernels), over groups, kernel sizes, strides,
dilations, padding (numbers, ``"same"``, ``"valid"``) and padding modes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import flora
from flora._cost import grouped_weight_grad
from flora.layers import _grouped
from flora.layers._grouped import grouped_conv

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TOL = 1e3 * torch.finfo(torch.float64).eps


@st.composite
def grouped_layers(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A grouped convolution (float64) and an input for it."""
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([2, 3]))
    per_group = draw(st.sampled_from([1, 2]))
    multiplier = draw(st.sampled_from([1, 2]))
    kernel = draw(st.integers(1, 4 if dims == 3 else 5))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding: int | str = draw(st.sampled_from([0, 1, 2, "same", "valid"]))
    if padding == "same":
        stride = 1
    if mode != "zeros" and padding == 0:
        padding = 1
    span = dilation * (kernel - 1) + 1
    size = draw(st.integers(max(span, 3), span + 4))
    batch = draw(st.sampled_from([None, 1, 2]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = _CONVS[dims](
        groups * per_group,
        groups * multiplier,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        dtype=torch.float64,
    )
    shape = (groups * per_group, *(size,) * dims)
    x = torch.randn(shape if batch is None else (batch, *shape), dtype=torch.float64)
    return conv, x


def _adapt(conv: nn.Module, **options: object) -> flora.FLoRALayer:
    layer = getattr(flora, type(conv).__name__)(conv, ranks=2, init="gaussian", **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.core.copy_(torch.randn(layer.core.shape, generator=generator, dtype=torch.float64))
    return layer


def _step(layer: flora.FLoRALayer, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, then the gradients of the input, the core and every factor."""
    x = x.detach().requires_grad_()
    out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [layer.core, *layer.factors]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return [out.detach(), *grads]


def _reference(layer: flora.FLoRALayer, x: torch.Tensor) -> list[torch.Tensor]:
    """Plain autograd through the base's own ``_conv_forward`` on ``W + ΔW``."""
    x = x.detach().requires_grad_()
    base = layer.base_layer
    out = base._conv_forward(x, base.weight + layer.delta_weight(), base.bias)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [layer.core, *layer.factors]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return [out.detach(), *grads]


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        scale = max(e.abs().max().item(), 1.0)
        assert a.shape == e.shape
        assert (a - e).abs().max().item() <= _TOL * scale


METHODS = ["native", "channels_last", "swapped"]


@pytest.mark.parametrize("method", METHODS)
@given(case=grouped_layers())
def test_grouped_adapter_matches_autograd(
    method: str, case: tuple[nn.Module, torch.Tensor]
) -> None:
    conv, x = case
    assume(method != "swapped" or conv.in_channels == conv.groups)
    layer = _adapt(conv)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_grouped, "grouped_weight_grad", lambda *args: method)
        _assert_close(_step(layer, x), _reference(layer, x))


@given(case=grouped_layers())
def test_forward_modes_agree_on_grouped_layers(case: tuple[nn.Module, torch.Tensor]) -> None:
    conv, x = case
    layer = _adapt(conv)
    results = []
    for mode in ("auto", "dense", "factorized"):
        layer.forward_mode = mode
        results.append(_step(layer, x))
    _assert_close(results[1], results[0])
    _assert_close(results[2], results[0])


@pytest.mark.parametrize("method", METHODS)
def test_bias_gradient_when_the_base_bias_trains(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    weight = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(_grouped, "grouped_weight_grad", lambda *args: method)
    out = grouped_conv(x, weight, bias, (1, 1), (2, 2), (1, 1), 6)
    expected = F.conv2d(x, weight, bias, 1, 2, 1, 6)
    got = torch.autograd.grad(out.square().sum(), [weight, bias])
    want = torch.autograd.grad(expected.square().sum(), [weight, bias])
    _assert_close([out, *got], [expected, *want])


@pytest.mark.parametrize("method", METHODS)
def test_second_derivatives_match(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(_grouped, "grouped_weight_grad", lambda *args: method)

    def penalty(conv: object) -> list[torch.Tensor]:
        out = conv(x, weight, None, (1, 1), (1, 1), (1, 1), 4)
        grads = torch.autograd.grad(out.square().sum(), [x, weight], create_graph=True)
        return list(torch.autograd.grad(sum(g.square().sum() for g in grads), [x, weight]))

    _assert_close(penalty(grouped_conv), penalty(F.conv2d))


@pytest.mark.parametrize(
    ("weight_shape", "groups", "dilation", "expected"),
    [
        ((96, 1, 7, 7), 96, (1, 1), "swapped"),  # depthwise 7×7: im2col in NCHW
        ((96, 1, 5, 5), 96, (1, 1), "swapped"),
        ((192, 1, 7, 7), 96, (1, 1), "swapped"),  # channel multiplier 2
        ((96, 1, 3, 3), 96, (1, 1), "swapped"),  # faster than oneDNN's direct kernel too
        ((96, 1, 3, 3), 96, (2, 2), "swapped"),  # dilated: im2col in NCHW
        ((256, 1, 1, 7), 256, (1, 1), "swapped"),  # a Conv1d k7, run as 1×7
        ((256, 1, 1, 3), 256, (1, 1), "swapped"),
        ((96, 1, 1, 1), 96, (1, 1), "native"),  # a 1×1 kernel has nothing to gain
        ((128, 4, 3, 3), 32, (1, 1), "channels_last"),  # 4 channels a group
        ((128, 4, 3, 3), 32, (2, 2), "native"),  # dilated: im2col in both layouts
        ((64, 16, 3, 3), 4, (1, 1), "native"),  # 16 channels a group: direct in NCHW
        ((32, 1, 3, 3, 3), 32, (1, 1, 1), "swapped"),
        ((32, 1, 5, 5, 5), 32, (1, 1, 1), "swapped"),
        ((64, 64, 3, 3), 1, (1, 1), "native"),  # not grouped
    ],
)
def test_weight_gradient_rule(
    weight_shape: tuple[int, ...], groups: int, dilation: tuple[int, ...], expected: str
) -> None:
    x = torch.empty(1, weight_shape[1] * groups, 8, 8)
    assert grouped_weight_grad(x, weight_shape, groups, dilation) == expected


def test_weight_gradient_rule_keeps_other_devices_native() -> None:
    x = torch.empty(1, 96, 8, 8, device="meta")
    assert grouped_weight_grad(x, (96, 1, 7, 7), 96, (1, 1)) == "native"


def test_depthwise_layer_uses_the_swapped_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    methods = []
    real = _grouped.grouped_weight_grad

    def spy(*args: object) -> str:
        methods.append(real(*args))
        return methods[-1]

    monkeypatch.setattr(_grouped, "grouped_weight_grad", spy)
    layer = flora.Conv2d(nn.Conv2d(8, 8, 7, padding=3, groups=8), ranks=2)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    layer(x).sum().backward()
    assert methods == ["swapped"]
    with torch.no_grad():
        layer(x)
    assert methods == ["swapped"]


def test_depthwise_adapter_compiles_without_graph_breaks() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8))
    flora.inject(model, flora.FLoRAConfig(target_modules=["0"], init="gaussian"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in (model[0].core, *model[0].factors)]
    for p in (model[0].core, *model[0].factors):
        p.grad = None
    model(x).square().sum().backward()
    for got, p in zip(grads, (model[0].core, *model[0].factors), strict=True):
        torch.testing.assert_close(got, p.grad)
