"""Tests of unfold and fold: Kolda-Bader order, exact inverse, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import fold, unfold

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**32 - 1)

# Kolda & Bader (2009), example 2.1: frontal slices X1 = [[1, 4, 7, 10], ...], X2 = [[13, ...]].
KB_TENSOR = np.arange(1.0, 25.0).reshape(2, 4, 3).transpose(2, 1, 0)
KB_UNFOLDINGS = {
    0: [
        [1, 4, 7, 10, 13, 16, 19, 22],
        [2, 5, 8, 11, 14, 17, 20, 23],
        [3, 6, 9, 12, 15, 18, 21, 24],
    ],
    1: [
        [1, 2, 3, 13, 14, 15],
        [4, 5, 6, 16, 17, 18],
        [7, 8, 9, 19, 20, 21],
        [10, 11, 12, 22, 23, 24],
    ],
    2: [list(range(1, 13)), list(range(13, 25))],
}


def _random(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _unfold_by_definition(x: np.ndarray, mode: int) -> np.ndarray:
    """Place every element by the column formula of Kolda & Bader §2.4."""
    shape = x.shape
    others = [k for k in range(x.ndim) if k != mode]
    strides = {k: math.prod(shape[m] for m in others if m < k) for k in others}
    out = np.zeros((shape[mode], math.prod(shape[k] for k in others)), dtype=x.dtype)
    for index in np.ndindex(*shape):
        out[index[mode], sum(index[k] * strides[k] for k in others)] = x[index]
    return out


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_fold_inverts_unfold_exactly(backend, shape, dtype, seed, data):
    mode = data.draw(st.integers(-len(shape), len(shape) - 1), label="mode")
    x = backend.asarray(_random(shape, dtype, seed))
    matrix = unfold(x, mode)
    assert tuple(matrix.shape) == (shape[mode], math.prod(shape) // shape[mode])
    back = fold(matrix, mode, shape)
    assert back.dtype == x.dtype
    # A permutation of the entries: exact, no tolerance.
    np.testing.assert_array_equal(backend.to_numpy(back), backend.to_numpy(x))


@given(shape=SHAPES, seed=SEEDS, data=st.data())
def test_unfold_places_elements_by_the_kolda_bader_formula(backend, shape, seed, data):
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    x = _random(shape, "float64", seed)
    np.testing.assert_array_equal(
        backend.to_numpy(unfold(backend.asarray(x), mode)), _unfold_by_definition(x, mode)
    )


@given(shape=SHAPES, seed=SEEDS, data=st.data())
def test_negative_mode_counts_from_the_end(backend, shape, seed, data):
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    x = backend.asarray(_random(shape, "float64", seed))
    np.testing.assert_array_equal(
        backend.to_numpy(unfold(x, mode - len(shape))), backend.to_numpy(unfold(x, mode))
    )


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_kolda_bader_example_unfoldings(backend, mode):
    x = backend.asarray(KB_TENSOR)
    expected = np.asarray(KB_UNFOLDINGS[mode], dtype=np.float64)
    np.testing.assert_array_equal(backend.to_numpy(unfold(x, mode)), expected)
    np.testing.assert_array_equal(
        backend.to_numpy(fold(backend.asarray(expected), mode, KB_TENSOR.shape)), KB_TENSOR
    )


def test_unfold_is_not_a_c_order_reshape_of_moveaxis():
    # The convention matters: a C-order reshape lets the *last* modes vary fastest.
    c_order = np.moveaxis(KB_TENSOR, 1, 0).reshape(4, 6)
    assert not np.array_equal(unfold(KB_TENSOR, 1), c_order)
    assert c_order[0].tolist() == [1, 13, 2, 14, 3, 15]


def test_one_dimensional_tensor_unfolds_to_a_column():
    x = np.arange(5.0)
    assert unfold(x, 0).shape == (5, 1)
    np.testing.assert_array_equal(fold(unfold(x, -1), 0, (5,)), x)


@pytest.mark.parametrize("mode", [3, -4, 10])
def test_unfold_rejects_mode_out_of_range(mode):
    with pytest.raises(ValueError, match=r"mode=-?\d+ is out of range.*-3 <= mode < 3"):
        unfold(np.zeros((2, 3, 4)), mode)


@pytest.mark.parametrize("mode", [1.0, "0", None, True])
def test_unfold_rejects_non_integer_mode(mode):
    with pytest.raises(TypeError, match="mode must be an integer"):
        unfold(np.zeros((2, 3)), mode)


def test_unfold_accepts_numpy_integer_mode():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(unfold(x, np.int64(1)), unfold(x, 1))


def test_unfold_rejects_zero_dimensional_input():
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        unfold(np.float64(3.0), 0)


@pytest.mark.parametrize(
    ("matrix_shape", "shape", "match"),
    [
        ((2, 3, 4), (2, 3, 4), "matrix must be 2-D"),
        ((6,), (2, 3), "matrix must be 2-D"),
        ((3, 8), (2, 3, 4), r"cannot be folded into shape \(2, 3, 4\).*expected shape \(2, 12\)"),
        ((2, 11), (2, 3, 4), r"expected shape \(2, 12\)"),
        ((2, 3), (), "shape must have at least one mode"),
    ],
)
def test_fold_rejects_mismatched_shapes(matrix_shape, shape, match):
    with pytest.raises(ValueError, match=match):
        fold(np.zeros(matrix_shape), 0, shape)


@pytest.mark.parametrize("mode", [2, -3])
def test_fold_rejects_mode_out_of_range(mode):
    with pytest.raises(ValueError, match=r"mode=-?\d+ is out of range"):
        fold(np.zeros((2, 3)), mode, (2, 3))


def test_unfold_and_fold_pass_gradients():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    for mode in range(3):
        assert torch.autograd.gradcheck(lambda t, m=mode: unfold(t, m), (x,))
        assert torch.autograd.gradcheck(
            lambda t, m=mode: fold(unfold(t, m) * 2.0, m, (2, 3, 4)), (x,)
        )
