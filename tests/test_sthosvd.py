import numpy as np
import pytest
from conftest import JAX_PER_SHAPE
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import hosvd, mode_product, relative_error, sthosvd, unfold
from tuckerlib.decompositions._truncation import default_order

pytestmark = pytest.mark.skip_backend("jax", reason=JAX_PER_SHAPE)


def planted(shape, ranks, seed=0):
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(ranks)
    core[(0,) * len(ranks)] += 5.0
    factors = [
        np.linalg.qr(rng.standard_normal((i, r)))[0] for i, r in zip(shape, ranks, strict=True)
    ]
    x = core
    for n, u in enumerate(factors):
        x = mode_product(x, u, n)
    return x


@given(
    seed=st.integers(0, 2**16),
    ranks=st.tuples(*[st.integers(1, 5)] * 3),
    order=st.permutations([0, 1, 2]),
)
def test_error_identity(seed, ranks, order):
    """‖x − x̂‖² equals the sum of the energies discarded at each step."""
    x = np.random.default_rng(seed).standard_normal((5, 6, 7))
    tucker = sthosvd(x, ranks, order=order)
    y, lost = x, 0.0
    for n in order:
        s = np.linalg.svd(unfold(y, n), compute_uv=False)
        lost += float(np.sum(s[ranks[n] :] ** 2))
        y = mode_product(y, tucker.factors[n], n, transpose=True)
    error2 = float(np.sum((x - tucker.to_tensor()) ** 2))
    np.testing.assert_allclose(error2, lost, rtol=1e-9, atol=1e-12 * np.sum(x**2))
    hosvd_bound = sum(
        float(np.sum(np.linalg.svd(unfold(x, n), compute_uv=False)[r:] ** 2))
        for n, r in enumerate(ranks)
    )
    assert error2 <= hosvd_bound * (1 + 1e-10)


@given(seed=st.integers(0, 2**16), tol=st.floats(0.01, 0.99))
def test_tol_guarantee(backend, seed, tol):
    x = np.random.default_rng(seed).standard_normal((4, 5, 6))
    tucker = sthosvd(backend.asarray(x), tol=tol)
    assert relative_error(x, backend.to_numpy(tucker.to_tensor())) <= tol


def test_tol_keeps_few_ranks_on_planted_tensor():
    x = planted((10, 11, 12), (2, 3, 4))
    tucker = sthosvd(x, tol=1e-6)
    assert tucker.rank == (2, 3, 4)
    # A tolerance below the Gram's rounding level takes the SVD route.
    assert sthosvd(x, tol=1e-9).rank == (2, 3, 4)


@pytest.mark.parametrize("method", ["svd", "gram", "auto", "randomized"])
def test_exact_recovery_of_planted_rank(backend, method):
    x = planted((12, 13, 14), (2, 3, 4))
    tucker = sthosvd(backend.asarray(x), (2, 3, 4), method=method)
    assert relative_error(x, backend.to_numpy(tucker.to_tensor())) < 1e-10


def test_full_rank_and_float32(backend):
    x = np.random.default_rng(1).standard_normal((4, 6, 5))
    backend.assert_close(sthosvd(backend.asarray(x)).to_tensor(), x, factor=1000)
    x32 = x.astype(np.float32)
    tucker = sthosvd(backend.asarray(x32), 3)
    assert backend.to_numpy(tucker.core).dtype == np.float32
    backend.assert_close(sthosvd(backend.asarray(x32)).to_tensor(), x32, factor=1000)


def test_factors_orthonormal_and_sign_fixed(backend):
    x = np.random.default_rng(2).standard_normal((6, 5, 4))
    for factor in sthosvd(backend.asarray(x), (3, 2, 4)).factors:
        u = backend.to_numpy(factor)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
        assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] > 0)


def test_backends_agree(backend):
    x = np.random.default_rng(3).standard_normal((6, 7, 8))
    reference = sthosvd(x, (2, 3, 4))
    tucker = sthosvd(backend.asarray(x), (2, 3, 4))
    backend.assert_close(tucker.core, reference.core, factor=1e4)


def test_zero_tensor(backend):
    tucker = sthosvd(backend.asarray(np.zeros((3, 4, 5))), tol=0.1)
    assert tucker.rank == (1, 1, 1)
    assert np.all(backend.to_numpy(tucker.core) == 0.0)


def test_default_order_rule():
    assert default_order((10, 100, 50), (5, 10, 5)) == (1, 2, 0)
    assert default_order((10, 100, 50), None) == (1, 2, 0)
    assert default_order((8, 8, 8), (2, 2, 2)) == (0, 1, 2)


def test_matrix_matches_truncated_svd():
    x = np.random.default_rng(4).standard_normal((9, 7))
    u, s, vt = np.linalg.svd(x)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(sthosvd(x, 3).to_tensor(), best, atol=1e-12)
    np.testing.assert_allclose(hosvd(x, 3).to_tensor(), best, atol=1e-12)


def test_gradcheck():
    torch = pytest.importorskip("torch")
    noise = 0.01 * np.random.default_rng(0).standard_normal((3, 4, 3))
    x = torch.asarray(planted((3, 4, 3), (2, 2, 2), seed=1) + noise).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: sthosvd(t, (2, 2, 2), method="svd").to_tensor(), (x,), fast_mode=True
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 2, "order": (0, 1)}, ValueError, "permutation of the modes"),
        ({"rank": 2, "order": (0, 0, 1)}, ValueError, "permutation of the modes"),
        ({"rank": 2, "order": 3}, TypeError, "sequence of mode indices"),
        ({"rank": (1, 1, 9)}, ValueError, r"rank\[2\]=9 is outside"),
        ({"rank": -1}, ValueError, "rank must be >= 1"),
        ({"tol": 1.5}, ValueError, r"open interval \(0, 1\)"),
        ({"rank": 2, "tol": 0.5}, ValueError, "either rank or tol"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        sthosvd(np.ones((3, 4, 5)), **kwargs)


def test_non_finite():
    with pytest.raises(ValueError, match="NaN or infinity"):
        sthosvd(np.full((2, 2), np.nan), 1)


def test_fortran_ordered_input_matches_c_ordered():
    x = np.random.default_rng(5).standard_normal((6, 7, 8))
    reference = sthosvd(x, (2, 3, 4))
    tucker = sthosvd(np.asfortranarray(x), (2, 3, 4))
    np.testing.assert_allclose(tucker.to_tensor(), reference.to_tensor(), atol=1e-12)
