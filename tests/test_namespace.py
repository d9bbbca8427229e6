"""The backend policy: namespace from the inputs, library/dtype/device kept, no torch import."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import pytest

import tuckerlib
from tuckerlib import (
    TuckerTensor,
    fold,
    mode_product,
    multi_mode_product,
    relative_error,
    tucker_to_tensor,
    unfold,
)
from tuckerlib._namespace import as_array, get_namespace, is_numpy, is_torch

SHAPE = (2, 3, 4)


def _arrays(make: Callable[[np.ndarray], Any], dtype: str) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "x": make(rng.standard_normal(SHAPE).astype(dtype)),
        "matrix": make(rng.standard_normal((5, 3)).astype(dtype)),
        "vector": make(rng.standard_normal(3).astype(dtype)),
        "unfolding": make(rng.standard_normal((3, 8)).astype(dtype)),
        "core": make(rng.standard_normal((2, 2, 2)).astype(dtype)),
        "factors": [make(rng.standard_normal((s, 2)).astype(dtype)) for s in SHAPE],
    }


PRIMITIVES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unfold": lambda a: unfold(a["x"], 1),
    "fold": lambda a: fold(a["unfolding"], 1, SHAPE),
    "mode_product": lambda a: mode_product(a["x"], a["matrix"], 1),
    "mode_product_vector": lambda a: mode_product(a["x"], a["vector"], -2),
    "multi_mode_product": lambda a: multi_mode_product(
        a["x"], a["factors"], transpose=True, skip=1
    ),
    "tucker_to_tensor": lambda a: tucker_to_tensor(a["core"], a["factors"]),
    "norm": lambda a: TuckerTensor(a["core"], a["factors"]).norm(),
}

MIXED: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
    "mode_product": lambda a, b: mode_product(a["x"], b["matrix"], 1),
    "multi_mode_product": lambda a, b: multi_mode_product(
        a["x"], [a["factors"][0], b["factors"][1]], transpose=True
    ),
    "tucker_to_tensor": lambda a, b: tucker_to_tensor(
        a["core"], [*a["factors"][:2], b["factors"][2]]
    ),
    "TuckerTensor": lambda a, b: TuckerTensor(b["core"], a["factors"]),
    "relative_error": lambda a, b: relative_error(a["x"], b["x"]),
}


@pytest.mark.parametrize("name", list(PRIMITIVES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_keeps_library_dtype_and_device(backend, name, dtype):
    arrays = _arrays(backend.asarray, dtype)
    out = PRIMITIVES[name](arrays)
    assert get_namespace(out) is get_namespace(arrays["x"])
    assert type(out) is type(arrays["x"])
    assert out.dtype == arrays["x"].dtype
    assert array_api_compat.device(out) == array_api_compat.device(arrays["x"])


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_torch_float32_stays_float32_on_its_device(name):
    torch = pytest.importorskip("torch")
    arrays = _arrays(torch.from_numpy, "float32")
    out = PRIMITIVES[name](arrays)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert out.device == torch.device("cpu")


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_torch_autograd_flows(name):
    torch = pytest.importorskip("torch")
    arrays = _arrays(lambda a: torch.from_numpy(a).requires_grad_(), "float64")
    out = PRIMITIVES[name](arrays)
    out.sum().backward()
    leaves = [v for v in arrays.values() if isinstance(v, torch.Tensor)] + arrays["factors"]
    assert any(leaf.grad is not None and bool(torch.any(leaf.grad != 0)) for leaf in leaves)


@pytest.mark.parametrize("name", list(MIXED))
@pytest.mark.parametrize("other", ["torch", "array_api_strict"])
def test_two_libraries_in_one_call_is_a_type_error(name, other):
    module = pytest.importorskip(other)
    numpy_arrays = _arrays(np.asarray, "float64")
    other_arrays = _arrays(module.asarray, "float64")
    with pytest.raises(TypeError, match="different array libraries"):
        MIXED[name](numpy_arrays, other_arrays)


def test_mixed_library_message_names_the_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"\(numpy, torch\)"):
        get_namespace(np.ones(2), torch.ones(2))


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_lists_are_accepted_as_numpy(name):
    arrays = _arrays(lambda a: a.tolist(), "float64")
    arrays["factors"] = [f.tolist() for f in _arrays(np.asarray, "float64")["factors"]]
    out = PRIMITIVES[name](arrays)
    assert isinstance(out, np.ndarray | np.generic)
    expected = PRIMITIVES[name](_arrays(np.asarray, "float64"))
    np.testing.assert_allclose(out, expected, rtol=1e-15)


def test_relative_error_of_lists():
    assert relative_error([[1.0, 2.0]], [[1.0, 2.0]]) == 0.0


def test_namespace_helpers():
    torch = pytest.importorskip("torch")
    xp = get_namespace(np.ones(2), None, 3.0, [1, 2])
    assert is_numpy(xp)
    assert not is_torch(xp)
    assert is_numpy(get_namespace())
    torch_xp = get_namespace(torch.ones(2))
    assert is_torch(torch_xp)
    assert not is_numpy(torch_xp)
    array = np.ones(3)
    assert as_array(array, xp) is array
    assert isinstance(as_array([1.0], xp), np.ndarray)


def test_importing_tuckerlib_does_not_import_a_framework():
    code = (
        "import sys, numpy as np, tuckerlib\n"
        "x = np.ones((2, 3, 4))\n"
        "tuckerlib.multi_mode_product(x, [np.ones((2, 2)), np.ones((2, 3))])\n"
        "tuckerlib.relative_error(x, x)\n"
        "tuckerlib.TuckerTensor(np.ones((1, 1)), [np.ones((2, 1))] * 2).norm()\n"
        "tuckerlib.sthosvd(x, 2), tuckerlib.hooi(x, 1), tuckerlib.mode_spectra(x)\n"
        "tuckerlib.tucker_vs_matrix(x, 20)\n"
        "found = [m for m in ('torch', 'dask', 'distributed', 'zarr', 'jax') if m in sys.modules]\n"
        "assert not found, f'imported {found}'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_public_names_are_exported():
    for name in tuckerlib.__all__:
        assert hasattr(tuckerlib, name), name
