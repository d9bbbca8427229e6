"""Dask against NumPy in memory, and out of core on a memory-limited local cluster.

Two tables, one run:

1. In memory: a float32 cube (default 400³, chunks of 100³, rank 10):
   ``sthosvd`` and ``rhosvd`` on a Dask array (threaded scheduler) against
   NumPy on the same data; time ratio (the scheduler's overhead) and error
   ratio.
2. Out of core: a float32 zarr array larger than the memory given to the
   Dask workers (default 6 GB on disk, 2 workers × 1.5 GB), rank 10 per
   mode: a plain ``da.sum`` pass for the read bandwidth, then ``rhosvd`` and
   ``sthosvd``: wall time, bytes read per pass, effective read bandwidth per
   pass against the plain pass, peak worker memory, and the relative error
   against an in-memory NumPy run on the same data (``--reference numpy``;
   it needs the tensor's size in free memory).

Errors come from ``‖x‖² − ‖G‖²`` (exact for orthonormal factors) with
``‖x‖²`` in float64. The data is a planted rank-10 tensor plus unit noise,
written chunk by chunk, so the tensor is never whole in memory except for
the reference run.

Usage::

    python benchmarks/bench_dask.py              # the full run (minutes, 6 GB of disk)
    python benchmarks/bench_dask.py --quick      # a small run that proves the script works
    python benchmarks/bench_dask.py --ooc-gb 3 --worker-gb 1 --workers 2 --dir /scratch
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

import tuckerlib as tl


def _planted(shape, chunks, rank, seed=0):
    rng = np.random.default_rng(seed)
    factors = [
        da.from_array(
            np.linalg.qr(rng.standard_normal((n, rank)))[0].astype(np.float32), chunks=(c, rank)
        )
        for n, c in zip(shape, chunks, strict=True)
    ]
    core = (
        rng.standard_normal((rank,) * len(shape)) * 10 * math.prod(shape) ** (1 / 2) / rank**1.5
    ).astype(np.float32)
    signal = tl.tucker_to_tensor(da.from_array(core), factors)
    noise = da.random.default_rng(seed + 1).standard_normal(shape, chunks=chunks, dtype=np.float32)
    return (signal + noise).astype(np.float32)


def _error(norm2: float, core) -> float:
    kept = float(np.sum(np.asarray(core, dtype=np.float64) ** 2))
    return math.sqrt(max(norm2 - kept, 0.0) / norm2)


def _best(call, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return min(times), result


def in_memory(size: int, chunk: int, rank: int, repeat: int) -> None:
    shape, chunks = (size,) * 3, (chunk,) * 3
    x = _planted(shape, chunks, rank).compute()
    norm2 = float(np.sum(x.astype(np.float64) ** 2))
    lazy = da.from_array(x, chunks=chunks)
    mib = x.nbytes / 2**20
    print(f"\n## In memory: {size}³ float32 ({mib:.0f} MiB), chunks {chunk}³, rank {rank}")
    print(
        "| algorithm | NumPy (s) | Dask (s) | time ratio | error NumPy | error Dask | error ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    calls = {
        "sthosvd": lambda a: tl.sthosvd(a, rank),
        "rhosvd": lambda a: tl.rhosvd(a, rank, seed=0),
    }
    with dask.config.set(scheduler="threads"):
        for name, call in calls.items():
            numpy_time, eager = _best(lambda call=call: call(x), repeat)
            dask_time, result = _best(lambda call=call: call(lazy).core.compute(), repeat)
            e_numpy, e_dask = _error(norm2, eager.core), _error(norm2, result)
            print(
                f"| {name} | {numpy_time:.2f} | {dask_time:.2f} | {dask_time / numpy_time:.2f}x "
                f"| {e_numpy:.6f} | {e_dask:.6f} | {e_dask / e_numpy:.6f} |"
            )


def _peak_worker_memory(client) -> float:
    """Largest resident memory any worker reported (sampled every 0.5 s), in bytes."""
    peaks = client.run(lambda dask_worker: max(dask_worker.monitor.quantities["memory"]))
    return max(peaks.values())


def out_of_core(args) -> None:
    import distributed

    side = math.ceil((args.ooc_gb * 2**30 / 4) ** (1 / 3) / args.ooc_chunk) * args.ooc_chunk
    shape, chunks = (side,) * 3, (args.ooc_chunk,) * 3
    nbytes = math.prod(shape) * 4
    free = shutil.disk_usage(args.dir).free
    if free < 1.2 * nbytes:
        raise SystemExit(
            f"{args.dir}: {free / 2**30:.1f} GiB free, need {1.2 * nbytes / 2**30:.1f} GiB"
        )
    workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_dask_"))
    store = str(workdir / "tensor.zarr")
    try:
        worker_bytes = int(args.worker_gb * 2**30)
        with dask.config.set(scheduler="threads"):
            _planted(shape, chunks, args.rank).to_zarr(store)
        times = nbytes / (args.workers * worker_bytes)
        print(
            f"\n## Out of core: {side}³ float32 zarr ({nbytes / 2**30:.2f} GiB), "
            f"chunks {args.ooc_chunk}³, {args.workers} workers × {args.worker_gb} GiB "
            f"({times:.2f}x their memory), rank {args.rank}"
        )
        with (
            distributed.LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                memory_limit=worker_bytes,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            x = da.from_zarr(store)
            plain, _ = _best(lambda: float(da.sum(x).compute()), 1)
            norm2 = float(da.sum(x.astype(np.float64) ** 2).compute())
            bandwidth = nbytes / plain
            print(
                "| run | passes | wall (s) | bytes read per pass | GB/s per pass "
                "| vs plain pass | peak worker memory |"
            )
            print("|---|---|---|---|---|---|---|")
            print(
                f"| plain da.sum | 1 | {plain:.1f} | {nbytes / 1e9:.2f} GB | {bandwidth / 1e9:.2f} "
                f"| 1.00 | {_peak_worker_memory(client) / 2**20:.0f} MiB |"
            )
            results = {}
            for name, passes, call in [
                ("rhosvd", 3, lambda: tl.rhosvd(x, args.rank, seed=0)),
                ("sthosvd", 2, lambda: tl.sthosvd(x, args.rank)),
            ]:
                wall, tucker = _best(lambda call=call: call().core.compute(), 1)
                results[name] = tucker
                per_pass = nbytes * passes / wall
                peak = _peak_worker_memory(client) / 2**20
                print(
                    f"| {name} | {passes} | {wall:.1f} | {nbytes / 1e9:.2f} GB "
                    f"| {per_pass / 1e9:.2f} | {per_pass / bandwidth:.2f} | {peak:.0f} MiB |"
                )
        print("\n| algorithm | error (Dask) | error (NumPy, same data) | ratio |")
        print("|---|---|---|---|")
        reference = {}
        if args.reference == "numpy":
            data = da.from_zarr(store).compute()
            reference = {
                "rhosvd": tl.rhosvd(data, args.rank, seed=0).core,
                "sthosvd": tl.sthosvd(data, args.rank).core,
            }
            del data
        for name, core in results.items():
            error = _error(norm2, core)
            if name in reference:
                expected = _error(norm2, reference[name])
                print(f"| {name} | {error:.6f} | {expected:.6f} | {error / expected:.6f} |")
            else:
                print(f"| {name} | {error:.6f} | (not run) | |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=400, help="side of the in-memory cube")
    parser.add_argument("--chunk", type=int, default=100, help="chunk side")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="in-memory timings: best of")
    parser.add_argument("--ooc-chunk", type=int, default=100, help="chunk side out of core")
    parser.add_argument("--ooc-gb", type=float, default=6.0, help="size of the zarr tensor (GiB)")
    parser.add_argument(
        "--worker-gb", type=float, default=1.5, help="memory limit per worker (GiB)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the zarr store goes")
    parser.add_argument("--reference", choices=["numpy", "none"], default="numpy")
    parser.add_argument("--skip-out-of-core", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: 200³ in memory, 0.8 GiB out of core on 2 workers × 0.25 GiB",
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.chunk, args.repeat = 200, 50, 2
        args.ooc_gb, args.worker_gb = 0.75, 0.25
    in_memory(args.size, args.chunk, args.rank, args.repeat)
    if not args.skip_out_of_core:
        out_of_core(args)


if __name__ == "__main__":
    main()
