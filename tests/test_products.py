"""Tests of mode_product and multi_mode_product: identities, known values, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import mode_product, multi_mode_product, unfold
from tuckerlib._layout import inverse, memory_order
from tuckerlib._namespace import get_namespace
from tuckerlib._products import _cheapest_order

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
SHAPES_2D_UP = st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple)
DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**32 - 1)

KB_TENSOR = np.arange(1.0, 25.0).reshape(2, 4, 3).transpose(2, 1, 0)


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _mode_product_reference(x: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """``x ×_mode matrix`` in float64 by tensordot, independently of the code under test."""
    y = np.tensordot(matrix.astype(np.float64), x.astype(np.float64), axes=([1], [mode]))
    return np.moveaxis(y, 0, mode)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_unfolding_of_product_is_matrix_times_unfolding(backend, shape, dtype, seed, data):
    rng = np.random.default_rng(seed)
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    rows = data.draw(st.integers(1, 5), label="rows")
    x, m = _random(rng, shape, dtype), _random(rng, (rows, shape[mode]), dtype)
    y = mode_product(backend.asarray(x), backend.asarray(m), mode)
    assert y.dtype == backend.asarray(x).dtype
    expected = m.astype(np.float64) @ unfold(x.astype(np.float64), mode)
    backend.assert_close(unfold(y, mode), expected)
    backend.assert_close(y, _mode_product_reference(x, m, mode))


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_transpose_equals_using_the_transposed_matrix(backend, shape, dtype, seed, data):
    rng = np.random.default_rng(seed)
    mode = data.draw(st.integers(-len(shape), len(shape) - 1), label="mode")
    cols = data.draw(st.integers(1, 5), label="cols")
    x, u = _random(rng, shape, dtype), _random(rng, (shape[mode], cols), dtype)
    xb = backend.asarray(x)
    actual = mode_product(xb, backend.asarray(u), mode, transpose=True)
    expected = mode_product(xb, backend.asarray(np.ascontiguousarray(u.T)), mode)
    backend.assert_close(actual, expected, factor=10.0)


@given(shape=SHAPES_2D_UP, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_products_in_different_modes_commute(backend, shape, dtype, seed, data):
    rng = np.random.default_rng(seed)
    first, second = data.draw(st.permutations(range(len(shape))), label="modes")[:2]
    x = backend.asarray(_random(rng, shape, dtype))
    a = backend.asarray(_random(rng, (3, shape[first]), dtype))
    b = backend.asarray(_random(rng, (2, shape[second]), dtype))
    ab = mode_product(mode_product(x, a, first), b, second)
    ba = mode_product(mode_product(x, b, second), a, first)
    backend.assert_close(ab, ba)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_products_in_one_mode_compose(backend, shape, dtype, seed, data):
    rng = np.random.default_rng(seed)
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    x = _random(rng, shape, dtype)
    a, b = _random(rng, (3, shape[mode]), dtype), _random(rng, (2, 3), dtype)
    xb, ab, bb = backend.asarray(x), backend.asarray(a), backend.asarray(b)
    backend.assert_close(
        mode_product(mode_product(xb, ab, mode), bb, mode), mode_product(xb, bb @ ab, mode)
    )


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_identity_leaves_the_tensor_unchanged(backend, shape, dtype, seed, data):
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    x = backend.asarray(_random(np.random.default_rng(seed), shape, dtype))
    eye = backend.asarray(np.eye(shape[mode], dtype=dtype))
    backend.assert_close(mode_product(x, eye, mode), x, factor=1.0)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_vector_contracts_the_mode_away(backend, shape, dtype, seed, data):
    rng = np.random.default_rng(seed)
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    transpose = data.draw(st.booleans(), label="transpose")
    x, v = _random(rng, shape, dtype), _random(rng, (shape[mode],), dtype)
    y = mode_product(backend.asarray(x), backend.asarray(v), mode, transpose=transpose)
    assert tuple(y.shape) == shape[:mode] + shape[mode + 1 :]
    expected = np.tensordot(x.astype(np.float64), v.astype(np.float64), axes=([mode], [0]))
    backend.assert_close(y, expected)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_multi_mode_product_equals_sequential_products_in_any_order(
    backend, shape, dtype, seed, data
):
    rng = np.random.default_rng(seed)
    order = data.draw(st.permutations(range(len(shape))), label="order")
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=len(shape), max_size=len(shape)))
    x = backend.asarray(_random(rng, shape, dtype))
    mats = [backend.asarray(_random(rng, (sizes[n], shape[n]), dtype)) for n in range(len(shape))]
    sequential = x
    for n in order:
        sequential = mode_product(sequential, mats[n], n)
    backend.assert_close(multi_mode_product(x, mats), sequential)


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_multi_mode_product_honours_modes_skip_transpose_and_vectors(
    backend, shape, dtype, seed, data
):
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    modes = data.draw(st.permutations(range(ndim)), label="order")
    modes = modes[: data.draw(st.integers(1, ndim), label="count")]
    skip = data.draw(st.lists(st.sampled_from(modes), unique=True, max_size=ndim), label="skip")
    vectors = set(data.draw(st.lists(st.sampled_from(modes), unique=True), label="vectors"))
    transpose = data.draw(st.booleans(), label="transpose")
    negative = data.draw(st.booleans(), label="negative modes")

    x = _random(rng, shape, dtype)
    mats = []
    for n in modes:
        if n in vectors:
            mats.append(_random(rng, (shape[n],), dtype))
        else:
            size = int(rng.integers(1, 5))
            mats.append(_random(rng, (shape[n], size) if transpose else (size, shape[n]), dtype))

    expected = x.astype(np.float64)
    for n, m in sorted(zip(modes, mats, strict=True), reverse=True):
        if n in skip:
            continue
        if m.ndim == 1:
            expected = np.tensordot(expected, m.astype(np.float64), axes=([n], [0]))
        else:
            expected = _mode_product_reference(expected, m.T if transpose else m, n)

    given_modes = [n - ndim for n in modes] if negative else modes
    actual = multi_mode_product(
        backend.asarray(x),
        [backend.asarray(m) for m in mats],
        given_modes,
        skip=skip,
        transpose=transpose,
    )
    backend.assert_close(actual, expected)


def test_multi_mode_product_accepts_a_single_skip_mode():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5))
    mats = [rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 5))]
    expected = mode_product(mode_product(x, mats[0], 0), mats[2], 2)
    np.testing.assert_allclose(multi_mode_product(x, mats, skip=-2), expected, rtol=1e-12)


def test_multi_mode_product_without_matrices_returns_the_input():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(multi_mode_product(x, []), x)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_every_mode_of_a_larger_tensor(backend, mode):
    # Sizes beyond the property tests' range, so each GEMM path sees a real block.
    rng = np.random.default_rng(mode)
    shape = (40, 48, 56)
    for dtype in ("float32", "float64"):
        x, m = _random(rng, shape, dtype), _random(rng, (24, shape[mode]), dtype)
        expected = _mode_product_reference(x, m, mode)
        y = mode_product(backend.asarray(x), backend.asarray(m), mode)
        backend.assert_close(y, expected, factor=float(shape[mode]))
        u = np.ascontiguousarray(m.T)
        y = mode_product(backend.asarray(x), backend.asarray(u), mode, transpose=True)
        backend.assert_close(y, expected, factor=float(shape[mode]))


@given(shape=SHAPES, dtype=DTYPES, seed=SEEDS, data=st.data())
def test_transposed_layouts_give_the_same_product(backend, shape, dtype, seed, data):
    """A tensor stored with its axes permuted (e.g. Fortran order) is multiplied in place."""
    rng = np.random.default_rng(seed)
    axes = tuple(data.draw(st.permutations(range(len(shape))), label="memory order"))
    mode = data.draw(st.integers(0, len(shape) - 1), label="mode")
    stored = _random(rng, tuple(shape[k] for k in axes), dtype)
    x = np.transpose(stored, inverse(axes))
    m = _random(rng, (3, shape[mode]), dtype)
    xp = get_namespace(backend.asarray(stored))
    xp_x = xp.permute_dims(backend.asarray(stored), inverse(axes))
    y = mode_product(xp_x, backend.asarray(m), mode)
    backend.assert_close(y, _mode_product_reference(x, m, mode))
    if backend.name != "array_api_strict" and mode == axes[0]:
        assert memory_order(y) == memory_order(xp_x)


def _brute_force_order(shape: tuple[int, ...], targets: tuple[tuple[int, int], ...]) -> int:
    best = math.inf
    for order in itertools.permutations(targets):
        current, cost = list(shape), 0
        for mode, size in order:
            cost += size * math.prod(current)
            current[mode] = size
        best = min(best, cost)
    return best


def _cost(shape: tuple[int, ...], targets: dict[int, int], order: tuple[int, ...]) -> int:
    current, cost = list(shape), 0
    for mode in order:
        cost += targets[mode] * math.prod(current)
        current[mode] = targets[mode]
    return cost


@given(
    shape=st.lists(st.integers(1, 64), min_size=1, max_size=5).map(tuple),
    data=st.data(),
)
def test_cheapest_order_matches_brute_force(shape, data):
    modes = data.draw(st.permutations(range(len(shape))), label="modes")
    modes = modes[: data.draw(st.integers(0, len(shape)), label="count")]
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=len(modes), max_size=len(modes)))
    targets = tuple(zip(modes, sizes, strict=True))
    order = _cheapest_order(shape, targets)
    assert sorted(order) == sorted(modes)
    assert _cost(shape, dict(targets), order) == _brute_force_order(shape, targets)


def test_cheapest_order_shrinks_first():
    # Shrinking the two large modes first is ~30x cheaper than the mode order.
    targets = ((0, 16), (1, 16), (2, 16))
    assert _cheapest_order((64, 512, 512), targets)[0] in (1, 2)


def test_kolda_bader_mode_product_example(backend):
    # Kolda & Bader (2009) §2.5: X ×_1 U with U = [[1, 3, 5], [2, 4, 6]].
    u = backend.asarray(np.array([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]))
    y = backend.to_numpy(mode_product(backend.asarray(KB_TENSOR), u, 0))
    np.testing.assert_array_equal(y[:, :, 0], [[22, 49, 76, 103], [28, 64, 100, 136]])
    np.testing.assert_array_equal(y[:, :, 1], [[130, 157, 184, 211], [172, 208, 244, 280]])


def test_kolda_bader_vector_product_example(backend):
    # Kolda & Bader (2009) §2.5: X ×̄_2 v with v = [1, 2, 3, 4].
    v = backend.asarray(np.array([1.0, 2.0, 3.0, 4.0]))
    y = backend.to_numpy(mode_product(backend.asarray(KB_TENSOR), v, 1))
    np.testing.assert_array_equal(y, [[70, 190], [80, 200], [90, 210]])


@pytest.mark.parametrize(
    ("matrix_shape", "mode", "transpose", "error", "match"),
    [
        ((2, 3, 4), 0, False, ValueError, "matrix must be 1-D or 2-D"),
        ((), 0, False, ValueError, "matrix must be 1-D or 2-D"),
        ((5, 4), 0, False, ValueError, r"matrix must have shape \(J, 3\).*got \(5, 4\)"),
        ((5, 3), 0, True, ValueError, r"matrix must have shape \(3, J\).*transpose=True"),
        ((4,), 2, False, ValueError, "matrix is a vector of length 4, but mode 2 has size 5"),
        ((2, 3), 3, False, ValueError, "mode=3 is out of range"),
        ((2, 5), -4, False, ValueError, "mode=-4 is out of range"),
        ((2, 3), 0.0, False, TypeError, "mode must be an integer"),
    ],
)
def test_mode_product_rejects_bad_input(matrix_shape, mode, transpose, error, match):
    x = np.zeros((3, 4, 5))
    with pytest.raises(error, match=match):
        mode_product(x, np.zeros(matrix_shape), mode, transpose=transpose)


def test_mode_product_rejects_zero_dimensional_tensor():
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        mode_product(np.float64(1.0), np.ones((1, 1)), 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modes": [0]}, ValueError, "modes has 1 entries but 2 matrices"),
        ({"modes": [1, 1]}, ValueError, "modes must be distinct"),
        ({"modes": [0, -3]}, ValueError, "modes must be distinct"),
        ({"modes": [0, 3]}, ValueError, "modes=3 is out of range"),
        ({"modes": [0, 1.5]}, TypeError, "modes must be an integer"),
        ({"skip": 2}, ValueError, r"skip=\[2\] names modes not in modes=\[0, 1\]"),
        ({"skip": 7}, ValueError, "skip=7 is out of range"),
        ({"modes": [1, 0]}, ValueError, r"matrices\[0\] must have shape \(J, 4\)"),
    ],
)
def test_multi_mode_product_rejects_bad_input(kwargs, error, match):
    x = np.zeros((3, 4, 5))
    with pytest.raises(error, match=match):
        multi_mode_product(x, [np.zeros((2, 3)), np.zeros((2, 4))], **kwargs)


def test_mode_products_pass_gradients():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mats = [
        torch.randn(3, n, dtype=torch.float64, generator=gen, requires_grad=True) for n in (2, 3, 4)
    ]
    for mode in range(3):
        assert torch.autograd.gradcheck(lambda t, m, n=mode: mode_product(t, m, n), (x, mats[mode]))
    vector = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, v: mode_product(t, v, 1), (x, vector))
    assert torch.autograd.gradcheck(lambda t, *ms: multi_mode_product(t, ms), (x, *mats))
    assert torch.autograd.gradcheck(
        lambda t, a, b: multi_mode_product(t, [a, b], [2, 0], transpose=True),
        (
            x,
            mats[2].T.detach().clone().requires_grad_(),
            mats[0].T.detach().clone().requires_grad_(),
        ),
    )
