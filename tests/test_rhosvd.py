import numpy as np
import pytest
from conftest import JAX_PER_SHAPE

from tuckerlib import TuckerTensor, relative_error, rhosvd, sthosvd

pytestmark = pytest.mark.skip_backend("jax", reason=JAX_PER_SHAPE)


def decaying(shape=(30, 32, 34), seed=0):
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(shape) * np.multiply.outer(
        np.multiply.outer(0.7 ** np.arange(shape[0]), 0.7 ** np.arange(shape[1])),
        0.7 ** np.arange(shape[2]),
    )
    factors = [np.linalg.qr(rng.standard_normal((s, s)))[0] for s in shape]
    return TuckerTensor(core, factors).to_tensor()


def test_seed_reproducible_across_backends(backend):
    x = decaying()
    reference = rhosvd(x, 4, seed=3)
    tucker = rhosvd(backend.asarray(x), 4, seed=3)
    backend.assert_close(tucker.core, reference.core, factor=1e4)
    for factor, expected in zip(tucker.factors, reference.factors, strict=True):
        backend.assert_close(factor, expected, factor=1e5)


def test_generator_seed_and_fresh_randomness():
    x = decaying()
    a = rhosvd(x, 4, seed=np.random.default_rng(5))
    b = rhosvd(x, 4, seed=5)
    np.testing.assert_array_equal(a.core, b.core)
    assert rhosvd(x, 4).rank == (4, 4, 4)


def test_close_to_sthosvd():
    x = decaying()
    assert relative_error(x, rhosvd(x, 5, seed=0)) <= 1.05 * relative_error(x, sthosvd(x, 5))


@pytest.mark.parametrize("power_iter", [0, 1, 2])
def test_exact_recovery_of_planted_rank(backend, power_iter):
    rng = np.random.default_rng(1)
    factors = [np.linalg.qr(rng.standard_normal((s, 3)))[0] for s in (25, 26, 27)]
    x = TuckerTensor(rng.standard_normal((3, 3, 3)) + 2.0, factors).to_tensor()
    tucker = rhosvd(backend.asarray(x), 3, oversample=2, power_iter=power_iter, seed=0)
    assert relative_error(x, backend.to_numpy(tucker.to_tensor())) < 1e-10
    for factor in tucker.factors:
        u = backend.to_numpy(factor)
        np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)
        assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(3)] > 0)


def test_float32_and_zero(backend):
    x = decaying().astype(np.float32)
    assert backend.to_numpy(rhosvd(backend.asarray(x), 3, seed=0).core).dtype == np.float32
    zero = rhosvd(backend.asarray(np.zeros((20, 21, 22))), 2, seed=0)
    assert np.all(backend.to_numpy(zero.core) == 0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": None}, ValueError, "rhosvd needs rank"),
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": (1, 1, 99)}, ValueError, r"rank\[2\]=99 is outside"),
        ({"rank": 2, "oversample": -1}, ValueError, "oversample must be >= 0"),
        ({"rank": 2, "power_iter": 0.5}, TypeError, "power_iter must be an integer"),
        ({"rank": 2, "seed": -3}, ValueError, "seed must be >= 0"),
        ({"rank": 2, "seed": "a"}, TypeError, "seed must be None"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        rhosvd(np.ones((10, 11, 12)), **kwargs)


def test_same_result_in_any_memory_layout():
    x = np.ascontiguousarray(decaying())
    reference = rhosvd(x, 4, seed=3)
    for stored in (
        np.asfortranarray(x),
        np.ascontiguousarray(x.transpose(1, 2, 0)).transpose(2, 0, 1),
    ):
        tucker = rhosvd(stored, 4, seed=3)
        np.testing.assert_allclose(tucker.core, reference.core, rtol=1e-9, atol=1e-12)
