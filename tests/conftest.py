"""Shared fixtures: array backends, dtype-derived tolerances, hypothesis profiles.

Every property test takes the ``backend`` fixture and so runs on NumPy,
PyTorch and ``array_api_strict`` (the last proves the agnostic code paths
use only the array API standard).
"""

from __future__ import annotations

import os
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


BACKENDS = {
    "numpy": _numpy_backend,
    "torch": _torch_backend,
    "array_api_strict": _strict_backend,
}


@pytest.fixture(params=list(BACKENDS), scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each array library under test, in turn."""
    return BACKENDS[request.param]()
