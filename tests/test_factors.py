import numpy as np
import pytest
from conftest import DASK_KERNELS, JAX_KERNELS

from tuckerlib import sthosvd, unfold
from tuckerlib._layout import inverse, memory_order
from tuckerlib._namespace import get_namespace
from tuckerlib.decompositions._factors import (
    Truncation,
    choose_method,
    fibre_matrix,
    mode_factor,
    unfibre,
)
from tuckerlib.decompositions._linalg import left_singular, sign_fix
from tuckerlib.decompositions._prepare import check_method

pytestmark = [
    pytest.mark.skip_backend("jax", reason=JAX_KERNELS),
    pytest.mark.skip_backend("dask", reason=DASK_KERNELS),
]


def _xp(backend):
    return get_namespace(backend.asarray(np.zeros(1)))


LAYOUTS = [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]


@pytest.mark.parametrize("axes", LAYOUTS)
def test_unfibre_inverts_fibre_matrix_in_any_layout(backend, axes):
    """``x`` stored with its axes ``axes`` outermost first, as a transposed view."""
    stored = np.random.default_rng(4).standard_normal(tuple((3, 4, 5, 2)[k] for k in axes))
    xp = _xp(backend)
    x = xp.permute_dims(backend.asarray(stored), inverse(axes))
    order = memory_order(x)
    assert order == (axes if backend.name != "array_api_strict" else (0, 1, 2, 3))
    for mode in range(4):
        a = fibre_matrix(xp, x, mode, order)
        back = unfibre(xp, a, mode, x.shape, order)
        backend.assert_close(back, backend.to_numpy(x), factor=1)
        if mode in (order[0], order[-1]):
            assert memory_order(back) == order


@pytest.mark.parametrize("axes", LAYOUTS[1:])
def test_fibre_matrix_of_outer_and_inner_modes_is_a_view(axes):
    x = np.zeros(tuple((3, 4, 5, 2)[k] for k in axes)).transpose(inverse(axes))
    for mode in (axes[0], axes[-1]):
        assert np.shares_memory(fibre_matrix(np, x, mode), x)


def test_sign_fix_makes_largest_entry_positive(backend):
    u = np.array([[0.1, -0.9, 0.5], [-0.8, 0.2, -0.6], [0.3, 0.1, 0.2]])
    fixed = backend.to_numpy(sign_fix(_xp(backend), backend.asarray(u)))
    expected = u * np.array([-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(fixed, expected)
    pivots = fixed[np.argmax(np.abs(fixed), axis=0), np.arange(3)]
    assert np.all(pivots > 0)


def test_fibre_matrix_has_the_singular_values_of_the_unfolding(backend):
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 2))
    for mode in range(4):
        a = backend.to_numpy(fibre_matrix(_xp(backend), backend.asarray(x), mode))
        assert a.shape == unfold(x, mode).shape
        np.testing.assert_allclose(
            np.linalg.svd(a, compute_uv=False), np.linalg.svd(unfold(x, mode), compute_uv=False)
        )


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_left_singular_matches_numpy(backend, method):
    a = np.random.default_rng(1).standard_normal((5, 9))
    u, s = left_singular(_xp(backend), backend.asarray(a), method)
    u, s = backend.to_numpy(u), backend.to_numpy(s)
    reference_u, reference_s, _ = np.linalg.svd(a)
    np.testing.assert_allclose(s, reference_s, rtol=1e-10)
    np.testing.assert_allclose(np.abs(u.T @ reference_u), np.eye(5), atol=1e-10)


def test_tall_matrix_gets_full_basis_when_rank_exceeds_columns(backend):
    a = np.random.default_rng(2).standard_normal((6, 2))
    u, s = left_singular(_xp(backend), backend.asarray(a), "svd", rank=4)
    u, s = backend.to_numpy(u), backend.to_numpy(s)
    assert u.shape == (6, 6)
    assert s.shape == (6,)
    np.testing.assert_allclose(s[2:], 0.0)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-12)


def test_auto_rule():
    eps = np.finfo(np.float64).eps
    assert choose_method("auto", 10, 3000, eps, None) == "gram"
    assert choose_method("auto", 3000, 10, eps, None) == "gram"
    # A tolerance near the Gram's rounding level needs the SVD (fraction = tol² / N).
    assert choose_method("auto", 100, 3000, eps, 1e-14 / 3) == "svd"
    assert choose_method("auto", 100, 3000, eps, 1e-6 / 3) == "gram"
    assert choose_method("svd", 10, 3000, eps, None) == "svd"
    assert choose_method("randomized", 10, 3000, eps, None) == "randomized"


@pytest.mark.parametrize("shape", [(40, 6), (6, 40)])
def test_gram_uses_the_small_side(backend, shape, monkeypatch):
    a = np.random.default_rng(5).standard_normal(shape)
    xp = _xp(backend)
    sizes = []
    eigh = xp.linalg.eigh

    def recording_eigh(g):
        sizes.append(tuple(g.shape))
        return eigh(g)

    monkeypatch.setattr(xp.linalg, "eigh", recording_eigh)
    step = mode_factor(xp, backend.asarray(a), "gram", Truncation(rank=4))
    assert sizes == [(6, 6)]
    u, spectrum = backend.to_numpy(step.factor), backend.to_numpy(step.spectrum)
    reference_u, reference_s, _ = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(spectrum[:6], reference_s, rtol=1e-10)
    np.testing.assert_allclose(np.abs(u.T @ reference_u[:, :4]), np.eye(4), atol=1e-8)
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(4)] > 0)


def test_tall_gram_with_deficient_rank_is_orthonormal(backend):
    a = np.zeros((30, 5))
    a[:, 0] = 1.0
    step = mode_factor(_xp(backend), backend.asarray(a), "gram", Truncation(rank=3))
    u = backend.to_numpy(step.factor)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.abs(u[:, 0]), np.full(30, 30**-0.5))


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        check_method("eig")


def test_scipy_subset_path_matches_full_solver(monkeypatch):
    from tuckerlib.decompositions import _factors

    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 30, 20)) + 5 * np.einsum(
        "i,j,k->ijk", *[rng.standard_normal(n) for n in (40, 30, 20)]
    )
    reference = sthosvd(x, (4, 3, 2))
    monkeypatch.setattr(_factors, "SUBSET_MIN_SIZE", 16)
    assert _factors._use_subset(get_namespace(x), 40, 4)
    tucker = sthosvd(x, (4, 3, 2))
    np.testing.assert_allclose(tucker.core, reference.core, atol=1e-9)
    for factor, expected in zip(tucker.factors, reference.factors, strict=True):
        np.testing.assert_allclose(factor, expected, atol=1e-9)
    step = _factors.mode_factor(get_namespace(x), x.reshape(40, -1), "gram", Truncation(rank=4))
    spectrum = step.spectrum
    s = np.linalg.svd(x.reshape(40, -1), compute_uv=False)
    np.testing.assert_allclose(spectrum[:4], s[:4], rtol=1e-10)
    np.testing.assert_allclose(spectrum[4] ** 2, np.sum(s[4:] ** 2), rtol=1e-8)
