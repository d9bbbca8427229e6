"""The randomized factor of one unfolding: Khatri-Rao test matrix, power iterations, Nyström."""

import numpy as np
import pytest
from conftest import DASK_KERNELS, JAX_KERNELS
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import TuckerTensor, relative_error, rhosvd
from tuckerlib._layout import memory_order
from tuckerlib._namespace import get_namespace
from tuckerlib.decompositions._factors import fibre_columns, fibre_matrix
from tuckerlib.decompositions._sketch import (
    Sketch,
    _nystrom_factor,
    gaussian_khatri_rao,
    randomized_factor,
)

pytestmark = [
    pytest.mark.skip_backend("jax", reason=JAX_KERNELS),
    pytest.mark.skip_backend("dask", reason=DASK_KERNELS),
]


def _xp(backend):
    return get_namespace(backend.asarray(np.zeros(1)))


def _low_rank(rows, cols, rank, seed, decay=1.0):
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, rank)))[0]
    return (left * decay ** np.arange(rank)) @ right.T


def test_test_matrix_is_a_khatri_rao_product(backend):
    like = backend.asarray(np.zeros((2, 2)))
    columns = ((0, 4), (1, 5), (2, 6))
    omega = gaussian_khatri_rao(_xp(backend), np.random.default_rng(3), columns, 7, like)
    omega = backend.to_numpy(omega)
    rng = np.random.default_rng(3)
    g = [rng.standard_normal((size, 7)) for size in (4, 5, 6)]
    expected = np.stack([np.kron(np.kron(g[0][:, k], g[1][:, k]), g[2][:, k]) for k in range(7)], 1)
    np.testing.assert_allclose(omega, expected, rtol=1e-14)


def test_test_matrix_rows_follow_the_column_order_not_the_draws():
    like = np.zeros((2, 2))
    forward = gaussian_khatri_rao(np, np.random.default_rng(1), ((0, 3), (2, 4)), 5, like)
    backward = gaussian_khatri_rao(np, np.random.default_rng(1), ((2, 4), (0, 3)), 5, like)
    np.testing.assert_array_equal(
        forward.reshape(3, 4, 5), backward.reshape(4, 3, 5).swapaxes(0, 1)
    )


def test_test_matrix_float32_draws_float32(backend):
    like = backend.asarray(np.zeros((2, 2), dtype=np.float32))
    omega = gaussian_khatri_rao(_xp(backend), np.random.default_rng(0), ((0, 30),), 4, like)
    expected = np.random.default_rng(0).standard_normal((30, 4), dtype=np.float32)
    np.testing.assert_array_equal(backend.to_numpy(omega), expected)


@pytest.mark.parametrize("axes", [(0, 1, 2, 3), (3, 1, 0, 2)])
def test_fibre_columns_follow_fibre_matrix_order(axes):
    stored = np.arange(120).reshape(tuple((2, 3, 4, 5)[k] for k in axes))
    x = stored.transpose(np.argsort(axes))
    order = memory_order(x)
    for mode in range(4):
        a = fibre_matrix(np, x, mode, order)
        others = [k for k in order if k != mode]
        # Column j is the fibre at the C-order index j over the other modes, in ``order``.
        columns = fibre_columns(x.shape, mode, order)
        assert [k for k, _ in columns] == others
        index = np.unravel_index(np.arange(a.shape[1]), [size for _, size in columns])
        full = [slice(None)] * 4
        for k, position in zip(others, index, strict=True):
            full[k] = position
        fibres = np.moveaxis(x, mode, -1)[tuple(full[k] for k in range(4) if k != mode)]
        np.testing.assert_array_equal(a, fibres.T)


@pytest.mark.parametrize("power_iter", [0, 1, 2])
def test_planted_range_found_exactly(backend, power_iter):
    a = _low_rank(40, 60, 3, seed=1)
    sketch = Sketch(oversample=4, power_iter=power_iter, rng=np.random.default_rng(7))
    u, projected = randomized_factor(_xp(backend), backend.asarray(a), 3, sketch, ((1, 6), (2, 10)))
    u, projected = backend.to_numpy(u), backend.to_numpy(projected)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(3)] > 0)
    np.testing.assert_allclose(projected, u.T @ a, atol=1e-10)
    np.testing.assert_allclose(u @ projected, a, atol=1e-10)


def test_same_seed_same_factor(backend):
    a = backend.asarray(_low_rank(30, 50, 8, seed=2, decay=0.5))

    def run():
        sketch = Sketch(oversample=3, power_iter=1, rng=np.random.default_rng(11))
        return backend.to_numpy(randomized_factor(_xp(backend), a, 4, sketch, ((1, 50),))[0])

    np.testing.assert_array_equal(run(), run())


@given(seed=st.integers(0, 2**16), wide=st.booleans())
def test_nystrom_factor_matches_its_definition(backend, seed, wide):
    """``u``: top left singular vectors of ``a P_Z`` (``Z = aᵀ q``); projection ``uᵀ a P_Z``."""
    rng = np.random.default_rng(seed)
    shape = (12, 30) if wide else (30, 12)
    a = _low_rank(*shape, 12, seed, decay=0.6) + 1e-3 * rng.standard_normal(shape)
    q = np.linalg.qr(rng.standard_normal((shape[0], 6)))[0]
    u, projected = _nystrom_factor(_xp(backend), backend.asarray(a), backend.asarray(q), 3)
    basis = np.linalg.qr(a.T @ q)[0]
    approx = a @ basis @ basis.T
    left, s, _ = np.linalg.svd(approx)
    assert s[2] > 1.01 * s[3]  # a well-separated leading subspace
    u = backend.to_numpy(u)
    np.testing.assert_allclose(u @ u.T, left[:, :3] @ left[:, :3].T, atol=1e-8)
    np.testing.assert_allclose(backend.to_numpy(projected), u.T @ approx, atol=1e-8)


def test_nystrom_factor_of_rank_deficient_and_zero_sketch(backend):
    xp = _xp(backend)
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((20, 6)))[0]
    for a in (_low_rank(20, 25, 2, seed=3), np.zeros((20, 25))):
        u, projected = _nystrom_factor(xp, backend.asarray(a), backend.asarray(q), 4)
        u, projected = backend.to_numpy(u), backend.to_numpy(projected)
        assert np.all(np.isfinite(u))
        assert np.all(np.isfinite(projected))
        np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-12)
        np.testing.assert_allclose(u @ projected, a, atol=1e-10)


@pytest.mark.parametrize("power_iter", [1, 2, 3])
def test_more_power_iterations_are_not_worse(power_iter):
    rng = np.random.default_rng(0)
    decay = 0.8 ** np.arange(20)
    core = rng.standard_normal((20, 20, 20)) * np.einsum("i,j,k->ijk", decay, decay, decay)
    factors = [np.linalg.qr(rng.standard_normal((40, 20)))[0] for _ in range(3)]
    x = TuckerTensor(core, factors).to_tensor() + 0.05 * rng.standard_normal((40, 40, 40))

    def mean_error(q):
        return np.mean([relative_error(x, rhosvd(x, 5, power_iter=q, seed=s)) for s in range(3)])

    assert mean_error(power_iter) <= mean_error(power_iter - 1) * (1 + 1e-3)


def test_rhosvd_gradcheck():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    planted = TuckerTensor(
        rng.standard_normal((2, 2, 2)) + 3.0,
        [np.linalg.qr(rng.standard_normal((s, 2)))[0] for s in (9, 10, 11)],
    ).to_tensor()
    x = torch.asarray(planted + 0.01 * rng.standard_normal(planted.shape)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: rhosvd(t, 2, oversample=3, seed=0).to_tensor(), (x,), fast_mode=True
    )


def test_khatri_rao_sketch_as_accurate_as_dense_gaussian_with_power_iteration():
    rng = np.random.default_rng(0)
    n, rank = 30, 5
    decay = 0.8 ** np.arange(n)
    core = rng.standard_normal((n, n, n)) * np.einsum("i,j,k->ijk", decay, decay, decay)
    factors = [np.linalg.qr(rng.standard_normal((n, n)))[0] for _ in range(3)]
    x = TuckerTensor(core, factors).to_tensor()
    a = fibre_matrix(np, x + 0.01 * rng.standard_normal(x.shape), 0)
    best = np.linalg.norm(np.linalg.svd(a, compute_uv=False)[rank:])

    def mean_error(col_shape):
        errors = []
        for seed in range(8):
            sketch = Sketch(oversample=5, power_iter=1, rng=np.random.default_rng(seed))
            u, projected = randomized_factor(np, a, rank, sketch, col_shape)
            errors.append(np.linalg.norm(a - u @ projected))
        return np.mean(errors)

    khatri_rao, dense = mean_error(((1, n), (2, n))), mean_error(((1, n * n),))
    assert khatri_rao <= 1.05 * best
    assert khatri_rao <= 1.02 * dense
