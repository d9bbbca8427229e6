"""Exact Tucker <-> LoRA algebra: usable ranks keep ΔW, LoRA pairs rebuild it, truncation error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flora._lora_math import lora_split, to_lora
from flora._truncate import truncate_tucker
from flora._tucker import reconstruct, to_usable_ranks
from tuckerlib import energy_ranks


@st.composite
def tuckers(draw: st.DrawFn, max_modes: int = 4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A float64 Tucker tensor with any ranks, wider factors and oversized core modes included."""
    ndim = draw(st.integers(2, max_modes))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
    ranks = [draw(st.integers(1, 7)) for _ in range(ndim)]
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks, generator=generator, dtype=torch.float64)
    factors = [
        torch.randn(i, r, generator=generator, dtype=torch.float64)
        for i, r in zip(shape, ranks, strict=True)
    ]
    return core, factors


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(float(b.abs().max()), 1.0)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale)


@given(tuckers())
def test_to_usable_ranks_keeps_the_tensor_at_usable_ranks(tucker) -> None:
    core, factors = tucker
    small, small_factors = to_usable_ranks(core, factors)
    _close(reconstruct(small, small_factors), reconstruct(core, factors))
    ranks = small.shape
    for n, (rank, factor) in enumerate(zip(ranks, small_factors, strict=True)):
        assert rank <= factor.shape[0]
        assert rank <= math.prod(ranks) // rank, (n, ranks)


def _peft_delta(kind: str, a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """ΔW as PEFT's layers apply it, at scaling 1 (grouped conv: its block-diagonal part)."""
    if kind == "Embedding":
        return (b @ a).T
    if kind == "Linear":
        return b @ a
    out, step = b.shape[0], b.shape[1]
    b2 = b.reshape(out, step)
    in_step = a.shape[1] // groups
    blocks = []
    for g in range(groups):
        rows = slice(g * out // groups, (g + 1) * out // groups)
        kernel = a[g * step : (g + 1) * step]
        outside = torch.cat([kernel[:, : g * in_step], kernel[:, (g + 1) * in_step :]], dim=1)
        assert not outside.any()  # lora_A keeps each group to its own input channels
        local = kernel[:, g * in_step : (g + 1) * in_step]
        blocks.append(torch.tensordot(b2[rows], local, dims=1))
    return torch.cat(blocks)


@pytest.mark.parametrize(
    ("kind", "shape", "groups"),
    [
        ("Linear", (5, 7), 1),
        ("Embedding", (9, 4), 1),
        ("Conv1d", (6, 4, 3), 1),
        ("Conv2d", (6, 2, 3, 2), 3),
        ("Conv2d", (4, 1, 3, 3), 4),
        ("Conv3d", (4, 3, 2, 2, 2), 1),
    ],
)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 5))
def test_lora_pairs_rebuild_the_update(kind, shape, groups, seed, rank) -> None:
    generator = torch.Generator().manual_seed(seed)
    ranks = [min(rank, size) for size in shape]
    core = torch.randn(ranks, generator=generator, dtype=torch.float64)
    factors = [
        torch.randn(i, r, generator=generator, dtype=torch.float64)
        for i, r in zip(shape, ranks, strict=True)
    ]
    delta = reconstruct(core * 0.3, factors)
    left, right = lora_split(core, factors, 0.3)
    tensors = to_lora(kind, left, right, groups=groups)
    _close(_peft_delta(kind, tensors.lora_a, tensors.lora_b, groups), delta)
    assert tensors.rank % groups == 0
    assert tensors.rank <= groups * min(left.shape[1], shape[0] // groups)


def test_embedding_padding_column_is_zero() -> None:
    left, right = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    tensors = to_lora("Embedding", left, right, padding_idx=4)
    assert not tensors.lora_a[:, 4].any()
    assert left[4].all()  # the factor itself is untouched


@given(tuckers(), st.data())
def test_compress_error_is_the_measured_error(tucker, data) -> None:
    core, factors = tucker
    shape = [f.shape[0] for f in factors]
    ranks = [data.draw(st.integers(1, size)) for size in shape]
    result = truncate_tucker(core, factors, ranks)
    delta = reconstruct(core, factors)
    approx = reconstruct(result.core, result.factors)
    norm = float(delta.norm())
    measured = float((delta - approx).norm()) / norm if norm > 0 else 0.0
    assert result.relative_error == pytest.approx(measured, rel=1e-8, abs=1e-10)
    assert all(r <= t for r, t in zip(result.core.shape, ranks, strict=True))


@given(tuckers())
def test_compress_is_exact_at_the_multilinear_rank(tucker) -> None:
    core, factors = tucker
    delta = reconstruct(core, factors).numpy()
    multilinear = [
        max(1, int(np.linalg.matrix_rank(np.moveaxis(delta, n, 0).reshape(delta.shape[n], -1))))
        for n in range(delta.ndim)
    ]
    result = truncate_tucker(core, factors, multilinear)
    assert result.relative_error < 1e-10
    _close(reconstruct(result.core, result.factors), torch.from_numpy(delta))


def test_compress_by_a_rule_and_bad_arguments() -> None:
    generator = torch.Generator().manual_seed(0)
    core = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.1], dtype=torch.float64))
    factors = [
        torch.linalg.qr(torch.randn(8, 4, generator=generator, dtype=torch.float64))[0]
        for _ in range(2)
    ]
    seen = []

    def by_energy(small: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        seen.append(shape)
        return energy_ranks(small, 0.9)

    result = truncate_tucker(core, factors, by_energy)
    assert seen == [(8, 8)]
    assert tuple(result.core.shape) == (2, 2)  # 16 + 4 = 20 of 21.01 > 0.9
    assert result.relative_error == pytest.approx(math.sqrt(1.01 / 21.01))
    assert result.core.dtype == torch.float64
    with pytest.raises(ValueError, match=r"one rank in \[1, I_n\] per mode"):
        truncate_tucker(core, factors, (9, 1))
    with pytest.raises(ValueError, match=r"one rank in \[1, I_n\] per mode"):
        truncate_tucker(core, factors, (2,))
