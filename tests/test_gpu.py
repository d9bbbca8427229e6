"""CUDA tensors and CuPy arrays (and Dask arrays of CuPy chunks); skipped without a GPU.

Results must stay on the device, in the input's library and dtype, and
equal the NumPy results of the same data to the dtype's tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

import tuckerlib as tl

pytestmark = pytest.mark.gpu


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy


def _data() -> np.ndarray:
    rng = np.random.default_rng(0)
    factors = [np.linalg.qr(rng.standard_normal((n, 3)))[0] for n in (20, 18, 16)]
    signal = tl.tucker_to_tensor(10 * rng.standard_normal((3, 3, 3)), factors)
    return signal + 1e-2 * rng.standard_normal(signal.shape)


CALLS = {
    "hosvd": lambda x: tl.hosvd(x, 3),
    "sthosvd": lambda x: tl.sthosvd(x, 3),
    "hooi": lambda x: tl.hooi(x, 3, max_iter=3),
    "rhosvd": lambda x: tl.rhosvd(x, 3, oversample=4, seed=0),
}


def _check(tucker, expected, to_numpy, on_device, atol):
    assert on_device(tucker.core)
    assert all(on_device(f) for f in tucker.factors)
    np.testing.assert_allclose(to_numpy(tucker.core), expected.core, atol=atol * 100)
    for f, g in zip(tucker.factors, expected.factors, strict=True):
        np.testing.assert_allclose(to_numpy(f), g, atol=atol)


@pytest.mark.parametrize("name", list(CALLS))
def test_torch_cuda(name):
    torch = _torch_cuda()
    x = _data()
    result = CALLS[name](torch.asarray(x, device="cuda"))
    _check(result, CALLS[name](x), lambda t: t.cpu().numpy(), lambda t: t.is_cuda, 1e-8)


@pytest.mark.parametrize("name", list(CALLS))
def test_cupy(name):
    cupy = _cupy()
    x = _data()
    result = CALLS[name](cupy.asarray(x))
    _check(result, CALLS[name](x), cupy.asnumpy, lambda a: isinstance(a, cupy.ndarray), 1e-8)


def test_cupy_spectra_and_primitives():
    cupy = _cupy()
    x = _data()
    for s, e in zip(tl.mode_spectra(cupy.asarray(x)), tl.mode_spectra(x), strict=True):
        assert isinstance(s, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(s), e, atol=1e-8 * e[0])
    m = np.ones((2, 18))
    y = tl.mode_product(cupy.asarray(x), cupy.asarray(m), 1)
    np.testing.assert_allclose(cupy.asnumpy(y), tl.mode_product(x, m, 1), atol=1e-10)


@pytest.mark.parametrize("name", ["sthosvd", "hosvd", "rhosvd"])
def test_dask_of_cupy_chunks_computes_on_the_device(name):
    cupy = _cupy()
    da = pytest.importorskip("dask.array")
    x = _data()
    lazy = da.from_array(cupy.asarray(x), chunks=(7, 9, 8), asarray=False)
    result = CALLS[name](lazy)
    core = result.core.compute()
    assert isinstance(core, cupy.ndarray)
    expected = CALLS[name](x)
    np.testing.assert_allclose(cupy.asnumpy(core), expected.core, atol=1e-6)
    for f, g in zip(result.factors, expected.factors, strict=True):
        np.testing.assert_allclose(cupy.asnumpy(f.compute()), g, atol=1e-8)
