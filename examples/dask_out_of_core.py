"""
Out of core with Dask
=====================

A tensor stored in chunks on disk (a zarr store) is decomposed without ever
being loaded whole: :mod:`tuckerlib` takes a Dask array as it takes a NumPy
array, and every pass over the tensor reads it chunk by chunk. The tensor
here is small (12 MB) so that the page builds in seconds; the same calls
run on tensors larger than memory, and on a ``dask.distributed`` cluster
(:doc:`/scaling`).
"""

import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

import tuckerlib as tl

# %%
# A tensor on disk
# ----------------
#
# A tensor of multilinear rank (8, 6, 4) plus a little noise, written chunk
# by chunk to a zarr store in a temporary directory.

rng = np.random.default_rng(0)
shape, ranks = (200, 150, 100), (8, 6, 4)
low_rank = tl.tucker_to_tensor(
    da.from_array(rng.standard_normal(ranks)),
    [da.from_array(rng.standard_normal((n, r))) for n, r in zip(shape, ranks, strict=True)],
)
noise = da.random.default_rng(1).standard_normal(shape, chunks=50)
store = Path(tempfile.mkdtemp()) / "tensor.zarr"
(low_rank + 0.01 * noise).astype(np.float32).rechunk(50).to_zarr(store)

x = da.from_zarr(store)
print(f"{x.shape} {x.dtype} tensor in {x.npartitions} chunks of {x.chunksize}")

# %%
# Ranks and decomposition
# -----------------------
#
# Dask's threads scheduler runs the passes here; a ``dask.distributed``
# client would run them on its workers. The spectra show the ranks; the
# ST-HOSVD reads the tensor twice, the randomized HOSVD three times.

with dask.config.set(scheduler="threads"):
    start = time.perf_counter()
    print("ranks keeping 99.9% of each mode's energy:", tl.energy_ranks(x, 0.999))
    t = tl.sthosvd(x, rank=ranks)
    r = tl.rhosvd(x, rank=ranks, seed=0)
    print(
        "factor 0 is a Dask array:",
        type(t.factors[0]).__name__,
        t.factors[0].shape,
    )
    print(
        f"ST-HOSVD relative error {float(tl.relative_error(x, t)):.4f}, "
        f"randomized {float(tl.relative_error(x, r)):.4f}"
    )
    print(f"{t.n_params:,} numbers instead of {x.size:,}")
    print(f"{time.perf_counter() - start:.1f} s")
