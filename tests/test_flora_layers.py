"""FLoRA layers: forward modes against a reference, gradients, merge, precision."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora
import flora._cost
import flora.layers.base
import tuckerlib
from flora.spec import usable_ranks


def _randomize(layer: flora.TuckerDelta, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.core, *layer.factors):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _reference_delta(layer: flora.TuckerDelta) -> torch.Tensor:
    return layer.scale * tuckerlib.tucker_to_tensor(layer.core, list(layer.factors))


def _tol(dtype: torch.dtype) -> float:
    return 100 * torch.finfo(dtype).eps


def _make(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "Linear":
        return nn.Linear(7, 5, dtype=dtype), torch.randn(3, 7, dtype=dtype)
    if kind == "Conv1d":
        return nn.Conv1d(4, 6, 3, padding=1, dtype=dtype), torch.randn(2, 4, 8, dtype=dtype)
    if kind == "Conv2d":
        return nn.Conv2d(4, 6, 3, stride=2, dtype=dtype), torch.randn(2, 4, 7, 7, dtype=dtype)
    if kind == "Depthwise":
        conv = nn.Conv2d(6, 6, 3, groups=6, padding="same", dtype=dtype)
        return conv, torch.randn(2, 6, 5, 5, dtype=dtype)
    if kind == "Conv3d":
        return nn.Conv3d(3, 4, 2, dtype=dtype), torch.randn(1, 3, 4, 4, 4, dtype=dtype)
    if kind == "Embedding":
        return nn.Embedding(11, 6, padding_idx=2, dtype=dtype), torch.tensor([[0, 2, 5, 10]])
    if kind == "Conv1D":  # transformers' Conv1D: weight stored (in, out) = (7, 5)
        return Conv1D(5, 7).to(dtype), torch.randn(3, 7, dtype=dtype)
    raise AssertionError(kind)


KINDS = ["Linear", "Conv1d", "Conv2d", "Depthwise", "Conv3d", "Embedding", "Conv1D"]


def _wrap(base: nn.Module, **options: object) -> flora.FLoRALayer:
    return getattr(flora, type(base).__name__)(base, ranks=3, **options)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_core_start_equals_base_exactly(kind: str) -> None:
    base, x = _make(kind)
    expected = base(x)
    for mode in ("dense", "factorized", "auto"):
        assert torch.equal(_wrap(base, forward=mode)(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_modes_agree_with_reference(kind: str) -> None:
    base, x = _make(kind, torch.float64)
    layer = _wrap(base, scale=0.5)
    _randomize(layer)
    delta = _reference_delta(layer)
    if kind == "Embedding":
        delta[base.padding_idx] = 0
        expected = F.embedding(x, base.weight + delta)
    elif kind == "Linear":
        expected = F.linear(x, base.weight + delta, base.bias)
    elif kind == "Conv1D":
        expected = F.linear(x, base.weight.T + delta, base.bias)
    else:
        expected = base._conv_forward(x, base.weight + delta, base.bias)
    for mode in ("dense", "factorized", "auto"):
        layer.forward_mode = mode
        torch.testing.assert_close(layer(x), expected, rtol=_tol(torch.float64), atol=1e-12)


conv_cases = st.fixed_dictionaries(
    {
        "dim": st.sampled_from([1, 2]),
        "groups": st.sampled_from([1, 1, 2, 4]),
        "out_per_group": st.integers(1, 3),
        "in_per_group": st.integers(1, 3),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "padding": st.sampled_from([0, 1, 2, "same", "valid"]),
        "padding_mode": st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
        "ranks": st.lists(st.integers(1, 3), min_size=4, max_size=4),
        "size": st.integers(6, 9),
    }
)


@given(case=conv_cases)
def test_conv_modes_agree_with_reference_conv(case: dict) -> None:
    dim, groups = case["dim"], case["groups"]
    stride = 1 if case["padding"] == "same" else case["stride"]
    conv_type = nn.Conv1d if dim == 1 else nn.Conv2d
    torch.manual_seed(0)
    base = conv_type(
        case["in_per_group"] * groups,
        case["out_per_group"] * groups,
        case["kernel"],
        stride=stride,
        padding=case["padding"],
        dilation=case["dilation"],
        groups=groups,
        padding_mode=case["padding_mode"],
        dtype=torch.float64,
    )
    x = torch.randn(2, base.in_channels, *(case["size"],) * dim, dtype=torch.float64)
    layer = getattr(flora, conv_type.__name__)(base, ranks=case["ranks"][: 2 + dim], scale=0.7)
    clipped = [min(r, s) for r, s in zip(case["ranks"][: 2 + dim], base.weight.shape, strict=True)]
    assert layer.ranks == usable_ranks(clipped, base.weight.shape)
    _randomize(layer)
    reference_conv = {1: F.conv1d, 2: F.conv2d}[dim]
    delta = _reference_delta(layer)
    if base.padding_mode != "zeros":
        padded = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    else:
        padded, padding = x, base.padding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = reference_conv(
            padded, base.weight + delta, base.bias, base.stride, padding, base.dilation, groups
        )
    with warnings.catch_warnings():
        # "same" padding with an even kernel pads a copy of the input: expected here.
        warnings.simplefilter("ignore", UserWarning)
        for mode in ("dense", "factorized", "auto"):
            layer.forward_mode = mode
            torch.testing.assert_close(layer(x), expected, rtol=_tol(torch.float64), atol=1e-12)


def test_grouped_conv_falls_back_to_dense() -> None:
    layer = flora.Conv2d(nn.Conv2d(4, 4, 3, groups=2), forward="factorized")
    assert not layer.factorizable
    assert layer.choose_forward(torch.randn(1, 4, 5, 5)) == "dense"


def _meta_input(*shape: int) -> torch.Tensor:
    # choose_forward reads only shapes: a meta tensor allocates nothing.
    return torch.empty(shape, device="meta", requires_grad=True)


def test_auto_without_gradients() -> None:
    layer = flora.Linear(nn.Linear(1024, 1024), ranks=8)
    with torch.no_grad():
        # Fused W + ΔW only pays for building ΔW: cheap next to many tokens...
        assert layer.choose_forward(_meta_input(2048, 1024)) == "dense"
        # ...and dear next to one token through three thin matmuls.
        assert layer.choose_forward(_meta_input(1, 1024)) == "factorized"


def test_auto_with_gradients() -> None:
    linear = flora.Linear(nn.Linear(1024, 1024), ranks=8)
    # A fused op pays the merged weight's gradient, a full-size GEMM.
    assert linear.choose_forward(_meta_input(32, 1024)) == "factorized"
    # Tiny weights, many tokens: the thin matmuls' activation traffic costs
    # more than the weight gradient (measured in bench_auto_rule.py).
    small = flora.Linear(nn.Linear(64, 64), ranks=2)
    assert small.choose_forward(_meta_input(4096, 64)) == "dense"


def test_auto_balance_zero_counts_multiply_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    small = flora.Linear(nn.Linear(64, 64), ranks=2)
    for constant in ("MACHINE_BALANCE", "STREAM_BALANCE", "OP_OVERHEAD"):
        monkeypatch.setattr(flora._cost, constant, 0)
    # Decisions are cached per shape: an empty cache while the constants are 0.
    fresh = functools.lru_cache(flora.layers.base._auto_choice)
    monkeypatch.setattr(flora.layers.base, "_cached_choice", fresh)
    # 16x fewer multiply-adds: a flop count alone picks factorized.
    assert small.choose_forward(_meta_input(4096, 64)) == "factorized"


def test_chain_cost_counts_backward_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flora._cost, "OP_OVERHEAD", 0)
    ops = [flora._cost.Op(1000, 1), flora._cost.Op(2000, 1)]
    assert flora._cost.chain_cost(ops, training=False, input_grad=False) == 3000
    # The first op skips its input gradient unless the input needs one.
    assert flora._cost.chain_cost(ops, training=True, input_grad=False) == 2000 + 6000
    assert flora._cost.chain_cost(ops, training=True, input_grad=True) == 9000


def test_op_overhead_is_paid_once_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flora._cost, "OP_OVERHEAD", 7)
    ops = [flora._cost.Op(1000, 1), flora._cost.Op(2000, 1)]
    assert flora._cost.chain_cost(ops, training=True, input_grad=True) == 9000 + 6 * 7


def test_ops_without_multiply_adds_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flora._cost, "OP_OVERHEAD", 0)
    stream, gemm = flora._cost.Op(0, 100), flora._cost.Op(1, 100)
    assert flora._cost.roofline(stream) == flora._cost.STREAM_BALANCE * 100
    assert flora._cost.roofline(gemm) == flora._cost.MACHINE_BALANCE * 100


@pytest.mark.parametrize("kind", [*KINDS, "Parameter"])
@pytest.mark.parametrize("mode", ["factorized", "dense"])
def test_adapter_gradients_are_contiguous(kind: str, mode: str) -> None:
    # DDP buckets expect gradients with the parameters' strides; a permuted
    # gradient makes it warn and copy on every step. is_contiguous() alone
    # ignores the strides of size-1 axes (a depthwise core's in/groups mode).
    module, x = _gradcheck_case(kind)
    (layer,) = flora.adapted_layers(module).values()
    if isinstance(layer, flora.FLoRALayer):
        layer.forward_mode = mode
    _randomize(layer)
    module(x.requires_grad_(x.is_floating_point())).square().sum().backward()
    for p in (layer.core, *layer.factors):
        assert p.grad is not None
        assert p.grad.is_contiguous()
        assert p.grad.stride() == p.stride(), (tuple(p.shape), p.grad.stride())


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight)


def _gradcheck_case(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """Tiny float64 modules: gradcheck costs two forwards per input entry."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    cases = {
        "Linear": lambda: (nn.Linear(4, 3, **f64), torch.randn(2, 4, **f64)),
        "Conv1d": lambda: (nn.Conv1d(2, 3, 3, padding=1, **f64), torch.randn(1, 2, 5, **f64)),
        "Conv2d": lambda: (nn.Conv2d(2, 3, 3, stride=2, **f64), torch.randn(1, 2, 5, 5, **f64)),
        "Depthwise": lambda: (
            nn.Conv2d(3, 3, 3, groups=3, padding=1, **f64),
            torch.randn(1, 3, 4, 4, **f64),
        ),
        "Conv3d": lambda: (nn.Conv3d(2, 2, 2, **f64), torch.randn(1, 2, 3, 3, 3, **f64)),
        "Embedding": lambda: (nn.Embedding(5, 3, padding_idx=0, **f64), torch.tensor([0, 1, 4])),
        "Conv1D": lambda: (Conv1D(3, 4).to(torch.float64), torch.randn(2, 4, **f64)),
    }
    if kind == "Parameter":
        module = _Experts()
        flora.TuckerParametrization(module, "weight", ranks=2)
        return module, torch.randn(2, 2, 3, **f64)
    base, x = cases[kind]()
    wrapper = nn.Sequential(getattr(flora, type(base).__name__)(base, ranks=2))
    return wrapper, x


@pytest.mark.parametrize("kind", [*KINDS, "Parameter"])
@pytest.mark.parametrize("mode", ["factorized", "dense"])
def test_gradcheck_float64(kind: str, mode: str) -> None:
    module, x = _gradcheck_case(kind)
    (layer,) = flora.adapted_layers(module).values()
    if isinstance(layer, flora.FLoRALayer):
        layer.forward_mode = mode
    _randomize(layer)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [
        p.detach().clone().requires_grad_(True)
        for _, p in module.named_parameters()
        if p.requires_grad
    ]
    assert len(names) == 1 + len(layer.factors)

    def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

    if x.is_floating_point():
        assert torch.autograd.gradcheck(run, (x.requires_grad_(True), *params))
    else:
        assert torch.autograd.gradcheck(lambda *p: run(x, *p), tuple(params))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_merge_unmerge(kind: str, dtype: torch.dtype, rtol: float) -> None:
    base, x = _make(kind, dtype)
    original = base.weight.detach().clone()
    layer = _wrap(base)
    _randomize(layer)
    unmerged = layer(x)
    layer.merge()
    with torch.no_grad():
        # A merged layer must not run the adapter branch at all.
        layer.core.fill_(float("nan"))
    merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=rtol, atol=rtol * unmerged.abs().max().item())
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    _randomize(layer)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=rtol, atol=rtol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_parametrization_merge_and_bmm() -> None:
    torch.manual_seed(0)
    experts = nn.Module()
    experts.weight = nn.Parameter(torch.randn(3, 4, 5))
    p = flora.TuckerParametrization(experts, "weight", ranks=2)
    _randomize(p)
    x = torch.randn(3, 2, 4)
    expected = torch.bmm(x, experts.parametrizations.weight.original + _reference_delta(p))
    torch.testing.assert_close(torch.bmm(x, experts.weight), expected)
    p.merge()
    torch.testing.assert_close(torch.bmm(x, experts.weight), expected, rtol=1e-5, atol=1e-5)


def test_one_dimensional_parameter() -> None:
    norm = nn.LayerNorm(6)
    p = flora.TuckerParametrization(norm, "weight", ranks=3)
    assert p.ranks == (1,)  # any vector is one column times one core entry
    assert norm.weight.shape == (6,)
    _randomize(p)
    torch.testing.assert_close(norm.weight, 1 + _reference_delta(p))


def test_embedding_padding_row_gets_no_update() -> None:
    base, idx = _make("Embedding")
    layer = _wrap(base)
    _randomize(layer)
    for mode in ("dense", "factorized"):
        layer.forward_mode = mode
        out = layer(idx)
        assert torch.equal(out[0, 1], base.weight[2])
        out.sum().backward()
    layer.merge()
    assert torch.equal(base.weight[2], torch.zeros(6))


def test_dropout_acts_on_branch_input() -> None:
    base, x = _make("Linear")
    layer = flora.Linear(base, ranks=3, dropout=0.5, forward="factorized")
    _randomize(layer)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5)
    torch.testing.assert_close(out, base(x) + dropped @ _reference_delta(layer).T)
    layer.forward_mode = "dense"
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), out)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ _reference_delta(layer).T)


@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "Embedding"])
def test_bfloat16_base_float32_adapter(kind: str) -> None:
    base, x = _make(kind, torch.bfloat16)
    layer = _wrap(base)
    assert layer.core.dtype == torch.float32
    _randomize(layer)
    for mode in ("dense", "factorized"):
        layer.forward_mode = mode
        out = layer(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        assert layer.core.grad is not None
        assert layer.core.grad.dtype == torch.float32
        assert base.weight.grad is None
    expected = (base.weight.float() + layer.delta_weight().detach()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(base.weight, expected)


def test_reconstruction_matches_tuckerlib() -> None:
    layer = flora.Conv2d(nn.Conv2d(5, 4, 3), ranks=(3, 2, 2, 1), scale=2.0)
    _randomize(layer)
    torch.testing.assert_close(layer.delta_weight(), _reference_delta(layer))
    assert layer.n_adapter_params == tuckerlib.tucker_params((4, 5, 3, 3), (3, 2, 2, 1))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"forward": "fast"}, ValueError),
        ({"init": "ones"}, ValueError),
        ({"dropout": 1.0}, ValueError),
        ({"scale": 0.0}, ValueError),
        ({"ranks": (2, 2, 2)}, ValueError),
        ({"ranks": 0}, ValueError),
    ],
)
def test_layer_rejects_bad_options(options: dict, error: type) -> None:
    with pytest.raises(error):
        flora.Linear(nn.Linear(3, 3), **options)


def test_layer_rejects_wrong_module() -> None:
    with pytest.raises(TypeError, match=r"wraps a torch\.nn\.Linear"):
        flora.Linear(nn.Conv1d(2, 2, 1))
