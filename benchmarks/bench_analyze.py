"""Memory and speed of ``tuckerlib analyze``, and FLoRA extraction against LoRA.

Three tables:

(a) Peak resident memory and wall time of ``tuckerlib analyze`` on a
    synthetic checkpoint pair of about 1.5 GiB each, made of 64 MiB float32
    tensors (4096x4096). Target: peak RSS <= 3x the largest tensor plus the
    interpreter's baseline. The baseline is the peak RSS of the same
    interpreter after importing the CLI and running ``mode_spectra`` on a
    64x64 matrix, so that the libraries the analysis loads (NumPy, SciPy and
    their OpenBLAS builds) are resident in both measurements: their code and
    thread buffers are not data.
(b) A synthetic bfloat16 pair shaped like one LLaMA-7B decoder block (four
    4096x4096 attention projections, three 4096x11008 / 11008x4096 MLP
    matrices): wall time per tensor of the whole per-tensor step of
    ``analyze`` (``analyze_pair``: read ΔW, check it, the base norm, spectra,
    ranks, Tucker-vs-matrix errors) against the baseline
    ``numpy.linalg.svd(unfold(dW, n), compute_uv=False)`` for every mode n
    (for a matrix: of dW and of dW.T, on the float32 ΔW already in memory;
    reading is not charged to the baseline). The speed-up against a single
    such SVD is printed too. The spectra must agree with a float64 SVD to
    1e-6 of the total energy (max over k of the cumulative-energy
    difference). Target: >= 3x faster than the SVDs of every unfolding.
(c) On the bundled example's convolutions, the relative error of the ΔW of
    an adapter extracted by ``flora extract`` (budget of a rank-R LoRA)
    against an SVD-extracted LoRA with at most the same parameter count,
    reported as measured.

The synthetic checkpoints are written (streamed, one tensor at a time) to a
temporary directory, never to the repository. ``--quick`` shrinks (a) and
(b) for a smoke run (six 2048x2048 tensors; a 1/8-scale LLaMA block).

Peak memory is read from /proc (Linux).

Usage: python benchmarks/bench_analyze.py [--quick] [--workdir /tmp] [--only a,b,c]
                                         [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np

from tuckerlib import mode_spectra, unfold
from tuckerlib.cli._analyze import analyze_pair
from tuckerlib.cli._report import AnalyzeOptions
from tuckerlib.io import Checkpoint, open_checkpoint, read_delta

MIB = 2**20


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the raw 16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], code: str, arrays: Iterator[np.ndarray]
) -> None:
    """Write a safetensors file streaming ``arrays`` (one per shape, in order)."""
    itemsize = {"F32": 4, "BF16": 2}[code]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for array in arrays:
            handle.write(np.ascontiguousarray(array).tobytes())


def synthetic_pair(
    directory: Path, shapes: dict[str, tuple[int, ...]], code: str, seed: int = 0
) -> tuple[Path, Path]:
    """Base weights ~ N(0, 0.02²); tuned = base + a rank-16 update + small noise."""

    def tensors(role: str) -> Iterator[np.ndarray]:
        for index, shape in enumerate(shapes.values()):
            rng = np.random.default_rng([seed, index])
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if role == "tuned":
                rows, cols = shape[0], math.prod(shape[1:])
                u = rng.standard_normal((rows, 16), dtype=np.float32)
                v = rng.standard_normal((16, cols), dtype=np.float32)
                w += (u @ v).reshape(shape) * np.float32(1e-4)
                w += rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-4)
            yield bf16_bits(w) if code == "BF16" else w

    base, tuned = directory / "base.safetensors", directory / "tuned.safetensors"
    write_safetensors(base, shapes, code, tensors("base"))
    write_safetensors(tuned, shapes, code, tensors("tuned"))
    return base, tuned


def _peak_rss_mib(args: list[str]) -> tuple[float, float]:
    """Run the CLI in a fresh interpreter; return (peak RSS MiB, wall seconds)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking
    # parent across exec, so it would report this (larger) process. The
    # baseline is the interpreter with the CLI imported and the libraries
    # of the analysis loaded by a tiny call (their code and thread buffers
    # are not data).
    code = (
        "import re, time\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from tuckerlib import mode_spectra\n"
        "from tuckerlib.cli import main\n"
        "mode_spectra(np.eye(64, dtype=np.float32))\n"
        "start = time.perf_counter()\n"
        f"status = main({args!r}) if {bool(args)!r} else 0\n"
        "elapsed = time.perf_counter() - start\n"
        "status_text = Path('/proc/self/status').read_text()\n"
        "kib = re.search(r'VmHWM:\\s+(\\d+)', status_text).group(1)\n"
        "print(kib, elapsed, status)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kib, elapsed, status = out.stdout.split()[-3:]
    if status != "0":
        raise RuntimeError(out.stderr)
    return int(kib) / 1024, float(elapsed)


def table_a(workdir: Path, quick: bool) -> None:
    side, count = (2048, 6) if quick else (4096, 24)
    shapes = {f"layers.{i}.weight": (side, side) for i in range(count)}
    largest = side * side * 4 / MIB
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        start = time.perf_counter()
        base, tuned = synthetic_pair(Path(tmp), shapes, "F32")
        written = time.perf_counter() - start
        size = base.stat().st_size / MIB
        baseline, _ = _peak_rss_mib([])
        report = str(Path(tmp) / "report.json")
        peak, elapsed = _peak_rss_mib(
            ["analyze", str(base), str(tuned), "--format", "json", "--quiet", "--out", report]
        )
    ratio = (peak - baseline) / largest
    print(
        f"\n(a) analyze on a {size:.0f} MiB-per-checkpoint pair of {count} float32 "
        f"{side}x{side} tensors ({largest:.0f} MiB each; written in {written:.0f} s)"
    )
    print(f"{'interpreter baseline':<34}{baseline:>10.0f} MiB")
    print(f"{'analyze peak RSS':<34}{peak:>10.0f} MiB")
    print(f"{'(peak - baseline) / largest':<34}{ratio:>10.2f} x   target <= 3.00")
    print(f"{'analyze wall time':<34}{elapsed:>10.1f} s   ({elapsed / count:.2f} s per tensor)")


def _svd_spectra(delta: np.ndarray) -> list[np.ndarray]:
    return [np.linalg.svd(unfold(delta, n), compute_uv=False) for n in range(delta.ndim)]


def _energy_gap(s: np.ndarray, reference: np.ndarray) -> float:
    ours = np.cumsum(np.square(s[: reference.size].astype(np.float64)))
    ref = np.cumsum(np.square(reference.astype(np.float64)))
    return float(np.max(np.abs(ours - ref)) / ref[-1])


def _alternating(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each call, run in alternation so load changes hit all alike."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, samples in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def _time_tensor(
    base: Checkpoint, tuned: Checkpoint, name: str, options: AnalyzeOptions, repeats: int
) -> list[str]:
    start = time.perf_counter()
    delta = read_delta(base, tuned, name)
    read = time.perf_counter() - start
    start = time.perf_counter()
    spectra = [np.asarray(s) for s in mode_spectra(delta)]
    spectra_time = time.perf_counter() - start
    step_time, svd_time = _alternating(
        [lambda: analyze_pair(base, tuned, name, options), lambda: _svd_spectra(delta)], repeats
    )
    reference = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    gap = max(_energy_gap(s, reference) for s in spectra)
    return [
        name.split(".")[1], "x".join(map(str, delta.shape)), f"{read:.2f}",
        f"{spectra_time:.2f}", f"{step_time:.2f}", f"{svd_time:.2f}",
        f"{svd_time / step_time:.1f}x", f"{svd_time / delta.ndim / step_time:.1f}x", f"{gap:.1e}",
    ]  # fmt: skip


def table_b(workdir: Path, quick: bool, repeats: int) -> None:
    d, ff = (512, 1376) if quick else (4096, 11008)
    shapes = {
        **{f"self_attn.{p}_proj.weight": (d, d) for p in "qkvo"},
        "mlp.gate_proj.weight": (ff, d),
        "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff),
    }
    options = AnalyzeOptions()
    print(f"\n(b) bfloat16 LLaMA-7B-block-shaped pair (d={d}, ffn={ff}): seconds per tensor")
    header = ["tensor", "shape", "read dW", "spectra", "analyze", "SVD x2", "speed-up",
              "vs one SVD", "energy gap"]  # fmt: skip
    print("  ".join(f"{h:>12}" if i > 1 else f"{h:<22}" for i, h in enumerate(header)))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        base_path, tuned_path = synthetic_pair(Path(tmp), shapes, "BF16")
        with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
            for name in shapes:
                cells = _time_tensor(base, tuned, name, options, repeats)
                print("  ".join(f"{c:>12}" if i > 1 else f"{c:<22}" for i, c in enumerate(cells)))
    print(
        f"analyze (whole per-tensor step, reading included) and SVD x2: median of {repeats} "
        "alternating runs; read dW, spectra: one run each; speed-up = SVD x2 / analyze, "
        "target >= 3x; energy gap (vs float64 SVD) target <= 1e-6"
    )


def table_c() -> None:
    import flora  # imports torch: only for this table

    data = resources.files("tuckerlib") / "data"
    base, tuned = data / "digits_cnn_base.safetensors", data / "digits_cnn_tuned.safetensors"
    print(
        "\n(c) bundled example, conv layers: extracted FLoRA vs SVD LoRA, relative error of dW,"
        " both within the parameters of a rank-R LoRA"
    )
    header = ["R", "layer", "FLoRA ranks", "FLoRA params", "FLoRA err", "LoRA r", "LoRA params",
              "LoRA err"]  # fmt: skip
    print("  ".join(f"{h:>12}" for h in header))
    with (
        open_checkpoint(base) as base_ckpt,
        open_checkpoint(tuned) as tuned_ckpt,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for lora_rank in (2, 4, 8, 16):
            result = flora.extract(
                base_ckpt, tuned_ckpt, tmp, rank={"budget_like_lora": lora_rank}, include=r"^conv"
            )
            for layer in result.layers:
                delta = read_delta(base_ckpt, tuned_ckpt, layer.tensor).astype(np.float64)
                matrix = delta.reshape(delta.shape[0], -1)
                s = np.linalg.svd(matrix, compute_uv=False)
                # The budget is a rank-R LoRA: LoRA gets exactly it, FLoRA at most it.
                r = min(lora_rank, len(s))
                lora_error = math.sqrt(float(np.sum(s[r:] ** 2) / np.sum(s**2)))
                cells = [
                    str(lora_rank), layer.name, ",".join(map(str, layer.ranks)),
                    str(layer.n_params), f"{layer.relative_error:.3f}", str(r),
                    str(r * sum(matrix.shape)), f"{lora_error:.3f}",
                ]  # fmt: skip
                print("  ".join(f"{c:>12}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller tensors, for a smoke run")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--only", default="a,b,c", help="tables to run, e.g. 'a,c'")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats in table (b)")
    args = parser.parse_args()
    tables = set(args.only.split(","))
    if "a" in tables:
        table_a(args.workdir, args.quick)
    if "b" in tables:
        table_b(args.workdir, args.quick, args.repeats)
    if "c" in tables:
        table_c()


if __name__ == "__main__":
    main()
