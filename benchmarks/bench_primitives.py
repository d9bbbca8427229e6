"""Speed of the mode product against a plain GEMM and TensorLy; cost of product order.

Usage (``make bench`` runs it with the defaults)::

    .venv/bin/python benchmarks/bench_primitives.py [--repeats 7] [--threads N]

Every comparison alternates its samples (A, B, A, B, ...) and reports the
median of the per-pair time ratios, so that load drifting on a shared
machine hits both sides alike; a baseline timed apart drifts by 30% here.

Tables:

1. ``mode_product`` of a 256×256×256 tensor with a 128×256 matrix in each
   mode, NumPy float64 and float32, as a ratio to a plain GEMM of the same
   flops (128×256 @ 256×65536) and to ``tensorly.tenalg.mode_dot``.
   Targets: <= 1.10× GEMM in the first and last modes, <= 1.20× in the
   middle mode.
   1b. The two ways to do the middle mode: a batched matmul (what
   ``mode_product`` does) and one transpose copy followed by one GEMM.
   1c. Other float64 middle-mode arrangements tried against the batched
   matmul's overhead (all slower or no better).
2. The same on PyTorch CPU tensors, against ``torch.matmul``.
3. ``multi_mode_product`` (cheapest order) against the same products applied
   in mode order, where the order matters.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorly
import torch
from tensorly.tenalg import mode_dot

import tuckerlib
from tuckerlib import mode_product, multi_mode_product

SHAPE = (256, 256, 256)
RANK = 128
TARGETS = {0: 1.10, 1: 1.20, 2: 1.10}


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, ...]:
    """Median time of ``a``, of ``b`` and of the per-pair ratio ``a / b``, interleaved."""
    a(), b()  # warm-up: allocator, BLAS buffers, lazy imports
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_seconds(a))
        times_b.append(_seconds(b))
    ratios = [ta / tb for ta, tb in zip(times_a, times_b, strict=True)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


@contextlib.contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Limit BLAS and torch threads (for measurements only)."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(previous)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        model = names[0] if names else model
    return (
        f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"NumPy {np.__version__}, torch {torch.__version__}, TensorLy {tensorly.__version__}, "
        f"tuckerlib {tuckerlib.__version__}"
    )


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print(_row(header, widths))
    print(_row(["-" * w for w in widths], widths))
    for r in rows:
        print(_row(r, widths))


def numpy_modes(repeats: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float64", "float32"):
        x = rng.standard_normal(SHAPE).astype(dtype)
        m = rng.standard_normal((RANK, SHAPE[0])).astype(dtype)
        b = rng.standard_normal((SHAPE[0], SHAPE[1] * SHAPE[2])).astype(dtype)
        for mode in range(3):
            ours, gemm, vs_gemm = alternate(
                lambda x=x, m=m, n=mode: mode_product(x, m, n), lambda m=m, b=b: m @ b, repeats
            )
            _, tly, vs_tly = alternate(
                lambda x=x, m=m, n=mode: mode_product(x, m, n),
                lambda x=x, m=m, n=mode: mode_dot(x, m, n),
                repeats,
            )
            ok = "yes" if vs_gemm <= TARGETS[mode] else "NO"
            rows.append(
                [
                    dtype,
                    str(mode),
                    f"{ours * 1e3:.1f}",
                    f"{gemm * 1e3:.1f}",
                    f"{vs_gemm:.2f}",
                    f"{tly * 1e3:.1f}",
                    f"{vs_tly:.2f}",
                    f"<= {TARGETS[mode]:.2f}",
                    ok,
                ]
            )
    print_table(
        "1. NumPy mode_product, 256x256x256 x 128x256 (median of alternated pairs)",
        ["dtype", "mode", "ms", "GEMM ms", "/GEMM", "TensorLy ms", "/TensorLy", "target", "met"],
        rows,
    )


def _middle_by_copy(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The alternative middle-mode product: one transpose copy, then one GEMM."""
    moved = np.ascontiguousarray(np.moveaxis(x, 1, 0)).reshape(x.shape[1], -1)
    return np.moveaxis((m @ moved).reshape(m.shape[0], x.shape[0], x.shape[2]), 0, 1)


def middle_alternatives(repeats: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float64", "float32"):
        x = rng.standard_normal(SHAPE).astype(dtype)
        m = rng.standard_normal((RANK, SHAPE[1])).astype(dtype)
        b = rng.standard_normal((SHAPE[1], SHAPE[0] * SHAPE[2])).astype(dtype)
        _, _, batched = alternate(lambda x=x, m=m: np.matmul(m, x), lambda m=m, b=b: m @ b, repeats)
        _, _, copied = alternate(
            lambda x=x, m=m: _middle_by_copy(x, m), lambda m=m, b=b: m @ b, repeats
        )
        rows.append([dtype, f"{batched:.2f}", f"{copied:.2f}"])
    print_table(
        "1b. NumPy middle mode: batched matmul (used) vs one transpose copy + GEMM, /GEMM",
        ["dtype", "batched /GEMM", "copy /GEMM"],
        rows,
    )


def _split_batch(m: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    y = np.empty((x.shape[0], m.shape[0], x.shape[2]), x.dtype)
    for i in range(0, x.shape[0], size):
        np.matmul(m, x[i : i + size], out=y[i : i + size])
    return y


def _split_columns(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], m.shape[0], x.shape[2]), x.dtype)
    half = x.shape[2] // 2
    for part in (slice(0, half), slice(half, None)):
        np.matmul(m, x[:, :, part], out=y[:, :, part])
    return y


def _blocked_copies(m: np.ndarray, x: np.ndarray, size: int = 4) -> np.ndarray:
    """Cache-sized blocks of slices, transposed into a buffer, one GEMM per block."""
    p, j, q = x.shape
    y = np.empty((p, m.shape[0], q), x.dtype)
    block = np.empty((j, size, q), x.dtype)
    out = np.empty((m.shape[0], size, q), x.dtype)
    for i in range(0, p, size):
        np.copyto(block, x[i : i + size].transpose(1, 0, 2))
        np.matmul(m, block.reshape(j, size * q), out=out.reshape(m.shape[0], size * q))
        np.copyto(y[i : i + size], out.transpose(1, 0, 2))
    return y


def _two_threads(pool: ThreadPoolExecutor, m: np.ndarray, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], m.shape[0], x.shape[2]), x.dtype)
    half = x.shape[0] // 2
    parts = (slice(0, half), slice(half, None))
    futures = [pool.submit(np.matmul, m, x[part], out=y[part]) for part in parts]
    for future in futures:
        future.result()
    return y


def middle_arrangements(repeats: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE)
    m = rng.standard_normal((RANK, SHAPE[1]))
    b = rng.standard_normal((SHAPE[1], SHAPE[0] * SHAPE[2]))
    with ThreadPoolExecutor(2) as pool:
        arrangements = {
            "batched matmul (used)": lambda: np.matmul(m, x),
            "batched, preallocated out=": lambda: np.matmul(m, x, out=np.empty((256, RANK, 256))),
            "16 calls of 16 slices": lambda: _split_batch(m, x, 16),
            "2 calls, half the columns each": lambda: _split_columns(m, x),
            "transposed, x[i].T @ M.T": lambda: np.matmul(x.transpose(0, 2, 1), m.T),
            "blocks of 4 slices copied, 1 GEMM each": lambda: _blocked_copies(m, x),
            "2 Python threads, half the batch each": lambda: _two_threads(pool, m, x),
        }
        rows = [
            [name, f"{alternate(fn, lambda: m @ b, repeats)[2]:.2f}"]
            for name, fn in arrangements.items()
        ]
    print_table("1c. NumPy float64 middle mode, other arrangements, /GEMM", ["how", "/GEMM"], rows)


def torch_modes(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(SHAPE, generator=gen, dtype=dtype)
        m = torch.randn(RANK, SHAPE[0], generator=gen, dtype=dtype)
        b = torch.randn(SHAPE[0], SHAPE[1] * SHAPE[2], generator=gen, dtype=dtype)
        for mode in range(3):
            ours, gemm, ratio = alternate(
                lambda x=x, m=m, n=mode: mode_product(x, m, n), lambda m=m, b=b: m @ b, repeats
            )
            name = str(dtype).removeprefix("torch.")
            rows.append([name, str(mode), f"{ours * 1e3:.1f}", f"{gemm * 1e3:.1f}", f"{ratio:.2f}"])
    print_table(
        "2. PyTorch CPU mode_product, same shapes, against torch.matmul of the same flops",
        ["dtype", "mode", "ms", "GEMM ms", "/GEMM"],
        rows,
    )


def product_order(repeats: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 512, 512))
    # Projecting onto factors: mode 0 keeps its size, modes 1 and 2 shrink 32x and 64x,
    # so mode order does its most expensive product first.
    factors = [rng.standard_normal((64, 64)), rng.standard_normal((512, 16))]
    factors.append(rng.standard_normal((512, 8)))
    core = rng.standard_normal((8, 16, 64))
    up = [rng.standard_normal((512, 8)), rng.standard_normal((512, 16))]
    up.append(rng.standard_normal((64, 64)))

    def in_mode_order(t: Any, mats: list[Any], transpose: bool) -> Any:
        for n, mat in enumerate(mats):
            t = mode_product(t, mat, n, transpose=transpose)
        return t

    cases = [
        ("project 64x512x512 -> 64x16x8", x, factors, True),
        ("reconstruct 8x16x64 -> 512x512x64", core, up, False),
    ]
    rows = []
    for label, t, mats, transpose in cases:
        best, ordered, ratio = alternate(
            lambda t=t, mats=mats, tr=transpose: multi_mode_product(t, mats, transpose=tr),
            lambda t=t, mats=mats, tr=transpose: in_mode_order(t, mats, tr),
            repeats,
        )
        rows.append([label, f"{best * 1e3:.1f}", f"{ordered * 1e3:.1f}", f"{1 / ratio:.1f}x"])
    print_table(
        "3. multi_mode_product (cheapest order) vs the same products in mode order, float64",
        ["case", "multi ms", "mode order ms", "speed-up"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternated pairs per comparison")
    parser.add_argument("--threads", type=int, default=None, help="limit BLAS/torch threads")
    args = parser.parse_args()
    print(machine())
    print(f"threads: {args.threads or 'library default'}; repeats: {args.repeats}")
    with limited_threads(args.threads):
        numpy_modes(args.repeats)
        middle_alternatives(args.repeats)
        middle_arrangements(args.repeats)
        torch_modes(args.repeats)
        product_order(args.repeats)


if __name__ == "__main__":
    main()
