"""Bad and edge inputs to the decompositions and mode spectra.

``CASES`` is the table of refused inputs: (id, call, exception type, a
pattern the message must match, naming the argument). A new function joins
by adding rows. The silent edge cases (half precision, extreme magnitudes)
come after the table, each asserting the right result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tuckerlib as tl

torch = pytest.importorskip("torch")

DECOMPOSITIONS: dict[str, Callable[..., Any]] = {
    "hosvd": lambda x: tl.hosvd(x, 2),
    "sthosvd": lambda x: tl.sthosvd(x, 2),
    "hooi": lambda x: tl.hooi(x, 2, max_iter=2),
    "rhosvd": lambda x: tl.rhosvd(x, 2, seed=0),
}
WITH_SPECTRA = {**DECOMPOSITIONS, "mode_spectra": tl.mode_spectra}


def _x(shape=(6, 5, 4)) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape)


def _torch_tucker() -> tl.TuckerTensor:
    return tl.sthosvd(torch.asarray(_x()), 2)


UNKNOWN_CHUNKS = (
    r"Dask array of shape \(nan, 5\) has chunks of unknown size.*compute_chunk_sizes\(\)"
)


def _unknown_chunks() -> Any:
    """A Dask array whose first mode has unknown size, as ``da.from_delayed`` with NaN makes."""
    dask = pytest.importorskip("dask")
    delayed = dask.delayed(np.ones)((6, 5))
    return dask.array.from_delayed(delayed, shape=(np.nan, 5), dtype=np.float64)


def _boolean_indexed() -> Any:
    """``x[mask]`` of a Dask array: a 2-D result whose first mode has unknown size."""
    da = pytest.importorskip("dask.array")
    x = da.from_array(_x((6, 5)), chunks=3)
    return x[x[:, 0] > 0]


def _nan() -> np.ndarray:
    x = _x()
    x[1, 2, 3] = np.nan
    return x


CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    *[
        (
            f"{name}-zero-size-mode",
            lambda f=f: f(np.zeros((6, 0, 8))),
            ValueError,
            r"x has a mode of size 0 \(shape \(6, 0, 8\)\)",
        )
        for name, f in WITH_SPECTRA.items()
    ],
    *[
        (
            f"{name}-meta-tensor",
            lambda f=f: f(torch.empty(6, 5, 4, device="meta")),
            ValueError,
            r"x is a meta tensor: meta tensors hold a shape but no values",
        )
        for name, f in WITH_SPECTRA.items()
    ],
    *[
        (f"{name}-nan", lambda f=f: f(_nan()), ValueError, r"x contains NaN or infinity")
        for name, f in WITH_SPECTRA.items()
    ],
    *[
        (f"{name}-complex", lambda f=f: f(_x() + 1j), TypeError, r"x must be real")
        for name, f in WITH_SPECTRA.items()
    ],
    *[
        (
            f"{name}-0d",
            lambda f=f: f(np.float64(3.0)),
            ValueError,
            r"x must have at least 1 dimension",
        )
        for name, f in WITH_SPECTRA.items()
    ],
    (
        "hooi-init-other-library",
        lambda: tl.hooi(_x(), 2, init=_torch_tucker()),
        TypeError,
        r"init must hold arrays of the same library as x \(numpy\).*torch",
    ),
    (
        "hooi-init-wrong-rank",
        lambda: tl.hooi(_x(), 3, init=tl.sthosvd(_x(), 2)),
        ValueError,
        r"init must have shape \(6, 5, 4\) and rank \(3, 3, 3\)",
    ),
    (
        "hooi-init-unknown",
        lambda: tl.hooi(_x(), 2, init="random"),
        ValueError,
        r"init must be \"sthosvd\", \"hosvd\" or a TuckerTensor, got 'random'",
    ),
    ("hooi-rank-none", lambda: tl.hooi(_x(), None), ValueError, r"hooi needs rank"),
    ("hooi-max-iter", lambda: tl.hooi(_x(), 2, max_iter=-1), ValueError, r"max_iter must be >= 0"),
    ("hooi-tol", lambda: tl.hooi(_x(), 2, tol=-1.0), ValueError, r"tol must be >= 0"),
    ("rhosvd-rank-none", lambda: tl.rhosvd(_x(), None), ValueError, r"rhosvd needs rank"),
    (
        "rhosvd-oversample",
        lambda: tl.rhosvd(_x(), 2, oversample=-1),
        ValueError,
        r"oversample must be >= 0",
    ),
    (
        "rhosvd-seed",
        lambda: tl.rhosvd(_x(), 2, seed="a"),
        TypeError,
        r"seed must be None, an int or a numpy.random.Generator",
    ),
    (
        "sthosvd-rank-and-tol",
        lambda: tl.sthosvd(_x(), 2, tol=0.1),
        ValueError,
        r"pass either rank or tol",
    ),
    (
        "sthosvd-tol-range",
        lambda: tl.sthosvd(_x(), tol=1.5),
        ValueError,
        r"tol must lie in the open interval \(0, 1\)",
    ),
    (
        "sthosvd-order",
        lambda: tl.sthosvd(_x(), 2, order=(0, 0, 1)),
        ValueError,
        r"order must be a permutation of the modes 0..2",
    ),
    (
        "sthosvd-rank-too-large",
        lambda: tl.sthosvd(_x(), (7, 2, 2)),
        ValueError,
        r"rank\[0\]=7 is outside \[1, 6\]",
    ),
    (
        "sthosvd-randomized-tol",
        lambda: tl.sthosvd(_x(), tol=0.1, method="randomized"),
        ValueError,
        r'method="randomized" needs rank',
    ),
    (
        "hosvd-method",
        lambda: tl.hosvd(_x(), 2, method="eig"),
        ValueError,
        r"method must be one of 'auto', 'svd', 'gram', 'randomized'; got 'eig'",
    ),
    (
        "mode_spectra-method",
        lambda: tl.mode_spectra(_x(), method="eig"),
        ValueError,
        r'method must be "gram" or "svd", got \'eig\'',
    ),
    (
        "hosvd-dask-unknown-chunks",
        lambda: tl.hosvd(_unknown_chunks(), 1),
        ValueError,
        UNKNOWN_CHUNKS,
    ),
    (
        "sthosvd-dask-unknown-chunks",
        lambda: tl.sthosvd(_unknown_chunks(), 1),
        ValueError,
        UNKNOWN_CHUNKS,
    ),
    (
        "hooi-dask-unknown-chunks",
        lambda: tl.hooi(_unknown_chunks(), 1),
        ValueError,
        UNKNOWN_CHUNKS,
    ),
    (
        "rhosvd-dask-unknown-chunks",
        lambda: tl.rhosvd(_unknown_chunks(), 1, seed=0),
        ValueError,
        UNKNOWN_CHUNKS,
    ),
    (
        "mode_spectra-dask-unknown-chunks",
        lambda: tl.mode_spectra(_unknown_chunks()),
        ValueError,
        UNKNOWN_CHUNKS,
    ),
    (
        "sthosvd-boolean-index-dask-unknown-chunks",
        lambda: tl.sthosvd(_boolean_indexed(), 1),
        ValueError,
        UNKNOWN_CHUNKS,
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_refused_clearly(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_dask_nan_is_found_in_the_first_pass():
    da = pytest.importorskip("dask.array")
    x = da.from_array(_nan(), chunks=(3, 5, 2))
    for name, f in WITH_SPECTRA.items():
        with pytest.raises(ValueError, match="x contains NaN or infinity"):
            f(x)
        assert name


# Half precision: computed in float32, returned in the input's dtype.

HALF = [
    ("torch-bfloat16", lambda a: torch.asarray(a, dtype=torch.bfloat16)),
    ("torch-float16", lambda a: torch.asarray(a, dtype=torch.float16)),
    ("numpy-float16", lambda a: a.astype(np.float16)),
]


def _as_float64(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.double().numpy()
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize(("kind", "make"), HALF, ids=[h[0] for h in HALF])
def test_half_precision_computes_in_float32(name, kind, make):
    x = make(_x())
    tucker = DECOMPOSITIONS[name](x)
    assert tucker.core.dtype == x.dtype
    assert all(f.dtype == x.dtype for f in tucker.factors)
    exact = DECOMPOSITIONS[name](_as_float64(x).astype(np.float32))
    reference = _as_float64(x)
    error = tl.relative_error(reference, tl.tucker_to_tensor(*map(_as_float64_tree, tucker)))
    assert error == pytest.approx(tl.relative_error(reference, exact), abs=2e-2)


def _as_float64_tree(part: Any) -> Any:
    if isinstance(part, (tuple, list)):
        return [_as_float64(p) for p in part]
    return _as_float64(part)


@pytest.mark.parametrize(("kind", "make"), HALF, ids=[h[0] for h in HALF])
def test_half_precision_spectra_are_float32(kind, make):
    x = make(_x())
    spectra = tl.mode_spectra(x)
    expected = tl.mode_spectra(_as_float64(x))
    for s, e in zip(spectra, expected, strict=True):
        assert str(s.dtype).endswith("float32")
        np.testing.assert_allclose(_as_float64(s), e, rtol=1e-5, atol=1e-5 * e[0])


# Extreme magnitudes: scaled by a power of two before any Gram matrix.

EXTREME = [
    ("float32-1e19", np.float32, 1e19),
    ("float32-1e-30", np.float32, 1e-30),
    ("float64-1e300", np.float64, 1e300),
    ("float64-1e-300", np.float64, 1e-300),
]


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize(("kind", "dtype", "factor"), EXTREME, ids=[e[0] for e in EXTREME])
def test_every_finite_magnitude_decomposes(name, kind, dtype, factor):
    base = _x().astype(dtype)
    x = (base * factor).astype(dtype)
    assert np.all(np.isfinite(x))
    tucker = DECOMPOSITIONS[name](x)
    reference = DECOMPOSITIONS[name](base)
    assert tucker.core.dtype == dtype
    eps = np.finfo(dtype).eps
    for f, g in zip(tucker.factors, reference.factors, strict=True):
        np.testing.assert_allclose(f, g, atol=1e3 * eps)
    np.testing.assert_allclose(
        tucker.core / factor, reference.core, rtol=1e3 * eps, atol=1e3 * eps * 10
    )


@pytest.mark.parametrize(("kind", "dtype", "factor"), EXTREME, ids=[e[0] for e in EXTREME])
def test_every_finite_magnitude_has_spectra_and_ranks(kind, dtype, factor):
    base = _x().astype(dtype)
    x = (base * factor).astype(dtype)
    for s, e in zip(tl.mode_spectra(x), tl.mode_spectra(base), strict=True):
        np.testing.assert_allclose(np.asarray(s, dtype=np.float64) / factor, e, rtol=1e-4)
    assert tl.energy_ranks(x, 0.9) == tl.energy_ranks(base, 0.9)
    assert tl.ranks_for_budget(x, 60) == tl.ranks_for_budget(base, 60)
    result, expected = tl.tucker_vs_matrix(x, 60), tl.tucker_vs_matrix(base, 60)
    assert result["tucker_error"] == pytest.approx(expected["tucker_error"], rel=1e-3)


# Long contractions: float32 sums over millions of entries keep float32's
# accuracy (issue 22: a mode of 10⁸ ones gave a core 0.6% off; 2·10⁶, 4e-4).

LONG = 2 * 10**6
RANK_ONE: dict[str, Callable[..., Any]] = {
    "hosvd": lambda x: tl.hosvd(x, 1),
    "sthosvd": lambda x: tl.sthosvd(x, 1),
    "hooi": lambda x: tl.hooi(x, 1, max_iter=2),
    "rhosvd": lambda x: tl.rhosvd(x, 1, seed=0),
    "mode_spectra": tl.mode_spectra,
}


@pytest.mark.parametrize("name", list(RANK_ONE))
def test_a_long_mode_keeps_float32_accuracy(backend, name):
    x = backend.asarray(np.ones((1, LONG), np.float32))
    result = RANK_ONE[name](x)
    exact = np.sqrt(LONG)
    if name == "mode_spectra":
        for s in result:
            assert float(backend.to_numpy(s)[0]) == pytest.approx(exact, rel=1e-6)
        return
    assert float(backend.to_numpy(result.core).ravel()[0]) == pytest.approx(exact, rel=1e-6)
    assert tl.relative_error(x, result) < 1e-6
