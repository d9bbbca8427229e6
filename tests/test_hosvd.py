import numpy as np
import pytest
from conftest import JAX_PER_SHAPE
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import TuckerTensor, hosvd, relative_error, unfold

pytestmark = pytest.mark.skip_backend("jax", reason=JAX_PER_SHAPE)

METHODS = ["svd", "gram", "auto", "randomized"]


def planted(shape, ranks, seed=0):
    """A tensor of exact multilinear rank ``ranks`` with well-conditioned unfoldings."""
    rng = np.random.default_rng(seed)
    core = (
        rng.standard_normal(ranks) + 3.0 * np.eye(*ranks[:2])[(...,) + (None,) * (len(ranks) - 2)]
    )
    factors = [
        np.linalg.qr(rng.standard_normal((i, r)))[0] for i, r in zip(shape, ranks, strict=True)
    ]
    return TuckerTensor(core, factors).to_tensor()


def discarded(x, ranks):
    return sum(
        float(np.sum(np.linalg.svd(unfold(x, n), compute_uv=False)[r:] ** 2))
        for n, r in enumerate(ranks)
    )


def check_factors(backend, tucker, dtype_eps):
    for factor in tucker.factors:
        u = backend.to_numpy(factor)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=100 * dtype_eps)
        pivots = u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])]
        assert np.all(pivots > 0)


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@given(shape=shapes, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("method", ["svd", "gram", "auto"])
def test_full_rank_reconstructs(backend, method, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    tucker = hosvd(backend.asarray(x), method=method)
    assert tucker.rank == shape
    backend.assert_close(tucker.to_tensor(), x, factor=1000)
    check_factors(backend, tucker, backend.eps(tucker.core.dtype))


def test_float64_full_rank_error_below_1e12(backend):
    x = np.random.default_rng(0).standard_normal((7, 8, 9))
    assert relative_error(x, backend.to_numpy(hosvd(backend.asarray(x)).to_tensor())) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_exact_recovery_of_planted_rank(backend, method):
    x = planted((12, 13, 14), (2, 3, 4))
    tucker = hosvd(backend.asarray(x), (2, 3, 4), method=method)
    assert relative_error(x, backend.to_numpy(tucker.to_tensor())) < 1e-10


@given(seed=st.integers(0, 2**16), ranks=st.tuples(*[st.integers(1, 5)] * 3))
def test_hosvd_error_bound(seed, ranks):
    x = np.random.default_rng(seed).standard_normal((5, 6, 7))
    error2 = relative_error(x, hosvd(x, ranks)) ** 2 * np.sum(x**2)
    assert error2 <= discarded(x, ranks) * (1 + 1e-10)


@given(seed=st.integers(0, 2**16), tol=st.floats(0.01, 0.99))
def test_tol_guarantee(seed, tol):
    x = np.random.default_rng(seed).standard_normal((5, 6, 7))
    assert relative_error(x, hosvd(x, tol=tol)) <= tol


def test_float32_stays_float32(backend):
    x = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    tucker = hosvd(backend.asarray(x), 3)
    assert backend.to_numpy(tucker.core).dtype == np.float32
    assert all(backend.to_numpy(f).dtype == np.float32 for f in tucker.factors)
    full = hosvd(backend.asarray(x))
    backend.assert_close(full.to_tensor(), x, factor=1000)


def test_integer_input_becomes_default_float(backend):
    x = backend.asarray(np.arange(24).reshape(2, 3, 4))
    tucker = hosvd(x)
    default = backend.xp.empty(0, dtype=None).dtype if backend.name == "torch" else None
    expected = default if default is not None else backend.xp.float64
    assert tucker.core.dtype == expected


@pytest.mark.parametrize("method", ["svd", "gram", "randomized"])
def test_zero_and_rank_deficient_give_no_nan(backend, method):
    for x in [np.zeros((4, 5, 6)), planted((4, 5, 6), (1, 1, 1))]:
        tucker = hosvd(backend.asarray(x), 3, method=method)
        assert np.all(np.isfinite(backend.to_numpy(tucker.core)))
        check_factors(backend, tucker, 1e-15)
        backend.assert_close(tucker.to_tensor(), x, factor=1000)


def test_rank_one_known_value():
    a, b, c = np.array([3.0, -4.0]), np.array([1.0, 2.0, 2.0]), np.array([0.0, -1.0])
    tucker = hosvd(np.einsum("i,j,k->ijk", a, b, c), 1)
    np.testing.assert_allclose(tucker.core, [[[5.0 * 3.0 * 1.0]]])
    np.testing.assert_allclose(tucker.factors[0][:, 0], -a / 5.0)
    np.testing.assert_allclose(tucker.factors[1][:, 0], b / 3.0)
    np.testing.assert_allclose(tucker.factors[2][:, 0], -c)


def test_backends_agree(backend):
    x = np.random.default_rng(5).standard_normal((6, 7, 8))
    reference = hosvd(x, (2, 3, 4))
    tucker = hosvd(backend.asarray(x), (2, 3, 4))
    backend.assert_close(tucker.core, reference.core, factor=1e4)
    for factor, expected in zip(tucker.factors, reference.factors, strict=True):
        backend.assert_close(factor, expected, factor=1e4)


def test_gradcheck():
    torch = pytest.importorskip("torch")
    noise = 0.01 * np.random.default_rng(0).standard_normal((3, 4, 3))
    x = torch.asarray(planted((3, 4, 3), (2, 2, 2), seed=3) + noise).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: hosvd(t, (2, 2, 2), method="gram").to_tensor(), (x,), fast_mode=True
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": (2, 7, 2)}, ValueError, r"rank\[1\]=7 is outside \[1, 4\]"),
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": (2, 2)}, ValueError, "has 2 entries"),
        ({"tol": 0.0}, ValueError, r"open interval \(0, 1\)"),
        ({"tol": 1.0}, ValueError, r"open interval \(0, 1\)"),
        ({"tol": float("nan")}, ValueError, r"open interval \(0, 1\)"),
        ({"tol": "0.1"}, TypeError, "tol must be a real number"),
        ({"rank": 2, "tol": 0.1}, ValueError, "either rank or tol"),
        ({"method": "qr"}, ValueError, "method must be one of"),
        ({"tol": 0.1, "method": "randomized"}, ValueError, "needs rank"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        hosvd(np.ones((3, 4, 5)), **kwargs)


def test_bad_tensor():
    with pytest.raises(ValueError, match="NaN or infinity"):
        hosvd(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        hosvd(np.float64(1.0))
    with pytest.raises(TypeError, match="complex"):
        hosvd(np.ones((2, 2), dtype=complex))
