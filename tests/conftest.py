"""Shared fixtures: array backends, dtype-derived tolerances, hypothesis profiles.

Every property test takes the ``backend`` fixture and so runs on NumPy,
PyTorch, ``array_api_strict`` (the last proves the agnostic code paths use
only the array API standard), Dask (chunked along every mode, unevenly) and
JAX (CPU, float64 enabled).
"""

from __future__ import annotations

import os

# JAX reads these when it is first imported, in whichever test that is; set
# for the whole run, float64 is on for every JAX test alike, whatever the
# test order, and nothing outside JAX reads them. Tests that need float32
# JAX arrays ask for them explicitly.
os.environ["JAX_ENABLE_X64"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Backend:
    """An array library under test: how to make its arrays and read them back."""

    name: str
    xp: ModuleType
    asarray: Callable[[Any], Any]
    to_numpy: Callable[[Any], np.ndarray]

    def eps(self, dtype: Any) -> float:
        """Machine epsilon of a floating dtype of this backend."""
        return float(np.finfo(self.to_numpy(self.xp.zeros(1, dtype=dtype)).dtype).eps)

    def assert_close(self, actual: Any, expected: Any, *, factor: float = 100.0) -> None:
        """Assert closeness to within ``factor`` ulps of the result's dtype, scaled to its size."""
        actual_np = self.to_numpy(actual)
        expected_np = np.asarray(
            self.to_numpy(expected) if not isinstance(expected, np.ndarray) else expected
        )
        assert actual_np.shape == expected_np.shape
        eps = np.finfo(actual_np.dtype).eps if actual_np.dtype.kind in "fc" else 0.0
        scale = max(float(np.max(np.abs(expected_np), initial=0.0)), 1.0)
        np.testing.assert_allclose(
            actual_np, expected_np, rtol=factor * eps, atol=factor * eps * scale
        )


def _numpy_backend() -> Backend:
    return Backend("numpy", np, np.asarray, np.asarray)


def _torch_backend() -> Backend:
    torch = pytest.importorskip("torch")
    return Backend(
        "torch",
        torch,
        lambda a: torch.asarray(np.asarray(a)),
        lambda t: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t),
    )


def _strict_backend() -> Backend:
    strict = pytest.importorskip("array_api_strict")
    return Backend(
        "array_api_strict",
        strict,
        lambda a: strict.asarray(np.asarray(a)),
        lambda a: np.from_dlpack(a) if hasattr(a, "__dlpack__") else np.asarray(a),
    )


def uneven_chunks(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Two chunks of unequal size along every mode of size >= 3 (one chunk for 1, halves for 2)."""
    return tuple(
        (size,) if size < 2 else (size - max(1, size // 3), max(1, size // 3)) for size in shape
    )


def _dask_backend() -> Backend:
    da = pytest.importorskip("dask.array")

    def asarray(a: Any) -> Any:
        host = np.asarray(a)
        return da.from_array(host, chunks=uneven_chunks(host.shape))

    def to_numpy(a: Any) -> np.ndarray:
        return np.asarray(a.compute() if isinstance(a, da.Array) else a)

    return Backend("dask", da, asarray, to_numpy)


def _jax_backend() -> Backend:
    jax = pytest.importorskip("jax")
    if not jax.config.jax_enable_x64:
        pytest.skip("the JAX backend tests need float64 (JAX_ENABLE_X64=1 before jax is imported)")
    jnp = jax.numpy
    return Backend("jax", jnp, lambda a: jnp.asarray(np.asarray(a)), lambda a: np.asarray(a))


BACKENDS = {
    "numpy": _numpy_backend,
    "torch": _torch_backend,
    "array_api_strict": _strict_backend,
    "dask": _dask_backend,
    "jax": _jax_backend,
}


# Eager JAX compiles every operation for each new shape and Dask builds a
# task graph per call: seconds per example where NumPy needs milliseconds.
# A hypothesis test therefore runs them on a few examples (the profile's
# first, derandomized ones) instead of the profile's count.
FEW_EXAMPLES = {"dask": 3, "jax": 1}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "skip_backend(name, reason): skip this test (or module) for one backend of the fixture",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec is not None else None
        for mark in item.iter_markers("skip_backend"):
            if mark.args[0] == name:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {mark.kwargs['reason']}"))


# The JAX backend of the decomposition and analysis tests: eager JAX
# compiles every operation for each new shape, seconds per hypothesis
# example; tests/test_jax.py checks each of those functions on JAX against
# NumPy on fixed shapes instead, eagerly and under jax.jit where it traces.
JAX_PER_SHAPE = (
    "eager JAX compiles every operation for each new shape (seconds per example); "
    "tests/test_jax.py checks this function on JAX against NumPy on fixed shapes"
)

# The internal kernels have no JAX test of their own: on JAX they run inside
# the decompositions that tests/test_jax.py checks against NumPy.
JAX_KERNELS = (
    "eager JAX compiles every operation for each new shape (seconds per example); "
    "this internal kernel runs on JAX inside the decompositions tests/test_jax.py checks"
)

# The in-memory kernels (fibre matrices, sketches of a materialized
# unfolding) are never given a Dask tensor: the Dask path contracts chunks.
DASK_KERNELS = (
    "an in-memory kernel the Dask path does not use (it contracts chunks); "
    "tests/test_dask.py covers the Dask path"
)


@pytest.fixture(autouse=True)
def _fewer_examples_on_slow_backends(request: pytest.FixtureRequest) -> Any:
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    test = request.function
    if name not in FEW_EXAMPLES or not getattr(test, "is_hypothesis_test", False):
        yield
        return
    original = test._hypothesis_internal_use_settings
    test._hypothesis_internal_use_settings = settings(
        original, max_examples=min(original.max_examples, FEW_EXAMPLES[name])
    )
    try:
        yield
    finally:
        test._hypothesis_internal_use_settings = original


@pytest.fixture(params=list(BACKENDS), scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each array library under test, in turn."""
    return BACKENDS[request.param]()
