"""FLoRA layers and the adapter lifecycle on a CUDA device (skipped without one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import flora
import tuckerlib

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_kernels() -> Iterator[None]:
    # TF32 convolutions (cuDNN's default) round to about 1e-3; the comparisons
    # below are for float32 arithmetic, and bitwise ones need fixed algorithms.
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.deterministic,
    )
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.deterministic,
        ) = saved


def _case(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    options = {"dtype": dtype, "device": CUDA}
    if kind == "Linear":
        return nn.Linear(16, 12, **options), torch.randn(5, 16, **options)
    if kind == "Conv1d":
        return nn.Conv1d(8, 12, 3, padding=1, **options), torch.randn(2, 8, 10, **options)
    if kind == "Conv2d":
        return nn.Conv2d(8, 12, 3, stride=2, **options), torch.randn(2, 8, 9, 9, **options)
    if kind == "Depthwise":
        return nn.Conv2d(8, 8, 3, groups=8, padding=1, **options), torch.randn(
            2, 8, 6, 6, **options
        )
    if kind == "Conv3d":
        return nn.Conv3d(4, 6, 2, **options), torch.randn(1, 4, 5, 5, 5, **options)
    if kind == "Embedding":
        return nn.Embedding(20, 8, padding_idx=0, **options), torch.tensor(
            [[0, 3, 19]], device=CUDA
        )
    raise AssertionError(kind)


KINDS = ["Linear", "Conv1d", "Conv2d", "Depthwise", "Conv3d", "Embedding"]


def _randomize(layer: flora.AdaptedWeight, name: str = "default") -> None:
    generator = torch.Generator(device=CUDA).manual_seed(0)
    adapter = layer.adapters[name]
    with torch.no_grad():
        for p in (adapter.core, *adapter.factors):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, device=CUDA, dtype=p.dtype))


def _reference(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, weight)
    return base._conv_forward(x, weight, base.bias)


def _hand_delta(layer: flora.AdaptedWeight, name: str = "default") -> torch.Tensor:
    adapter = layer.adapters[name]
    core, factors = adapter.core.detach(), [f.detach() for f in adapter.factors]
    delta = adapter.spec.scale * tuckerlib.tucker_to_tensor(core, factors)
    padding = getattr(layer.base_layer, "padding_idx", None)
    if padding is not None:
        delta[padding] = 0
    return delta


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forward", ["dense", "factorized"])
def test_forward_backward_merge_on_cuda(kind: str, forward: str) -> None:
    base, x = _case(kind)
    model = flora.inject(
        nn.Sequential(base), flora.FLoRAConfig(ranks=3, forward=forward, target_modules=["0"])
    )
    layer = model[0]
    assert layer.core.device.type == CUDA
    _randomize(layer)
    expected = _reference(base, x, base.weight + _hand_delta(layer))
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    assert all(
        p.grad is not None and p.grad.device.type == CUDA for p in layer.adapters.parameters()
    )
    assert base.weight.grad is None
    flora.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    flora.unmerge(model)


def test_named_adapters_on_cuda(tmp_path: Path) -> None:
    base, x = _case("Conv2d")
    base_out = base(x)
    model = nn.Sequential(base, nn.Flatten(), nn.LazyLinear(3, device=CUDA))
    model(x)
    for name in ("a", "b"):
        config = flora.FLoRAConfig(ranks=2, target_modules=["0"], modules_to_save=["2"])
        flora.inject(model, config, adapter_name=name)
        _randomize(model[0], name)
    layer = model[0]
    assert torch.equal(model[2].copies["a"].weight, model[2].original_module.weight)
    flora.set_adapter(model, "b")
    expected = _reference(base, x, base.weight + _hand_delta(layer, "b"))
    torch.testing.assert_close(model[0](x), expected, rtol=1e-4, atol=1e-4)
    with flora.disable_adapter(model):
        assert torch.equal(model[0](x), base_out)
    flora.add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "diff")
    torch.testing.assert_close(
        layer.delta_weight("diff"),
        _hand_delta(layer, "a") - _hand_delta(layer, "b"),
        rtol=1e-4,
        atol=1e-5,
    )
    flora.save_adapter(model, tmp_path / "b", adapter_name="b")
    with pytest.warns(UserWarning, match="'a' is active now"):
        flora.delete_adapter(model, "b")
    flora.load_adapter(model, tmp_path / "b")
    flora.set_adapter(model, "b")
    torch.testing.assert_close(model[0](x), expected, rtol=1e-4, atol=1e-4)
    assert model[2].copies["b"].weight.device.type == CUDA


def test_hosvd_init_on_cuda() -> None:
    base, x = _case("Conv2d")
    expected = base(x)
    model = flora.inject(
        nn.Sequential(base), flora.FLoRAConfig(ranks=2, init="hosvd", target_modules=["0"])
    )
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    flora.unload(model, merge=False)


@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "Embedding"])
def test_bfloat16_autocast_on_cuda(kind: str) -> None:
    base, x = _case(kind)
    model = flora.inject(nn.Sequential(base), flora.FLoRAConfig(ranks=3, target_modules=["0"]))
    layer = model[0]
    _randomize(layer)
    reference = model(x).detach()
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        out = model(x)
    if kind != "Embedding":  # an embedding lookup is not autocast
        assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)
    out.float().square().sum().backward()
    assert layer.core.grad is not None
    assert layer.core.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["Linear", "Conv2d"])
def test_bfloat16_base_with_float32_adapter_on_cuda(kind: str) -> None:
    base, x = _case(kind, torch.bfloat16)
    model = flora.inject(nn.Sequential(base), flora.FLoRAConfig(ranks=3, target_modules=["0"]))
    layer = model[0]
    assert layer.core.dtype == torch.float32
    _randomize(layer)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.core.grad.dtype == torch.float32
    expected = (base.weight.float() + layer.delta_weight().detach()).to(torch.bfloat16)
    flora.merge(model)
    assert torch.equal(base.weight, expected)
