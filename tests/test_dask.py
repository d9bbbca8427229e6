"""Dask input: equal to NumPy's results, lazy, and read a counted number of times.

The decompositions' factors are sign-fixed, so a Dask result must equal the
NumPy one (to dtype tolerance), not only up to signs. Pass counts are
checked with a chunk loader that counts its reads; the cluster test runs
the documented recipe on two worker processes whose memory limit is below
the tensor's size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tuckerlib as tl

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

SHAPE = (14, 13, 12)
CHUNKS = ((5, 5, 4), (7, 6), (3, 9))


def _planted(shape=SHAPE, rank=3, noise=1e-2, dtype=np.float64, seed=0) -> np.ndarray:
    """A rank-``rank`` tensor plus noise: well separated leading singular values."""
    rng = np.random.default_rng(seed)
    factors = [np.linalg.qr(rng.standard_normal((n, rank)))[0] for n in shape]
    core = rng.standard_normal((rank,) * len(shape)) * 10
    signal = tl.tucker_to_tensor(core, factors)
    return (signal + noise * rng.standard_normal(shape)).astype(dtype)


DECOMPOSITIONS: dict[str, Callable[[Any], tl.TuckerTensor]] = {
    "sthosvd": lambda x: tl.sthosvd(x, 3),
    "sthosvd-ranks": lambda x: tl.sthosvd(x, (3, 2, 3), order=(2, 0, 1)),
    "sthosvd-tol": lambda x: tl.sthosvd(x, tol=0.05),
    "hosvd": lambda x: tl.hosvd(x, (3, 3, 2)),
    "hosvd-tol": lambda x: tl.hosvd(x, tol=0.05),
    "hooi": lambda x: tl.hooi(x, 2, max_iter=3),
    "hooi-hosvd-init": lambda x: tl.hooi(x, 2, init="hosvd", max_iter=2),
    "rhosvd": lambda x: tl.rhosvd(x, 2, oversample=3, seed=1),
    "rhosvd-q0": lambda x: tl.rhosvd(x, 2, oversample=3, power_iter=0, seed=1),
    "rhosvd-q2": lambda x: tl.rhosvd(x, 2, oversample=3, power_iter=2, seed=1),
}


def _assert_same_tucker(lazy: tl.TuckerTensor, eager: tl.TuckerTensor, factor: float) -> None:
    assert isinstance(lazy.core, da.Array)
    assert all(isinstance(f, da.Array) for f in lazy.factors)
    assert lazy.rank == eager.rank
    eps = np.finfo(eager.core.dtype).eps
    scale = float(np.max(np.abs(eager.core)))
    np.testing.assert_allclose(lazy.core.compute(), eager.core, atol=factor * eps * scale)
    for f, g in zip(lazy.factors, eager.factors, strict=True):
        np.testing.assert_allclose(f.compute(), g, atol=factor * eps)


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decompositions_equal_numpy(name, dtype):
    x = _planted(dtype=dtype)
    lazy = DECOMPOSITIONS[name](da.from_array(x, chunks=CHUNKS))
    _assert_same_tucker(lazy, DECOMPOSITIONS[name](x), factor=1e4 if dtype == np.float32 else 1e3)
    assert lazy.core.dtype == dtype


@pytest.mark.parametrize(
    ("shape", "rank", "chunks"),
    [((40, 3, 4), (5, 2, 3), (15, 2, 3)), ((30, 2, 2), (6, 2, 2), (7, 1, 2))],
    ids=["tall", "tall-rank-above-columns"],
)
def test_tall_mode(shape, rank, chunks):
    x = _planted(shape, rank=2)
    lazy = tl.sthosvd(da.from_array(x, chunks=chunks), rank)
    eager = tl.sthosvd(x, rank)
    assert lazy.rank == eager.rank
    assert tl.relative_error(x, lazy.to_tensor().compute()) == pytest.approx(
        tl.relative_error(x, eager), abs=1e-12
    )
    u = lazy.factors[0].compute()
    np.testing.assert_allclose(u.T @ u, np.eye(rank[0]), atol=1e-12)
    if rank[0] <= np.prod(shape[1:]):
        np.testing.assert_allclose(u, eager.factors[0], atol=1e-10)


def test_factors_are_chunked_like_their_mode():
    x = da.from_array(_planted(), chunks=CHUNKS)
    tucker = tl.sthosvd(x, 3)
    for n, factor in enumerate(tucker.factors):
        assert factor.chunks[0] == CHUNKS[n]


def test_analysis_equals_numpy():
    x = _planted()
    lazy = da.from_array(x, chunks=CHUNKS)
    for s, e in zip(tl.mode_spectra(lazy), tl.mode_spectra(x), strict=True):
        assert isinstance(s, da.Array)
        np.testing.assert_allclose(s.compute(), e, atol=1e-10 * e[0])
    assert tl.energy_ranks(lazy, 0.999) == tl.energy_ranks(x, 0.999)
    assert tl.ranks_for_budget(lazy, 150) == tl.ranks_for_budget(x, 150)
    result, expected = tl.tucker_vs_matrix(lazy, 150), tl.tucker_vs_matrix(x, 150)
    assert result["tucker_ranks"] == expected["tucker_ranks"]
    for key in ("tucker_error", "matrix_error"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9)


def test_primitives_stay_lazy_and_blocked():
    x = _planted()
    lazy = da.from_array(x, chunks=CHUNKS)
    m = np.random.default_rng(1).standard_normal((4, SHAPE[1]))
    y = tl.mode_product(lazy, da.from_array(m), 1)
    assert isinstance(y, da.Array)
    # A blocked contraction keeps the other modes' chunks: no rechunk.
    assert y.chunks[0] == CHUNKS[0]
    assert y.chunks[2] == CHUNKS[2]
    np.testing.assert_allclose(y.compute(), tl.mode_product(x, m, 1), atol=1e-12)


class CountingTensor:
    """A NumPy tensor behind a chunk loader that counts the (non-empty) reads."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.reads = 0
        self._lock = threading.Lock()

    def __getitem__(self, index: Any) -> np.ndarray:
        block = self.data[index]
        if block.size:
            with self._lock:
                self.reads += 1
        return block


def _passes(call: Callable[[Any], Any]) -> float:
    source = CountingTensor(_planted())
    x = da.from_array(source, chunks=CHUNKS, asarray=True)
    chunks = x.npartitions
    source.reads = 0
    with dask.config.set(scheduler="threads"):
        call(x)
    return source.reads / chunks


# Each pass is one dask.compute that reads every chunk once.
PASSES = {
    "mode_spectra": (tl.mode_spectra, 1),
    "energy_ranks": (lambda x: tl.energy_ranks(x, 0.9), 1),
    "ranks_for_budget": (lambda x: tl.ranks_for_budget(x, 150), 1),
    "sthosvd": (lambda x: tl.sthosvd(x, 3), 2),
    "sthosvd-tol": (lambda x: tl.sthosvd(x, tol=0.05), 2),
    "hosvd": (lambda x: tl.hosvd(x, 3), 2),
    "rhosvd-q0": (lambda x: tl.rhosvd(x, 2, oversample=3, power_iter=0, seed=0), 2),
    "rhosvd-q1": (lambda x: tl.rhosvd(x, 2, oversample=3, power_iter=1, seed=0), 3),
    "rhosvd-q2": (lambda x: tl.rhosvd(x, 2, oversample=3, power_iter=2, seed=0), 5),
    # ST-HOSVD init (2), then one pass per mode and sweep: 3 modes x 2 sweeps.
    "hooi": (lambda x: tl.hooi(x, 2, max_iter=2, tol=0.0), 2 + 3 * 2),
    "tucker_vs_matrix": (lambda x: tl.tucker_vs_matrix(x, 150), 2),
}


@pytest.mark.parametrize("name", list(PASSES))
def test_the_tensor_is_read_once_per_pass(name):
    call, passes = PASSES[name]
    assert _passes(call) == passes


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_extreme_magnitudes_rescale_in_the_first_pass():
    x = (_planted(dtype=np.float32) * np.float32(1e19)).astype(np.float32)
    lazy = tl.sthosvd(da.from_array(x, chunks=CHUNKS), 3)
    eager = tl.sthosvd(x, 3)
    for f, g in zip(lazy.factors, eager.factors, strict=True):
        np.testing.assert_allclose(f.compute(), g, atol=1e-3)
    assert tl.relative_error(x, lazy.to_tensor().compute()) < 1e-2


@pytest.mark.slow
def test_local_cluster_decomposes_a_zarr_tensor_larger_than_a_worker(tmp_path):
    """The scaling guide's recipe: a zarr store, a LocalCluster of 2 workers, rhosvd and sthosvd."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("zarr")
    shape, chunks = (50, 1500, 1000), (50, 250, 250)
    nbytes = np.prod(shape) * 4
    worker_memory = 250 * 2**20
    assert nbytes > worker_memory
    store = str(tmp_path / "tensor.zarr")
    rng = np.random.default_rng(0)
    # Planted rank (5, 5, 5) plus noise, written chunk by chunk (never whole in memory here).
    factors = [np.linalg.qr(rng.standard_normal((n, 5)))[0].astype(np.float32) for n in shape]
    core = rng.standard_normal((5, 5, 5)).astype(np.float32) * 1e4
    signal = tl.tucker_to_tensor(
        da.from_array(core),
        [da.from_array(f, chunks=(c, 5)) for f, c in zip(factors, chunks, strict=True)],
    )
    noise = da.random.default_rng(1).standard_normal(shape, chunks=chunks, dtype=np.float32)
    (signal + noise).astype(np.float32).to_zarr(store)

    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=worker_memory,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster),
    ):
        x = da.from_zarr(store)
        t = tl.sthosvd(x, (5, 5, 5), order=(0, 1, 2))
        r = tl.rhosvd(x, (5, 5, 5), seed=0)
        core, found, r_core = dask.compute(t.core, t.factors, r.core)
        norm2 = float(da.sum(x.astype(np.float64) ** 2).compute())
    # Both keep the planted signal: what is left is the noise (unit variance).
    expected = np.sqrt(np.prod(shape) / norm2)
    for c in (core, r_core):
        error = np.sqrt(1.0 - float(np.sum(c.astype(np.float64) ** 2)) / norm2)
        assert error == pytest.approx(expected, rel=1e-2)
    for f, g in zip(found, factors, strict=True):
        np.testing.assert_allclose(g @ (g.T @ f), f, atol=1e-3)
