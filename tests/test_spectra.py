import numpy as np
import pytest
from conftest import JAX_PER_SHAPE
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import effective_rank, energy_ranks, mode_spectra, stable_rank, unfold

pytestmark = pytest.mark.skip_backend("jax", reason=JAX_PER_SHAPE)


def reference_spectra(x):
    spectra = []
    for n in range(x.ndim):
        s = np.linalg.svd(unfold(x, n), compute_uv=False)
        spectra.append(np.concatenate([s, np.zeros(x.shape[n] - len(s))]))
    return spectra


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (3, 4, 5), (10, 2, 2), (2, 3, 2, 3)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_matches_svd_of_every_unfolding(backend, shape, method):
    x = np.random.default_rng(0).standard_normal(shape)
    spectra = mode_spectra(backend.asarray(x), method=method)
    assert [s.shape[0] for s in spectra] == list(shape)
    for s, expected in zip(spectra, reference_spectra(x), strict=True):
        # Zero singular values come out of a Gram matrix as sqrt(rounding).
        np.testing.assert_allclose(backend.to_numpy(s), expected, rtol=1e-10, atol=1e-7)


@pytest.mark.parametrize("axes", [(2, 0, 3, 1), (3, 2, 1, 0)])
def test_transposed_layouts_match_svd(axes):
    stored = np.random.default_rng(2).standard_normal((6, 3, 4, 5))
    x = stored.transpose(np.argsort(axes))
    for s, expected in zip(mode_spectra(x), reference_spectra(x), strict=True):
        np.testing.assert_allclose(s, expected, rtol=1e-10, atol=1e-7)


def test_float32_and_integer_inputs(backend):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    assert all(backend.to_numpy(s).dtype == np.float32 for s in mode_spectra(backend.asarray(x)))
    spectra = mode_spectra(backend.asarray(np.arange(12).reshape(3, 4)))
    assert np.all(np.isfinite(backend.to_numpy(spectra[0])))


def test_zero_tensor_has_zero_spectra(backend):
    for s in mode_spectra(backend.asarray(np.zeros((3, 4, 2)))):
        assert np.all(backend.to_numpy(s) == 0.0)


def test_bad_method():
    with pytest.raises(ValueError, match='method must be "gram" or "svd"'):
        mode_spectra(np.ones((2, 2)), method="eig")


def test_energy_ranks_known_values():
    spectra = [np.array([3.0, 2.0, 1.0]), np.array([1.0, 0.0]), np.zeros(4)]
    assert energy_ranks(spectra, 0.5) == (1, 1, 1)
    assert energy_ranks(spectra, 0.9) == (2, 1, 1)
    assert energy_ranks(spectra, 1.0) == (3, 1, 1)
    # 9 / 14 of the energy sits in the first value: exactly that fraction needs rank 1.
    assert energy_ranks(spectra, 9 / 14) == (1, 1, 1)


def test_energy_ranks_of_tensor_and_backends(backend):
    x = np.zeros((4, 5, 6))
    x[0, 0, 0], x[1, 1, 1], x[2, 2, 2] = 10.0, 1.0, 0.1
    # Energies 100, 1 and 0.01 of 101.01.
    assert energy_ranks(backend.asarray(x), 0.99) == (1, 1, 1)
    assert energy_ranks(backend.asarray(x), 0.995) == (2, 2, 2)
    assert energy_ranks(mode_spectra(backend.asarray(x)), 0.99999) == (3, 3, 3)


@given(
    values=st.lists(st.floats(0.0, 1e3), min_size=1, max_size=8),
    low=st.floats(0.01, 1.0),
    high=st.floats(0.01, 1.0),
)
def test_energy_ranks_monotone(values, low, high):
    low, high = min(low, high), max(low, high)
    s = np.sort(np.array(values))[::-1]
    assert energy_ranks([s], low) <= energy_ranks([s], high)
    kept = np.cumsum(s**2)
    (r,) = energy_ranks([s], high)
    assert 1 <= r <= len(s)
    assert kept[r - 1] >= high * kept[-1] * (1 - 1e-12)


def test_effective_and_stable_rank_known_values(backend):
    flat = backend.asarray(np.ones(5))
    assert effective_rank(flat) == pytest.approx(5.0)
    assert stable_rank(flat) == pytest.approx(5.0)
    # Roy & Vetterli: one nonzero value has effective rank 1.
    assert effective_rank([7.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([3.0, 1.0]) == pytest.approx(
        np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    )
    assert stable_rank([2.0, 1.0, 1.0]) == pytest.approx(1.5)
    assert effective_rank(np.zeros(3)) == 0.0
    assert stable_rank(np.zeros(3)) == 0.0
    assert isinstance(effective_rank([1.0]), float)


@given(values=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=10))
def test_rank_measures_bounded(values):
    s = np.array(values)
    nonzero = int(np.count_nonzero(s))
    for measure in (effective_rank(s), stable_rank(s)):
        assert np.isfinite(measure)
        if nonzero:
            assert 1.0 - 1e-9 <= measure <= nonzero + 1e-9
        else:
            assert measure == 0.0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: energy_ranks([np.ones(3)], 0.0), ValueError, r"energy must lie in \(0, 1\]"),
        (lambda: energy_ranks([np.ones(3)], 1.5), ValueError, r"energy must lie in \(0, 1\]"),
        (lambda: energy_ranks([np.ones(3)], "high"), TypeError, "energy must be a real number"),
        (lambda: energy_ranks([np.ones((2, 2))]), ValueError, "must be a 1-D array"),
        (lambda: energy_ranks([]), ValueError, "empty list"),
        (lambda: energy_ranks(np.full((2, 2), np.nan)), ValueError, "NaN or infinity"),
        (lambda: effective_rank([1.0, -1.0]), ValueError, "non-negative"),
        (lambda: stable_rank([1.0, np.inf]), ValueError, "NaN or infinity"),
        (lambda: stable_rank(np.ones((2, 2))), ValueError, "must be a 1-D array"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_middle_mode_gram_in_blocks(monkeypatch):
    # 700-byte blocks split both middle unfoldings unevenly (mode 1: slabs
    # of 2 + 1 of the 3 leading indices; mode 2: 8 + 4 of 12); the spectra
    # must not depend on the blocking.
    monkeypatch.setattr("tuckerlib.decompositions._spectra.GRAM_BLOCK_BYTES", 700)
    x = np.random.default_rng(3).standard_normal((3, 4, 5, 2))
    for s, expected in zip(mode_spectra(x), reference_spectra(x), strict=True):
        np.testing.assert_allclose(s, expected, rtol=1e-10, atol=1e-7)


def test_float32_spectra_of_a_wide_and_a_tall_matrix():
    x = np.random.default_rng(4).standard_normal((30, 70)).astype(np.float32)
    expected = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    for matrix in (x, x.T):
        spectra = mode_spectra(matrix)
        assert all(s.dtype == np.float32 for s in spectra)
        largest = spectra[0] if matrix is x else spectra[1]
        np.testing.assert_allclose(largest[:30], expected, rtol=1e-4)


def test_gram_noise_of_zero_singular_values_stays_at_rounding_level():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((40, 6)) @ rng.standard_normal((6, 90))).astype(np.float32)
    expected = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    eps = np.finfo(np.float32).eps
    for s in mode_spectra(x):
        assert s.dtype == np.float32
        assert np.all(s >= 0.0)
        np.testing.assert_allclose(s[:6], expected[:6], rtol=1e-4)
        # Energies are accurate to about eps * sigma_max^2 per value.
        tail_energy = float(np.sum(s[6:].astype(np.float64) ** 2))
        assert tail_energy <= 10 * s.shape[0] * eps * float(expected[0]) ** 2
