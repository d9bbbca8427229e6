"""Bad input to the rank analysis: a clear error naming the argument, or the right result.

Each table row is one case; a new function joins by adding rows. ``CASES``
must raise, ``BACKEND_CASES`` raise on every array library, and
``RESULTS`` used to give a silent wrong result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import tuckerlib as tl
from tuckerlib.analysis import lora_budget, lora_budget_ranks, tensor_kind, tucker_vs_matrix

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 5, 6))
OTHER = RNG.standard_normal((4, 5, 6))
SPECTRA = [np.array([3.0, 2.0, 1.0]), np.array([3.0, 2.0, 1.0, 0.0]), np.array([3.0, 2.0, 1.0])]


def _unknown_chunks():
    """A Dask array whose first mode has unknown size (``da.from_delayed`` with NaN)."""
    dask = pytest.importorskip("dask")
    delayed = dask.delayed(np.ones)((6, 5))
    return dask.array.from_delayed(delayed, shape=(np.nan, 5), dtype=np.float64)


CASES = [
    # energy_ranks
    pytest.param(
        lambda: tl.energy_ranks("abc"),
        TypeError,
        r"x_or_spectra must be an array or a sequence of 1-D spectra, one per mode, got str",
        id="energy-ranks-string",
    ),
    pytest.param(
        lambda: tl.energy_ranks(None),
        TypeError,
        r"x_or_spectra must be an array .*got NoneType",
        id="energy-ranks-none",
    ),
    pytest.param(
        lambda: tl.energy_ranks({0: np.ones(3)}),
        TypeError,
        r"x_or_spectra must be .*got dict",
        id="energy-ranks-dict",
    ),
    pytest.param(
        lambda: tl.energy_ranks([]),
        ValueError,
        r"x_or_spectra is an empty list",
        id="energy-ranks-empty",
    ),
    pytest.param(
        lambda: tl.energy_ranks([np.array([1, 1j])]),
        TypeError,
        r"x_or_spectra\[0\] must hold real singular values, got an array of dtype complex128",
        id="energy-ranks-complex",
    ),
    pytest.param(
        lambda: tl.energy_ranks([np.ones((2, 2))]),
        ValueError,
        r"x_or_spectra\[0\] must be a 1-D array",
        id="energy-ranks-2d-spectrum",
    ),
    pytest.param(
        lambda: tl.energy_ranks([np.array([1.0, np.nan])]),
        ValueError,
        r"x_or_spectra\[0\] contains NaN",
        id="energy-ranks-nan-spectrum",
    ),
    pytest.param(
        lambda: tl.energy_ranks([np.array([1.0, -1.0])]),
        ValueError,
        r"non-negative",
        id="energy-ranks-negative-spectrum",
    ),
    pytest.param(
        lambda: tl.energy_ranks(np.zeros((3, 0, 2))),
        ValueError,
        r"x_or_spectra has a mode of size 0 \(shape \(3, 0, 2\)\)",
        id="energy-ranks-zero-size-mode",
    ),
    pytest.param(
        lambda: tl.energy_ranks([np.zeros(0), np.ones(2)]),
        ValueError,
        r"mode of size 0",
        id="energy-ranks-empty-spectrum",
    ),
    pytest.param(
        lambda: tl.energy_ranks(X, "0.9"),
        TypeError,
        r"energy must be a real number in \(0, 1\], got str",
        id="energy-ranks-energy-string",
    ),
    pytest.param(
        lambda: tl.energy_ranks(X, float("nan")),
        ValueError,
        r"energy must lie in \(0, 1\], got nan",
        id="energy-ranks-energy-nan",
    ),
    pytest.param(
        lambda: tl.energy_ranks(X, True),
        TypeError,
        r"energy must be a real number .*got bool",
        id="energy-ranks-energy-bool",
    ),
    # effective_rank and stable_rank
    pytest.param(
        lambda: tl.effective_rank("abc"),
        TypeError,
        r"s must be a 1-D array of singular values, got str",
        id="effective-rank-string",
    ),
    pytest.param(
        lambda: tl.effective_rank(None),
        TypeError,
        r"s must be a 1-D array of singular values, got NoneType",
        id="effective-rank-none",
    ),
    pytest.param(
        lambda: tl.effective_rank(2.0),
        TypeError,
        r"s must be a 1-D array of singular values, got float",
        id="effective-rank-float",
    ),
    pytest.param(
        lambda: tl.effective_rank({1.0, 2.0}),
        TypeError,
        r"s must be a 1-D array .*got set",
        id="effective-rank-set",
    ),
    pytest.param(
        lambda: tl.effective_rank([1, 1j]),
        TypeError,
        r"s must hold real singular values, got complex128 values",
        id="effective-rank-complex-list",
    ),
    pytest.param(
        lambda: tl.effective_rank([True, False]),
        TypeError,
        r"s must hold real singular values, got bool",
        id="effective-rank-bool",
    ),
    pytest.param(
        lambda: tl.effective_rank([1.0, None]),
        TypeError,
        r"s must hold real singular values, got object",
        id="effective-rank-none-entry",
    ),
    pytest.param(
        lambda: tl.effective_rank([[1.0], [1.0, 2.0]]),
        TypeError,
        r"s must be a 1-D array of singular values \(",
        id="effective-rank-ragged",
    ),
    pytest.param(
        lambda: tl.effective_rank(np.ones((2, 2))),
        ValueError,
        r"s must be a 1-D array of singular values, got shape \(2, 2\)",
        id="effective-rank-2d",
    ),
    pytest.param(
        lambda: tl.effective_rank(np.float64(2.0)),
        ValueError,
        r"got shape \(\)",
        id="effective-rank-0d",
    ),
    pytest.param(
        lambda: tl.effective_rank([1.0, np.inf]),
        ValueError,
        r"s contains NaN or infinity",
        id="effective-rank-inf",
    ),
    pytest.param(
        lambda: tl.stable_rank("abc"),
        TypeError,
        r"s must be a 1-D array of singular values, got str",
        id="stable-rank-string",
    ),
    pytest.param(
        lambda: tl.stable_rank(np.array([1, 1j])),
        TypeError,
        r"s must hold real singular values",
        id="stable-rank-complex",
    ),
    pytest.param(
        lambda: tl.stable_rank([-1.0]), ValueError, r"non-negative", id="stable-rank-negative"
    ),
    # ranks_for_budget
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed={0: 2, -3: 3}),
        ValueError,
        r"fixed pins mode 0 twice \(keys 0 and -3",
        id="budget-fixed-duplicate-pin",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed={3: 2}),
        ValueError,
        r"fixed mode=3 is out of range",
        id="budget-fixed-mode-out-of-range",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed={0: 9}),
        ValueError,
        r"fixed rank of mode 0 is 9, outside \[1, 4\]",
        id="budget-fixed-rank-too-big",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed={0: True}),
        TypeError,
        r"fixed rank of mode 0 must be an integer, got bool",
        id="budget-fixed-rank-bool",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed={2, 3}),
        TypeError,
        r"fixed must be a dict .*got set",
        id="budget-fixed-set",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed="2"),
        TypeError,
        r"fixed must be a dict .*got str",
        id="budget-fixed-string",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 200, fixed=[1, 2]),
        ValueError,
        r"fixed has 2 entries but the tensor has 3 modes",
        id="budget-fixed-length",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 2.5),
        TypeError,
        r"budget must be an integer number of parameters, got float",
        id="budget-float",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, True),
        TypeError,
        r"budget must be .*got bool",
        id="budget-bool",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 0),
        ValueError,
        r"budget must be >= 1, got 0",
        id="budget-zero",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(X, 10),
        ValueError,
        r"budget=10 is too small .* the minimum budget is 16",
        id="budget-too-small",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget([np.ones(10**5)] * 5, 10**12),
        ValueError,
        r"too large for the rank search",
        id="budget-shape-beyond-int64",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget([np.array([1j, 1]), np.ones(2)], 10),
        TypeError,
        r"x_or_spectra\[0\] must hold real",
        id="budget-complex-spectrum",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(np.zeros((3, 0, 2)), 100),
        ValueError,
        r"mode of size 0",
        id="budget-zero-size-mode",
    ),
    # tucker_vs_matrix
    pytest.param(
        lambda: tucker_vs_matrix(X, 100, spectra=tl.mode_spectra(OTHER)),
        ValueError,
        r"spectra\[0\] does not belong to x: .* norm of .* but \|\|x\|\|_F = .* for float64",
        id="compare-spectra-of-another-tensor",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(X, 100, spectra=[1.001 * s for s in tl.mode_spectra(X)]),
        ValueError,
        r"spectra\[0\] does not belong to x",
        id="compare-spectra-off-by-0.2-percent",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(X, 100, spectra=[np.ones(4) * 1j, np.ones(5), np.ones(6)]),
        TypeError,
        r"spectra\[0\] must hold real singular values",
        id="compare-complex-spectra",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(X, 100, spectra=np.ones((3, 4))),
        TypeError,
        r"spectra must be a list of 1-D arrays \(mode_spectra\(x\)\), got an array",
        id="compare-spectra-array",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(X, 100, spectra="abc"),
        TypeError,
        r"spectra must be a list .*got str",
        id="compare-spectra-string",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(X, 100, spectra=tl.mode_spectra(X)[:2]),
        ValueError,
        r"lengths \(4, 5, 6\); got lengths \(4, 5\)",
        id="compare-spectra-lengths",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(np.zeros((3, 0)), 100),
        ValueError,
        r"x has a mode of size 0",
        id="compare-zero-size-mode",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(X, "100"),
        TypeError,
        r"budget must be an integer",
        id="compare-budget-string",
    ),
    # the LoRA-budget rules shared with flora
    pytest.param(
        lambda: lora_budget((4,), 2),
        ValueError,
        r"shape must have at least two modes \(out, \.\.\.\), got \(4,\)",
        id="lora-budget-one-mode",
    ),
    pytest.param(
        lambda: lora_budget((4, -2), 2),
        ValueError,
        r"shape\[1\] must be >= 0, got -2",
        id="lora-budget-negative-size",
    ),
    pytest.param(
        lambda: lora_budget((4, 2.5), 2),
        TypeError,
        r"shape\[1\] must be .*got float",
        id="lora-budget-float-size",
    ),
    pytest.param(
        lambda: lora_budget((4, 2), 0),
        ValueError,
        r"lora_rank must be >= 1, got 0",
        id="lora-budget-rank-zero",
    ),
    pytest.param(
        lambda: lora_budget_ranks(SPECTRA, "bogus", 2),
        ValueError,
        r"kind must be one of linear, conv, embedding, other, got 'bogus'",
        id="lora-ranks-kind",
    ),
    pytest.param(
        lambda: lora_budget_ranks(SPECTRA, "conv", 2, kernel_rank=0),
        ValueError,
        r"kernel_rank must be >= 1, got 0",
        id="lora-ranks-kernel-rank-zero",
    ),
    pytest.param(
        lambda: lora_budget_ranks(None, "conv", 2),
        TypeError,
        r"spectra must be a sequence of 1-D spectra, one per mode, got NoneType",
        id="lora-ranks-spectra-none",
    ),
    pytest.param(
        lambda: tensor_kind(None, (2, 2)),
        TypeError,
        r"name must be a str, got NoneType",
        id="tensor-kind-name-none",
    ),
    pytest.param(
        lambda: tensor_kind("fc.weight", 4),
        TypeError,
        r"shape must be a sequence .*got int",
        id="tensor-kind-shape-int",
    ),
    pytest.param(
        lambda: tl.mode_spectra(_unknown_chunks()),
        ValueError,
        r"chunks of unknown size \(NaN\).*call its compute_chunk_sizes\(\) method",
        id="mode-spectra-dask-unknown-chunks",
    ),
    pytest.param(
        lambda: tl.energy_ranks(_unknown_chunks()),
        ValueError,
        r"chunks of unknown size \(NaN\).*call its compute_chunk_sizes\(\) method",
        id="energy-ranks-dask-unknown-chunks",
    ),
    pytest.param(
        lambda: tl.ranks_for_budget(_unknown_chunks(), 20),
        ValueError,
        r"chunks of unknown size \(NaN\).*call its compute_chunk_sizes\(\) method",
        id="ranks-for-budget-dask-unknown-chunks",
    ),
    pytest.param(
        lambda: tucker_vs_matrix(_unknown_chunks(), 20),
        ValueError,
        r"chunks of unknown size \(NaN\).*call its compute_chunk_sizes\(\) method",
        id="tucker-vs-matrix-dask-unknown-chunks",
    ),
]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(("call", "error", "match"), CASES)
def test_bad_input_gets_a_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


BACKEND_CASES = [
    pytest.param(
        lambda b: tl.effective_rank(b.asarray(np.array([1, 1j]))),
        TypeError,
        r"s must hold real singular values, got an array of dtype",
        id="effective-rank-complex",
    ),
    pytest.param(
        lambda b: tl.stable_rank(b.asarray(np.array([True, False]))),
        TypeError,
        r"s must hold real singular values",
        id="stable-rank-bool",
    ),
    pytest.param(
        lambda b: tl.energy_ranks([b.asarray(np.array([1, 1j]))]),
        TypeError,
        r"x_or_spectra\[0\] must hold real",
        id="energy-ranks-complex",
    ),
    pytest.param(
        lambda b: tl.energy_ranks(b.asarray(np.zeros((3, 0, 2)))),
        ValueError,
        r"mode of size 0",
        id="energy-ranks-zero-size-mode",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget(b.asarray(X), 200, fixed={-1: 2, 2: 2}),
        ValueError,
        r"fixed pins mode 2 twice",
        id="budget-fixed-duplicate-pin",
    ),
    pytest.param(
        lambda b: tucker_vs_matrix(b.asarray(X), 100, spectra=tl.mode_spectra(b.asarray(OTHER))),
        ValueError,
        r"spectra\[0\] does not belong to x",
        id="compare-spectra-of-another-tensor",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BACKEND_CASES)
def test_bad_input_gets_a_clear_error_on_every_backend(backend, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(backend)


def _scaled(factor: float) -> list[np.ndarray]:
    return [factor * s for s in SPECTRA]


RESULTS = [
    # One-shot iterables are read once, as spectra.
    pytest.param(
        lambda b: tl.energy_ranks(s for s in tl.mode_spectra(b.asarray(X))),
        lambda b: tl.energy_ranks(tl.mode_spectra(b.asarray(X))),
        id="energy-ranks-generator",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget((s for s in tl.mode_spectra(b.asarray(X))), 100),
        lambda b: tl.ranks_for_budget(b.asarray(X), 100),
        id="budget-generator-of-spectra",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget(b.asarray(X), 100, fixed=iter([2, None, None])),
        lambda b: tl.ranks_for_budget(b.asarray(X), 100, fixed={0: 2}),
        id="budget-generator-fixed",
    ),
    pytest.param(
        lambda b: tl.effective_rank(float(v) for v in [1.0, 1.0]),
        lambda b: 2.0,
        id="effective-rank-generator",
    ),
    # Spectra near the ends of the float64 range: scaled before squaring.
    pytest.param(
        lambda b: tl.effective_rank(b.asarray(np.array([1e308, 1e308]))),
        lambda b: 2.0,
        id="effective-rank-near-max",
    ),
    pytest.param(
        lambda b: tl.stable_rank(b.asarray(np.array([1e308, 1e308]))),
        lambda b: 2.0,
        id="stable-rank-near-max",
    ),
    pytest.param(
        lambda b: tl.effective_rank(b.asarray(np.array([5e-324, 5e-324]))),
        lambda b: 2.0,
        id="effective-rank-subnormal",
    ),
    pytest.param(
        lambda b: tl.energy_ranks([b.asarray(np.array([1e200, 1e199, 1e198]))], 0.999),
        lambda b: (2,),
        id="energy-ranks-huge",
    ),
    pytest.param(
        lambda b: tl.energy_ranks([b.asarray(np.array([1e-200, 1e-201, 1e-202]))], 0.999),
        lambda b: (2,),
        id="energy-ranks-tiny",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget([b.asarray(s) for s in _scaled(1e200)], 40),
        lambda b: tl.ranks_for_budget(SPECTRA, 40),
        id="budget-huge-spectra",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget([b.asarray(s) for s in _scaled(1e-200)], 40),
        lambda b: tl.ranks_for_budget(SPECTRA, 40),
        id="budget-tiny-spectra",
    ),
    # A budget above full ranks allows full ranks, however large.
    pytest.param(
        lambda b: tl.ranks_for_budget(b.asarray(X), 10**30),
        lambda b: X.shape,
        id="budget-above-full-ranks",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget(b.asarray(X[0]), 10**30),
        lambda b: (5, 5),
        id="budget-above-full-ranks-matrix",
    ),
    pytest.param(
        lambda b: tucker_vs_matrix(b.asarray(X), 10**30)["tucker_ranks"],
        lambda b: X.shape,
        id="compare-budget-above-full-ranks",
    ),
    pytest.param(
        lambda b: tl.ranks_for_budget(b.asarray(X), np.int64(200)),
        lambda b: tl.ranks_for_budget(X, 200),
        id="budget-numpy-integer",
    ),
]


@pytest.mark.parametrize(("call", "expected"), RESULTS)
def test_formerly_silent_cases_give_the_right_result(backend, call, expected) -> None:
    actual, wanted = call(backend), expected(backend)
    if isinstance(wanted, float):
        assert actual == pytest.approx(wanted, rel=1e-12)
    else:
        assert tuple(actual) == tuple(wanted)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tucker_vs_matrix_accepts_the_spectra_of_x(backend, dtype) -> None:
    x = backend.asarray(X.astype(dtype))
    given = tucker_vs_matrix(x, 100, spectra=tl.mode_spectra(x))
    computed = tucker_vs_matrix(x, 100)
    assert given["tucker_ranks"] == computed["tucker_ranks"]
    assert given["matrix_error"] == pytest.approx(computed["matrix_error"], rel=1e-3)


def test_tucker_vs_matrix_reports_the_truth_not_foreign_spectra() -> None:
    # The case that reported 0.0: spectra of a rank-1 tensor for a random x.
    rank_one = np.einsum("i,j,k->ijk", np.ones(4), np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="does not belong to x"):
        tucker_vs_matrix(X, 100, spectra=tl.mode_spectra(rank_one))
    assert tucker_vs_matrix(X, 100)["matrix_error"] > 0.5


def test_half_precision_spectra_are_read() -> None:
    torch = pytest.importorskip("torch")
    assert tl.effective_rank(torch.ones(3, dtype=torch.bfloat16)) == pytest.approx(3.0)
    assert tl.stable_rank(torch.ones(3, dtype=torch.float16)) == pytest.approx(3.0)


def test_effective_rank_of_a_huge_flat_spectrum_is_its_length() -> None:
    assert math.isclose(tl.effective_rank(np.full(7, 1e300)), 7.0, rel_tol=1e-12)
