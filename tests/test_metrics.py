"""Tests of relative_error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import TuckerTensor, relative_error

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize(
    ("x", "x_hat", "expected"),
    [
        ([3.0, 4.0], [3.0, 3.0], 0.2),
        ([3.0, 4.0], [3.0, 4.0], 0.0),
        ([3.0, 4.0], [0.0, 0.0], 1.0),
        ([3.0, 4.0], [6.0, 8.0], 1.0),
        ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]], 1 / math.sqrt(2)),
    ],
)
def test_known_values(backend, x, x_hat, expected):
    error = relative_error(backend.asarray(np.array(x)), backend.asarray(np.array(x_hat)))
    assert isinstance(error, float)
    assert error == pytest.approx(expected, rel=1e-15, abs=1e-15)


def test_zero_reference():
    zeros = np.zeros((2, 3))
    assert relative_error(zeros, zeros) == 0.0
    assert relative_error(zeros, np.full((2, 3), 1e-300)) == math.inf


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS)
def test_equals_norm_of_difference_over_norm(backend, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype) + 1
    noise = (0.1 * rng.standard_normal(shape)).astype(dtype)
    expected = np.linalg.norm(noise.astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
    actual = relative_error(backend.asarray(x), backend.asarray(x + noise))
    assert isinstance(actual, float)
    eps = float(np.finfo(dtype).eps)
    assert actual == pytest.approx(expected, rel=100 * eps, abs=100 * eps)


def test_integer_inputs_and_lists():
    assert relative_error([3, 4], [3, 3]) == pytest.approx(0.2, rel=1e-7)
    assert relative_error(np.array([3, 4]), np.array([3.0, 3.0])) == pytest.approx(0.2, rel=1e-15)


def test_tucker_tensor_approximation(backend):
    rng = np.random.default_rng(0)
    core, u, v = (
        rng.standard_normal((2, 2)),
        rng.standard_normal((3, 2)),
        rng.standard_normal((4, 2)),
    )
    full = u @ core @ v.T
    swapped_v = v[:, ::-1].copy()
    tucker = TuckerTensor(backend.asarray(core), [backend.asarray(u), backend.asarray(swapped_v)])
    swapped = u @ core @ swapped_v.T
    expected = np.linalg.norm(full - swapped) / np.linalg.norm(full)
    assert relative_error(backend.asarray(full), tucker) == pytest.approx(expected, rel=1e-12)
    exact = TuckerTensor(backend.asarray(core), [backend.asarray(u), backend.asarray(v)])
    assert relative_error(backend.asarray(full), exact) < 1e-14


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_rejected(bad):
    good = np.ones(3)
    poisoned = np.array([1.0, bad, 1.0])
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        relative_error(poisoned, good)
    with pytest.raises(ValueError, match="x_hat contains NaN or infinity"):
        relative_error(good, poisoned)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"x_hat must have the shape of x \(2, 3\), got \(3, 2\)"):
        relative_error(np.ones((2, 3)), np.ones((3, 2)))


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_extreme_magnitudes_neither_underflow_nor_overflow(scale):
    x = np.array([3.0, 4.0]) * scale
    assert relative_error(x, np.array([3.0, 3.0]) * scale) == pytest.approx(0.2, rel=1e-14)
