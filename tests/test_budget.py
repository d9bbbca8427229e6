import itertools
import math

import numpy as np
import pytest
from conftest import JAX_PER_SHAPE
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import (
    mode_spectra,
    ranks_for_budget,
    relative_error,
    sthosvd,
    tucker_params,
    tucker_vs_matrix,
    unfold,
)
from tuckerlib.analysis._budget import solve_budget
from tuckerlib.analysis._inputs import host_spectra

pytestmark = pytest.mark.skip_backend("jax", reason=JAX_PER_SHAPE)


def kept_energy(spectra, ranks):
    """The objective: the product of the energy fractions each mode keeps."""
    fractions = [
        float(np.sum(s[:r] ** 2) / np.sum(s**2)) if np.any(s) else 1.0
        for s, r in zip(spectra, ranks, strict=True)
    ]
    return float(np.prod(fractions))


def usable(ranks):
    """No rank above the product of the others: a Tucker tensor can use every rank."""
    return all(r * r <= math.prod(ranks) for r in ranks)


def exhaustive(spectra, budget, fixed=None):
    """Best objective over usable ranks within the budget (over all ranks if none is usable)."""
    shape = tuple(len(s) for s in spectra)
    fixed = fixed or (None,) * len(shape)
    choices = [range(1, i + 1) if f is None else [f] for i, f in zip(shape, fixed, strict=True)]
    within = [r for r in itertools.product(*choices) if tucker_params(shape, r) <= budget]
    candidates = [r for r in within if usable(r)] or within
    return max(kept_energy(spectra, ranks) for ranks in candidates)


small_case = st.tuples(
    st.lists(st.integers(2, 6), min_size=3, max_size=4).map(tuple),
    st.integers(0, 2**16),
    st.floats(0.0, 1.0),
)


def draw(shape, seed, where):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(-3 * rng.random(shape))
    low, high = tucker_params(shape, 1), tucker_params(shape, None)
    return x, int(low + where * (high - low))


@given(case=small_case)
def test_within_one_percent_of_exhaustive_and_within_budget(case):
    x, budget = draw(*case)
    spectra = host_spectra(x)
    ranks = ranks_for_budget(x, budget)
    assert tucker_params(x.shape, ranks) <= budget
    assert kept_energy(spectra, ranks) >= 0.99 * exhaustive(spectra, budget)


@given(case=small_case)
def test_ranks_are_usable_when_the_budget_allows(case):
    """Every rank at most the product of the others, when rank 1 everywhere fits."""
    x, budget = draw(*case)
    assert usable(ranks_for_budget(x, budget))
    assert usable(solve_budget(host_spectra(x), budget, limit=4))


def test_usable_ranks_spend_the_budget_elsewhere():
    x = np.random.default_rng(3).standard_normal((16, 16, 3, 3))
    # Kernel ranks 1 leave each channel rank capped by the other: (2, 1, 1, 1)
    # would pay for a second mode-0 column that no core entry can reach.
    assert ranks_for_budget(x, 60, fixed={2: 1, 3: 1}) == (1, 1, 1, 1)
    ranks = ranks_for_budget(x, 600, fixed={2: 1, 3: 1})
    assert ranks[0] == ranks[1]
    assert tucker_params(x.shape, ranks) <= 600
    # A pin that no usable choice within the budget can honour is kept as given.
    assert ranks_for_budget(x, 60, fixed={0: 2, 2: 1, 3: 1}) == (2, 1, 1, 1)


@given(case=small_case)
def test_thinned_search_for_large_grids(case):
    """The path for grids above the exhaustive limit, forced on small shapes."""
    x, budget = draw(*case)
    spectra = host_spectra(x)
    ranks = solve_budget(spectra, budget, limit=4)
    assert tucker_params(x.shape, ranks) <= budget
    assert kept_energy(spectra, ranks) >= 0.95 * exhaustive(spectra, budget)


def test_fixed_modes_dict_and_sequence():
    x = np.random.default_rng(0).standard_normal((6, 5, 3))
    spectra = host_spectra(x)
    for fixed in ({2: 2}, {-1: 2}, (None, None, 2)):
        ranks = ranks_for_budget(x, 60, fixed=fixed)
        assert ranks[2] == 2
        assert tucker_params(x.shape, ranks) <= 60
        assert kept_energy(spectra, ranks) >= 0.99 * exhaustive(spectra, 60, (None, None, 2))
    assert ranks_for_budget(x, 10**6, fixed=(1, 2, 3)) == (1, 2, 3)


def test_accepts_spectra_and_backends(backend):
    x = np.random.default_rng(1).standard_normal((6, 5, 4))
    expected = ranks_for_budget(x, 80)
    assert ranks_for_budget(backend.asarray(x), 80) == expected
    assert ranks_for_budget(mode_spectra(backend.asarray(x)), 80) == expected


def test_matrix_rule():
    x = np.random.default_rng(2).standard_normal((10, 30))
    # r² + 40 r <= 200 holds up to r = 4.
    assert ranks_for_budget(x, 200) == (4, 4)
    assert ranks_for_budget(x, 200, fixed={0: 2}) == (2, 2)
    # 3 R_0 + 30 · 3 + 10 R_0 <= 200 allows R_0 = 8, but above 3 it is wasted.
    assert ranks_for_budget(x, 200, fixed={1: 3}) == (3, 3)
    with pytest.raises(ValueError, match="the minimum budget is 289"):
        ranks_for_budget(x, 200, fixed={1: 9})


def test_zero_tensor_gets_rank_one():
    assert ranks_for_budget(np.zeros((4, 5, 6)), 1000) == (1, 1, 1)
    assert ranks_for_budget(np.zeros((4, 5)), 1000) == (1, 1)


def test_large_shapes_are_fast():
    rng = np.random.default_rng(3)
    spectra = [np.sort(rng.random(4096))[::-1], np.sort(rng.random(11008))[::-1]]
    spectra[1][4096:] = 0.0
    ranks = ranks_for_budget(spectra, 16 * (4096 + 11008))
    assert ranks[0] == ranks[1]
    conv = [np.sort(rng.random(n))[::-1] for n in (256, 256, 3, 3)]
    ranks = ranks_for_budget(conv, 40000, fixed={2: 3, 3: 3})
    assert ranks[2:] == (3, 3)
    assert tucker_params((256, 256, 3, 3), ranks) <= 40000


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 10}, ValueError, "the minimum budget is 16"),
        ({"budget": 40, "fixed": {2: 5}}, ValueError, "the minimum budget is 48"),
        ({"budget": 0}, ValueError, "budget must be >= 1"),
        ({"budget": 10.0}, TypeError, "budget must be an integer"),
        ({"budget": 100, "fixed": {3: 1}}, ValueError, "out of range"),
        ({"budget": 100, "fixed": {0: 7}}, ValueError, r"outside \[1, 3\]"),
        ({"budget": 100, "fixed": (1, 1)}, ValueError, "has 2 entries"),
        ({"budget": 100, "fixed": 3}, TypeError, "fixed must be a dict"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        ranks_for_budget(np.ones((3, 5, 7)), **kwargs)


def test_tucker_vs_matrix_on_tensor(backend):
    x = np.random.default_rng(4).standard_normal((8, 7, 6))
    result = tucker_vs_matrix(backend.asarray(x), 200)
    assert set(result) == {"tucker_error", "tucker_ranks", "matrix_error", "matrix_rank", "budget"}
    assert result["budget"] == 200
    assert result["tucker_ranks"] == ranks_for_budget(x, 200)
    assert tucker_params(x.shape, result["tucker_ranks"]) <= 200
    expected = relative_error(x, sthosvd(x, result["tucker_ranks"]))
    assert result["tucker_error"] == pytest.approx(expected, rel=1e-8)
    assert result["matrix_rank"] == 200 // (8 + 42)
    s = np.linalg.svd(unfold(x, 0), compute_uv=False)
    r = result["matrix_rank"]
    assert result["matrix_error"] == pytest.approx(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))
    assert all(isinstance(result[k], float) for k in ("tucker_error", "matrix_error"))


def test_tucker_vs_matrix_on_matrix():
    x = np.random.default_rng(5).standard_normal((12, 20))
    s = np.linalg.svd(x, compute_uv=False)
    result = tucker_vs_matrix(x, 200)
    r = result["tucker_ranks"][0]
    assert result["tucker_ranks"] == (r, r)
    assert result["matrix_rank"] == 200 // 32
    assert result["tucker_error"] == pytest.approx(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))
    assert result["matrix_error"] <= result["tucker_error"]


def test_tucker_vs_matrix_edge_cases():
    tiny = tucker_vs_matrix(np.ones((3, 4, 5)), 13)
    assert tiny["matrix_rank"] == 0
    assert tiny["matrix_error"] == 1.0
    zero = tucker_vs_matrix(np.zeros((3, 4, 5)), 100)
    assert zero["tucker_error"] == 0.0
    assert zero["matrix_error"] == 0.0
    with pytest.raises(ValueError, match="at least 2 modes"):
        tucker_vs_matrix(np.ones(4), 100)
    with pytest.raises(ValueError, match="minimum budget is 13"):
        tucker_vs_matrix(np.ones((3, 4, 5)), 12)


@pytest.mark.parametrize("shape", [(8, 7, 6), (12, 20), (20, 12)])
def test_tucker_vs_matrix_with_spectra_matches_without(backend, shape):
    x = backend.asarray(np.random.default_rng(6).standard_normal(shape))
    budget = 150
    expected = tucker_vs_matrix(x, budget)
    result = tucker_vs_matrix(x, budget, spectra=mode_spectra(x))
    assert result["tucker_ranks"] == expected["tucker_ranks"]
    assert result["matrix_rank"] == expected["matrix_rank"]
    assert result["budget"] == budget
    for key in ("tucker_error", "matrix_error"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12)


def test_tucker_vs_matrix_uses_the_given_spectra():
    # Flat spectra with the energy of x (all that is checked) decide the
    # matrix error: proof that nothing is recomputed from x for a matrix.
    x = np.random.default_rng(7).standard_normal((6, 9))
    norm = np.linalg.norm(x)
    flat = [np.full(6, norm / np.sqrt(6)), np.full(9, norm / np.sqrt(9))]
    result = tucker_vs_matrix(x, 45, spectra=flat)
    assert result["matrix_rank"] == 3
    assert result["matrix_error"] == pytest.approx(np.sqrt(3 / 6))


@pytest.mark.parametrize(
    ("spectra", "error", "match"),
    [
        ([np.ones(3), np.ones(4)], ValueError, r"lengths \(3, 4, 5\); got lengths \(3, 4\)"),
        ([np.ones(3), np.ones(5), np.ones(4)], ValueError, r"got lengths \(3, 5, 4\)"),
        ([np.ones(3), np.ones(4), -np.ones(5)], ValueError, "non-negative"),
        (np.ones((3, 4)), TypeError, "spectra must be a list"),
    ],
)
def test_tucker_vs_matrix_bad_spectra(spectra, error, match):
    with pytest.raises(error, match=match):
        tucker_vs_matrix(np.ones((3, 4, 5)), 100, spectra=spectra)
