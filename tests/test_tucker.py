"""Tests of TuckerTensor and tucker_to_tensor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import TuckerTensor, mode_product, tucker_params, tucker_to_tensor

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**32 - 1)


def _random_tucker(
    rng: np.random.Generator, shape: tuple[int, ...], rank: tuple[int, ...], dtype: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    core = rng.standard_normal(rank).astype(dtype)
    factors = [rng.standard_normal((i, r)).astype(dtype) for i, r in zip(shape, rank, strict=True)]
    return core, factors


def _orthonormal(rng: np.random.Generator, rows: int, cols: int, dtype: str) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q.astype(dtype)


def _shape_and_rank(data: st.DataObject, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(data.draw(st.integers(1, size), label=f"rank {n}") for n, size in enumerate(shape))


@given(rank=SHAPES, dtype=DTYPES, seed=SEEDS)
def test_identity_factors_return_the_core(backend, rank, dtype, seed):
    core = np.random.default_rng(seed).standard_normal(rank).astype(dtype)
    eyes = [backend.asarray(np.eye(r, dtype=dtype)) for r in rank]
    backend.assert_close(tucker_to_tensor(backend.asarray(core), eyes), core, factor=1.0)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_tucker_to_tensor_is_the_chain_of_mode_products(backend, shape, dtype, seed, data):
    rank = _shape_and_rank(data, shape)
    core, factors = _random_tucker(np.random.default_rng(seed), shape, rank, dtype)
    expected = core.astype(np.float64)
    for n, factor in enumerate(factors):
        expected = mode_product(expected, factor.astype(np.float64), n)
    tucker = TuckerTensor(backend.asarray(core), [backend.asarray(f) for f in factors])
    backend.assert_close(tucker.to_tensor(), expected)
    backend.assert_close(tucker_to_tensor(*tucker), expected)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_norm_of_orthonormal_factors_is_the_core_norm(backend, shape, dtype, seed, data):
    rank = _shape_and_rank(data, shape)
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(rank).astype(dtype)
    factors = [_orthonormal(rng, i, r, dtype) for i, r in zip(shape, rank, strict=True)]
    tucker = TuckerTensor(backend.asarray(core), [backend.asarray(f) for f in factors])
    norm = tucker.norm()
    assert tuple(norm.shape) == ()
    assert norm.dtype == tucker.core.dtype
    backend.assert_close(norm, np.linalg.norm(core.astype(np.float64)))


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_norm_equals_the_materialized_norm(backend, shape, dtype, seed, data):
    rank = _shape_and_rank(data, shape)
    core, factors = _random_tucker(np.random.default_rng(seed), shape, rank, dtype)
    tucker = TuckerTensor(backend.asarray(core), [backend.asarray(f) for f in factors])
    full = tucker_to_tensor(core.astype(np.float64), [f.astype(np.float64) for f in factors])
    # The Gram form squares the condition: allow more ulps than a plain product.
    backend.assert_close(tucker.norm(), np.linalg.norm(full), factor=1000.0)


def test_norm_of_a_complex_tucker_tensor():
    rng = np.random.default_rng(1)
    core = rng.standard_normal((2, 3)) + 1j * rng.standard_normal((2, 3))
    factors = [
        rng.standard_normal((4, 2)) + 1j * rng.standard_normal((4, 2)),
        rng.standard_normal((5, 3)),
    ]
    tucker = TuckerTensor(core, factors)
    np.testing.assert_allclose(tucker.norm(), np.linalg.norm(tucker.to_tensor()), rtol=1e-12)


def test_norm_of_a_zero_core_is_zero(backend):
    tucker = TuckerTensor(backend.asarray(np.zeros((2, 2))), [backend.asarray(np.eye(3, 2))] * 2)
    assert float(tucker.norm()) == 0.0


@given(shape=SHAPES, data=st.data())
def test_properties_match_the_parts(shape, data):
    rank = _shape_and_rank(data, shape)
    core, factors = _random_tucker(np.random.default_rng(0), shape, rank, "float64")
    tucker = TuckerTensor(core, factors)
    assert tucker.shape == shape
    assert tucker.rank == rank
    assert tucker.ndim == len(shape)
    assert tucker.n_params == tucker_params(shape, rank)
    assert tucker.n_params == core.size + sum(f.size for f in factors)


def test_unpacks_into_core_and_factors(backend):
    core = backend.asarray(np.ones((2, 3)))
    factors = [backend.asarray(np.eye(4, 2)), backend.asarray(np.eye(5, 3))]
    unpacked_core, unpacked_factors = TuckerTensor(core, factors)
    assert unpacked_core is core
    assert isinstance(unpacked_factors, tuple)
    assert all(a is b for a, b in zip(unpacked_factors, factors, strict=True))


def test_is_immutable_and_has_a_short_repr():
    tucker = TuckerTensor(np.ones((2, 3)), [np.eye(4, 2), np.eye(5, 3)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        tucker.core = np.zeros((2, 3))  # type: ignore[misc]
    assert repr(tucker) == "TuckerTensor(shape=(4, 5), rank=(2, 3))"


def test_lists_are_accepted_as_numpy():
    tucker = TuckerTensor([[1.0]], [[[1.0], [2.0]], [[3.0]]])
    assert isinstance(tucker.core, np.ndarray)
    assert all(isinstance(f, np.ndarray) for f in tucker.factors)
    np.testing.assert_array_equal(tucker.to_tensor(), [[3.0], [6.0]])


@pytest.mark.parametrize(
    ("core_shape", "factor_shapes", "match"),
    [
        ((2, 3), [(4, 2)], "a core with 2 modes needs 2 factors, got 1"),
        ((2, 3), [(4, 2), (5, 3), (6, 1)], "needs 2 factors, got 3"),
        ((2, 3), [(4, 3), (5, 3)], r"factors\[0\] must have shape \(I_0, 2\).*got \(4, 3\)"),
        ((2, 3), [(4, 2), (3,)], r"factors\[1\] must have shape \(I_1, 3\).*got \(3,\)"),
        ((2, 3), [(4, 2), (5, 3, 1)], r"factors\[1\] must have shape"),
        ((), [], "core must have at least one mode"),
    ],
)
def test_mismatched_factors_are_rejected(core_shape, factor_shapes, match):
    factors = [np.ones(s) for s in factor_shapes]
    with pytest.raises(ValueError, match=match):
        TuckerTensor(np.ones(core_shape), factors)
    with pytest.raises(ValueError, match=match):
        tucker_to_tensor(np.ones(core_shape), factors)


def test_tucker_tensor_and_norm_pass_gradients():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    factors = [
        torch.randn(i, r, dtype=torch.float64, generator=gen, requires_grad=True)
        for i, r in ((3, 2), (4, 3), (5, 2))
    ]
    assert torch.autograd.gradcheck(lambda c, *fs: tucker_to_tensor(c, fs), (core, *factors))
    assert torch.autograd.gradcheck(lambda c, *fs: TuckerTensor(c, fs).norm(), (core, *factors))
