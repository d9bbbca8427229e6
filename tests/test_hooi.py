import itertools

import numpy as np
import pytest
from conftest import JAX_PER_SHAPE

from tuckerlib import HOOIInfo, TuckerTensor, hooi, hosvd, relative_error, sthosvd

pytestmark = pytest.mark.skip_backend("jax", reason=JAX_PER_SHAPE)


def noisy(shape=(8, 9, 10), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) + np.einsum(
        "i,j,k->ijk", *[rng.standard_normal(s) for s in shape]
    )


@pytest.mark.parametrize("init", ["sthosvd", "hosvd"])
def test_monotone_and_never_worse_than_init(backend, init):
    x = noisy()
    start = (sthosvd if init == "sthosvd" else hosvd)(x, 3)
    tucker, info = hooi(backend.asarray(x), 3, init=init, return_info=True)
    assert isinstance(info, HOOIInfo)
    assert info.n_iter == len(info.errors) - 1
    np.testing.assert_allclose(info.errors[0], relative_error(x, start), rtol=1e-8)
    slack = 1e-7  # errors come from ‖x‖² − ‖G‖²: rounding at sqrt(eps)
    assert all(b <= a + slack for a, b in itertools.pairwise(info.errors))
    error = relative_error(x, backend.to_numpy(tucker.to_tensor()))
    assert error <= relative_error(x, start) + 1e-12
    np.testing.assert_allclose(error, min(info.errors), rtol=1e-6)


def test_converges_and_reports_it():
    _, info = hooi(noisy(), 2, tol=1e-6, return_info=True)
    assert info.converged
    assert abs(info.errors[-1] - info.errors[-2]) <= 1e-6
    _, info = hooi(noisy(), 2, tol=0.0, max_iter=2, return_info=True)
    assert not info.converged
    assert info.n_iter == 2


def test_max_iter_zero_returns_init():
    x = noisy()
    tucker = hooi(x, 3, max_iter=0)
    np.testing.assert_allclose(tucker.core, sthosvd(x, 3).core)


def test_tucker_init_is_orthonormalized_and_not_worsened():
    x = noisy()
    rng = np.random.default_rng(1)
    start = TuckerTensor(
        rng.standard_normal((2, 2, 2)), [rng.standard_normal((s, 2)) for s in x.shape]
    )
    tucker, info = hooi(x, 2, init=start, max_iter=3, return_info=True)
    assert relative_error(x, tucker) <= relative_error(x, start)
    assert info.errors[0] <= relative_error(x, start)
    for u in tucker.factors:
        np.testing.assert_allclose(u.T @ u, np.eye(2), atol=1e-12)


def test_exact_recovery_of_planted_rank(backend):
    rng = np.random.default_rng(2)
    core = rng.standard_normal((2, 3, 2)) + 3.0
    factors = [
        np.linalg.qr(rng.standard_normal((s, r)))[0]
        for s, r in zip((9, 8, 7), (2, 3, 2), strict=True)
    ]
    x = TuckerTensor(core, factors).to_tensor()
    tucker = hooi(backend.asarray(x), (2, 3, 2))
    assert relative_error(x, backend.to_numpy(tucker.to_tensor())) < 1e-10


def test_float32_stays_float32(backend):
    x = noisy().astype(np.float32)
    tucker = hooi(backend.asarray(x), 2, max_iter=3)
    assert backend.to_numpy(tucker.core).dtype == np.float32


def test_zero_tensor():
    tucker, info = hooi(np.zeros((3, 4, 5)), 2, return_info=True)
    assert info.errors[-1] == 0.0
    assert np.all(np.isfinite(tucker.core))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": None}, ValueError, "hooi needs rank"),
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": (1, 2, 9)}, ValueError, r"rank\[2\]=9 is outside"),
        ({"rank": 2, "init": "random"}, ValueError, "init must be"),
        ({"rank": 2, "max_iter": -1}, ValueError, "max_iter must be >= 0"),
        ({"rank": 2, "max_iter": 1.5}, TypeError, "max_iter must be an integer"),
        ({"rank": 2, "tol": -1.0}, ValueError, "tol must be >= 0"),
        (
            {"rank": 2, "init": TuckerTensor(np.ones((1, 1, 1)), [np.ones((3, 1))] * 3)},
            ValueError,
            "init must have shape",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        hooi(np.ones((3, 4, 5)), **kwargs)
