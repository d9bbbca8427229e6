"""Bad input to the primitives: a clear error naming the argument, or the right result.

Each table row is one case; a new function joins by adding rows. ``CASES``
hold calls that must raise, ``BACKEND_CASES`` the same on every array
library (the ``backend`` fixture), and ``RESULTS`` inputs that used to give
a silent wrong result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import tuckerlib as tl

X = np.arange(24.0).reshape(2, 3, 4)
CORE = np.ones((2, 2))
FACTORS = [np.ones((3, 2)), np.ones((4, 2))]


def _fold(shape, mode=1, rows=5, cols=24):
    return lambda: tl.fold(np.ones((rows, cols)), mode, shape)


def _boolean_indexed():
    """``x[mask]`` of a Dask array: a 2-D result whose first mode has unknown size."""
    da = pytest.importorskip("dask.array")
    x = da.from_array(np.arange(1.0, 13.0).reshape(4, 3), chunks=2)
    return x[x[:, 0] > 3]


def _jnp():
    return pytest.importorskip("jax.numpy")


def _jit(f):
    return pytest.importorskip("jax").jit(f)


CASES = [
    # fold: the shape is validated, never truncated, split or wrapped.
    pytest.param(
        _fold((4, 5.7, 6)),
        TypeError,
        r"shape\[1\] must be a non-negative integer size, got float",
        id="fold-float-size",
    ),
    pytest.param(
        _fold("456"),
        TypeError,
        r"shape must be a sequence of non-negative integer sizes, got str",
        id="fold-string-shape",
    ),
    pytest.param(
        _fold((4.9, 5, 6), 0, 4, 30),
        TypeError,
        r"shape\[0\] must be .*, got float",
        id="fold-size-4.9",
    ),
    pytest.param(
        lambda: tl.fold(np.ones((2, 3)), 0, (2, -1, -3)),
        ValueError,
        r"shape\[1\] must be >= 0, got -1",
        id="fold-negative-size",
    ),
    pytest.param(
        _fold((4, True, 6)), TypeError, r"shape\[1\] must be .*, got bool", id="fold-bool-size"
    ),
    pytest.param(
        _fold(None), TypeError, r"shape must be a sequence .*, got NoneType", id="fold-shape-none"
    ),
    pytest.param(
        _fold({4, 5, 6}), TypeError, r"shape must be a sequence .*, got set", id="fold-shape-set"
    ),
    pytest.param(
        _fold(()), ValueError, r"shape must have at least one mode", id="fold-empty-shape"
    ),
    pytest.param(
        _fold((4, 5, 6), 3), ValueError, r"mode=3 is out of range", id="fold-mode-out-of-range"
    ),
    pytest.param(
        _fold((4, 5, 7)),
        ValueError,
        r"cannot be folded into shape \(4, 5, 7\)",
        id="fold-shape-mismatch",
    ),
    pytest.param(
        lambda: tl.fold(np.ones(5), 0, (5,)), ValueError, r"matrix must be 2-D", id="fold-matrix-1d"
    ),
    pytest.param(
        lambda: tl.fold(None, 0, (5,)),
        TypeError,
        r"matrix must be a numeric array .*got NoneType",
        id="fold-matrix-none",
    ),
    # unfold
    pytest.param(
        lambda: tl.unfold(None, 0),
        TypeError,
        r"x must be a numeric array .*got NoneType",
        id="unfold-none",
    ),
    pytest.param(
        lambda: tl.unfold("abc", 0),
        TypeError,
        r"x must be a numeric array .*got str",
        id="unfold-string",
    ),
    pytest.param(
        lambda: tl.unfold((v for v in X), 0),
        TypeError,
        r"x must be a numeric array .*got generator",
        id="unfold-generator",
    ),
    pytest.param(
        lambda: tl.unfold([[1, 2], [3]], 0),
        TypeError,
        r"x cannot be converted to an array",
        id="unfold-ragged-list",
    ),
    pytest.param(
        lambda: tl.unfold(np.float64(1.0), 0),
        ValueError,
        r"x must have at least 1 dimension",
        id="unfold-0d",
    ),
    pytest.param(
        lambda: tl.unfold(X, True),
        TypeError,
        r"mode must be an integer, got bool",
        id="unfold-mode-bool",
    ),
    pytest.param(
        lambda: tl.unfold(X, 1.0),
        TypeError,
        r"mode must be an integer, got float",
        id="unfold-mode-float",
    ),
    pytest.param(
        lambda: tl.unfold(X, 10**30),
        ValueError,
        r"mode=10+ is out of range .* -3 <= mode < 3",
        id="unfold-mode-huge",
    ),
    pytest.param(
        lambda: tl.unfold(X, -4), ValueError, r"mode=-4 is out of range", id="unfold-mode-negative"
    ),
    # mode_product
    pytest.param(
        lambda: tl.mode_product(X, np.ones((3, 2)), 1, transpose="no"),
        TypeError,
        r"transpose must be True or False, got str",
        id="mode-product-transpose-string",
    ),
    pytest.param(
        lambda: tl.mode_product(X, np.ones((3, 2)), 1, transpose=1),
        TypeError,
        r"transpose must be True or False, got int",
        id="mode-product-transpose-int",
    ),
    pytest.param(
        lambda: tl.mode_product(X, None, 1),
        TypeError,
        r"matrix must be a numeric array .*got NoneType",
        id="mode-product-matrix-none",
    ),
    pytest.param(
        lambda: tl.mode_product(X, np.ones((2, 3, 1)), 1),
        ValueError,
        r"matrix must be 1-D or 2-D",
        id="mode-product-matrix-3d",
    ),
    pytest.param(
        lambda: tl.mode_product(X, np.ones((2, 4)), 1),
        ValueError,
        r"matrix must have shape \(J, 3\)",
        id="mode-product-shape-mismatch",
    ),
    pytest.param(
        lambda: tl.mode_product(X, np.ones(4), 1),
        ValueError,
        r"matrix is a vector of length 4",
        id="mode-product-vector-mismatch",
    ),
    pytest.param(
        lambda: tl.mode_product(X, np.ones((2, 3)), 3),
        ValueError,
        r"mode=3 is out of range",
        id="mode-product-mode-out-of-range",
    ),
    pytest.param(
        lambda: tl.mode_product(np.ones(3, dtype="U1"), np.ones((2, 3)), 0),
        TypeError,
        r"x must be a numeric array .*dtype <U1",
        id="mode-product-string-array",
    ),
    # multi_mode_product
    pytest.param(
        lambda: tl.multi_mode_product(
            X, [np.ones((2, 2)), np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 2))]
        ),
        ValueError,
        r"matrices has 4 entries but x has only 3 modes",
        id="multi-four-matrices-on-3d",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, None),
        TypeError,
        r"matrices must be a sequence of arrays, one per mode, got NoneType",
        id="multi-matrices-none",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, {0: np.ones((2, 2))}),
        TypeError,
        r"matrices must be a sequence .*got dict",
        id="multi-matrices-dict",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2))], transpose="no"),
        TypeError,
        r"transpose must be True or False",
        id="multi-transpose-string",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2))], modes="0"),
        TypeError,
        r"modes must be a mode or a sequence of modes, got str",
        id="multi-modes-string",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2))], modes=[0.0]),
        TypeError,
        r"modes must be an integer, got float",
        id="multi-modes-float",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2)), np.ones((2, 2))], modes=[0, -3]),
        ValueError,
        r"modes must be distinct",
        id="multi-modes-repeat-negative",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2))], modes=[0, 1]),
        ValueError,
        r"modes has 2 entries but 1 matrices",
        id="multi-modes-length",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2))], skip=2),
        ValueError,
        r"skip=\[2\] names modes not in modes",
        id="multi-skip-not-in-modes",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2))], skip=True),
        TypeError,
        r"skip must be .*, got bool",
        id="multi-skip-bool",
    ),
    pytest.param(
        lambda: tl.multi_mode_product(X, [np.ones((2, 2)), None]),
        TypeError,
        r"matrices\[1\] must be a numeric array",
        id="multi-matrix-none",
    ),
    # Tucker tensors
    pytest.param(
        lambda: tl.TuckerTensor(CORE, None),
        TypeError,
        r"factors must be a sequence of factor matrices, one per mode, got NoneType",
        id="tucker-factors-none",
    ),
    pytest.param(
        lambda: tl.TuckerTensor(CORE, 3),
        TypeError,
        r"factors must be a sequence .*got int",
        id="tucker-factors-int",
    ),
    pytest.param(
        lambda: tl.TuckerTensor(None, FACTORS),
        TypeError,
        r"core must be a numeric array .*got NoneType",
        id="tucker-core-none",
    ),
    pytest.param(
        lambda: tl.TuckerTensor(CORE, ["ab", "cd"]),
        TypeError,
        r"factors\[0\] must be a numeric array .*got str",
        id="tucker-factor-string",
    ),
    pytest.param(
        lambda: tl.TuckerTensor(CORE, FACTORS[:1]),
        ValueError,
        r"a core with 2 modes needs 2 factors, got 1",
        id="tucker-factor-count",
    ),
    pytest.param(
        lambda: tl.TuckerTensor(CORE, [np.ones((3, 3)), FACTORS[1]]),
        ValueError,
        r"factors\[0\] must have shape \(I_0, 2\)",
        id="tucker-factor-shape",
    ),
    pytest.param(
        lambda: tl.tucker_to_tensor(CORE, None),
        TypeError,
        r"factors must be a sequence",
        id="tucker-to-tensor-factors-none",
    ),
    pytest.param(
        lambda: tl.tucker_to_tensor(CORE, {0: FACTORS[0], 1: FACTORS[1]}),
        TypeError,
        r"factors must be a sequence .*got dict",
        id="tucker-to-tensor-factors-dict",
    ),
    # ranks and parameter counts
    pytest.param(
        lambda: tl.resolve_rank(2, (-3, 5)),
        ValueError,
        r"shape\[0\] must be >= 0, got -3",
        id="resolve-rank-negative-size",
    ),
    pytest.param(
        lambda: tl.resolve_rank(2, (3.5, 5)),
        TypeError,
        r"shape\[0\] must be .*, got float",
        id="resolve-rank-float-size",
    ),
    pytest.param(
        lambda: tl.resolve_rank({0: 2}, (3, 5)),
        TypeError,
        r"rank must be an integer or a sequence .*got dict",
        id="resolve-rank-dict",
    ),
    pytest.param(
        lambda: tl.resolve_rank({1, 2}, (3, 5)),
        TypeError,
        r"rank must be an integer or a sequence .*got set",
        id="resolve-rank-set",
    ),
    pytest.param(
        lambda: tl.resolve_rank(2.5, (3, 5)),
        TypeError,
        r"rank must be an integer, got float",
        id="resolve-rank-float",
    ),
    pytest.param(
        lambda: tl.resolve_rank((2, True), (3, 5)),
        TypeError,
        r"rank\[1\] must be an integer, got bool",
        id="resolve-rank-bool-entry",
    ),
    pytest.param(
        lambda: tl.tucker_params((-4, 5), 2),
        ValueError,
        r"shape\[0\] must be >= 0, got -4",
        id="tucker-params-negative-size",
    ),
    pytest.param(
        lambda: tl.tucker_params((4.9, 5), 2),
        TypeError,
        r"shape\[0\] must be .*, got float",
        id="tucker-params-float-size",
    ),
    pytest.param(
        lambda: tl.tucker_params("45", 2),
        TypeError,
        r"shape must be a sequence .*got str",
        id="tucker-params-string-shape",
    ),
    pytest.param(
        lambda: tl.tucker_params((4, 5), 0),
        ValueError,
        r"rank must be >= 1, got 0",
        id="tucker-params-rank-zero",
    ),
    # relative_error
    pytest.param(
        lambda: tl.relative_error(X, X[0]),
        ValueError,
        r"x_hat must have the shape of x",
        id="relative-error-shape",
    ),
    pytest.param(
        lambda: tl.relative_error(np.array([np.nan]), np.array([1.0])),
        ValueError,
        r"x contains NaN or infinity",
        id="relative-error-nan",
    ),
    pytest.param(
        lambda: tl.relative_error(np.ones(2), np.array([1.0, np.inf])),
        ValueError,
        r"x_hat contains NaN or infinity",
        id="relative-error-inf",
    ),
    pytest.param(
        lambda: tl.relative_error(None, None),
        TypeError,
        r"x must be a numeric array .*got NoneType",
        id="relative-error-none",
    ),
    pytest.param(
        lambda: tl.relative_error("ab", "ab"),
        TypeError,
        r"x must be a numeric array .*got str",
        id="relative-error-string",
    ),
    pytest.param(
        lambda: tl.unfold(_boolean_indexed(), 0),
        ValueError,
        r"chunks of unknown size \(NaN\).*call its compute_chunk_sizes\(\) method",
        id="unfold-dask-unknown-chunks",
    ),
    pytest.param(
        lambda: tl.relative_error(_boolean_indexed(), _boolean_indexed()),
        ValueError,
        r"chunks of unknown size \(NaN\).*call its compute_chunk_sizes\(\) method",
        id="relative-error-dask-unknown-chunks",
    ),
    pytest.param(
        lambda: _jit(tl.relative_error)(_jnp().ones(3), _jnp().zeros(3)),
        TypeError,
        r"relative_error \(a Python float\) needs the values of the tensor, which jax\.jit "
        r"does not have.*call it outside jax\.jit",
        id="relative-error-under-jit",
    ),
    pytest.param(
        lambda: _jit(lambda x: tl.relative_error(x, tl.sthosvd(x, 1)))(_jnp().ones((3, 2))),
        TypeError,
        r"needs the values of the tensor, which jax\.jit does not have",
        id="relative-error-of-traced-tucker",
    ),
]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(("call", "error", "match"), CASES)
def test_bad_input_gets_a_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


BACKEND_CASES = [
    pytest.param(
        lambda b: tl.mode_product(
            b.asarray(np.ones((2, 3), bool)), b.asarray(np.ones((2, 2), bool)), 0
        ),
        TypeError,
        r"x is a boolean array; boolean arrays are not supported",
        id="mode-product-bool",
    ),
    pytest.param(
        lambda b: tl.mode_product(b.asarray(np.ones((2, 3))), b.asarray(np.ones((2, 2), bool)), 0),
        TypeError,
        r"matrix is a boolean array",
        id="mode-product-bool-matrix",
    ),
    pytest.param(
        lambda b: tl.multi_mode_product(
            b.asarray(np.ones((2, 3))), [b.asarray(np.ones((2, 2), bool))]
        ),
        TypeError,
        r"matrices\[0\] is a boolean array",
        id="multi-bool",
    ),
    pytest.param(
        lambda b: tl.TuckerTensor(
            b.asarray(np.ones((1, 1), bool)), [b.asarray(np.ones((2, 1), bool))] * 2
        ),
        TypeError,
        r"core is a boolean array",
        id="tucker-bool",
    ),
    pytest.param(
        lambda b: tl.multi_mode_product(b.asarray(X), [b.asarray(np.ones((2, 2)))] * 4),
        ValueError,
        r"matrices has 4 entries",
        id="multi-four-matrices",
    ),
    pytest.param(
        lambda b: tl.mode_product(b.asarray(X), b.asarray(np.ones((3, 2))), 1, transpose="no"),
        TypeError,
        r"transpose must be True or False",
        id="transpose-string",
    ),
    pytest.param(
        lambda b: tl.relative_error(b.asarray(X), b.asarray(X[0])),
        ValueError,
        r"x_hat must have the shape of x",
        id="relative-error-shape",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BACKEND_CASES)
def test_bad_input_gets_a_clear_error_on_every_backend(backend, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(backend)


def test_mixed_dtypes_that_do_not_promote_are_named() -> None:
    strict = pytest.importorskip("array_api_strict")
    x, m = strict.ones((2, 3)), strict.ones((2, 2), dtype=strict.int64)
    with pytest.raises(TypeError, match=r"dtypes of x \(.*float64\), matrix \(.*int64\) do not"):
        tl.mode_product(x, m, 0)


LONG = 2 * 10**6


def _long_unit_vector() -> np.ndarray:
    return np.full(LONG, 1 / np.sqrt(LONG), np.float32)


def _matrices(shape):
    return [np.arange(2.0 * n).reshape(2, n) + 1 for n in shape]


RESULTS = [
    # A contraction over 2·10⁶ float32 entries keeps float32's accuracy (issue 22).
    pytest.param(
        lambda b: tl.mode_product(
            b.asarray(np.ones((1, LONG), np.float32)), b.asarray(_long_unit_vector()), 1
        ),
        lambda b: b.asarray(np.array([np.float32(_long_unit_vector().astype(np.float64).sum())])),
        id="mode-product-over-a-long-mode",
    ),
    # A one-shot iterable is read once, not used up finding the array library.
    pytest.param(
        lambda b: tl.multi_mode_product(b.asarray(X), (b.asarray(m) for m in _matrices(X.shape))),
        lambda b: tl.multi_mode_product(b.asarray(X), [b.asarray(m) for m in _matrices(X.shape)]),
        id="multi-generator-of-matrices",
    ),
    pytest.param(
        lambda b: tl.multi_mode_product(
            b.asarray(X), [b.asarray(np.ones((2, 4)))], modes=iter([2])
        ),
        lambda b: tl.mode_product(b.asarray(X), b.asarray(np.ones((2, 4))), 2),
        id="multi-generator-of-modes",
    ),
    pytest.param(
        lambda b: tl.tucker_to_tensor(b.asarray(CORE), (b.asarray(f) for f in FACTORS)),
        lambda b: b.asarray(np.full((3, 4), 4.0)),
        id="tucker-to-tensor-generator",
    ),
    # Overflow and underflow: scaled before squaring.
    pytest.param(
        lambda b: tl.relative_error(
            b.asarray(np.array([1e308, -1e308])), b.asarray(np.array([-1e308, 1e308]))
        ),
        lambda b: 2.0,
        id="relative-error-near-float64-max",
    ),
    pytest.param(
        lambda b: tl.relative_error(
            b.asarray(np.array([1e-310, 0.0])), b.asarray(np.array([0.0, 1e-310]))
        ),
        lambda b: math.sqrt(2.0),
        id="relative-error-subnormal",
        marks=pytest.mark.skip_backend(
            "jax", reason="XLA on the CPU flushes subnormal numbers to zero"
        ),
    ),
    pytest.param(
        lambda b: tl.TuckerTensor(
            b.asarray(np.array([[1e200]])), [b.asarray(np.ones((2, 1))), b.asarray(np.ones((1, 1)))]
        ).norm(),
        lambda b: b.asarray(np.asarray(math.sqrt(2.0) * 1e200)),
        id="tucker-norm-huge",
    ),
    pytest.param(
        lambda b: tl.TuckerTensor(
            b.asarray(np.array([[1e-200]])),
            [b.asarray(np.full((2, 1), 1e-200)), b.asarray(np.ones((1, 1)))],
        ).norm(),
        lambda b: b.asarray(np.asarray(math.sqrt(2.0) * 1e-300)),
        id="tucker-norm-tiny",
    ),
    # Accepted as before: NumPy integer scalars, integer products.
    pytest.param(
        lambda b: (
            tl.fold(b.asarray(np.ones((3, 8))), np.int64(1), (np.int64(2), np.int32(3), 4)).shape
        ),
        lambda b: (2, 3, 4),
        id="fold-numpy-integers",
    ),
]


@pytest.mark.parametrize(("call", "expected"), RESULTS)
def test_formerly_silent_cases_give_the_right_result(backend, call, expected) -> None:
    actual, wanted = call(backend), expected(backend)
    if isinstance(wanted, float):
        assert actual == pytest.approx(wanted, rel=1e-12)
    elif isinstance(wanted, tuple):
        assert tuple(actual) == wanted
    else:
        backend.assert_close(actual, wanted)


@pytest.mark.parametrize("xp_name", ["numpy", "torch"])
def test_relative_error_of_half_precision_does_not_overflow(xp_name) -> None:
    xp = pytest.importorskip(xp_name)
    x = xp.asarray(np.array([6e4, -6e4], np.float16))
    assert tl.relative_error(x, -x) == 2.0


def test_torch_promotes_mixed_dtypes_as_documented() -> None:
    torch = pytest.importorskip("torch")
    y = tl.mode_product(torch.ones(2, 3), torch.ones(4, 2, dtype=torch.float64), 0)
    assert y.dtype == torch.float64
    assert torch.equal(y, torch.full((4, 3), 2.0, dtype=torch.float64))


def test_integer_products_stay_integer_and_exact() -> None:
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    y = tl.mode_product(x, np.array([[1, 1]], dtype=np.int64), 0)
    assert y.dtype == np.int64
    assert y.tolist() == [[3, 5, 7]]


def test_unfold_and_fold_accept_boolean_arrays() -> None:
    mask = np.arange(24).reshape(2, 3, 4) % 3 == 0
    assert np.array_equal(tl.fold(tl.unfold(mask, 1), 1, mask.shape), mask)


def test_resolve_rank_accepts_numpy_integers_and_arrays() -> None:
    assert tl.resolve_rank(np.int64(2), np.array([3, 5])) == (2, 2)
    assert tl.resolve_rank(np.array([1, 4]), (3, 5)) == (1, 4)
    assert tl.resolve_rank((r for r in (1, None)), (3, 5)) == (1, 5)
