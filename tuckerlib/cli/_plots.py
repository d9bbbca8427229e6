"""PNG figures of an ``analyze`` report, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tuckerlib.cli._report import Report, TensorReport
from tuckerlib.cli.common import UsageError, atomic_output

__all__ = [
    "SUMMARY_FILE",
    "plot_files",
    "plot_summary",
    "plot_tensor",
    "pyplot",
    "spectra_file",
]

SUMMARY_FILE = "summary.png"
FLOOR = 1e-4


def pyplot() -> Any:
    """Import ``matplotlib.pyplot`` on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plots needs matplotlib (pip install 'tuckerlib[cli]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spectra_file(name: str) -> str:
    """File name of a tensor's spectrum figure (the name, made filesystem-safe)."""
    return "spectra_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"


def plot_files(names: Sequence[str], directory: Path) -> dict[str, Path]:
    """The figure file of each tensor in ``directory``, every one distinct.

    Names that become the same file name (``a/b`` and ``a_b``, or names
    that differ only in case, on a case-insensitive file system) get
    ``-2``, ``-3``... in tensor order, so no figure overwrites another.
    """
    taken = {SUMMARY_FILE.casefold()}
    files = {}
    for name in names:
        stem = spectra_file(name).removesuffix(".png")
        candidate, count = f"{stem}.png", 1
        while candidate.casefold() in taken:
            count += 1
            candidate = f"{stem}-{count}.png"
        taken.add(candidate.casefold())
        files[name] = directory / candidate
    return files


def _save(plt: Any, fig: Any, path: Path) -> Path:
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def plot_tensor(plt: Any, tensor: TensorReport, path: Path) -> Path:
    """Normalized singular values of every unfolding of one ΔW."""
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for mode, s in enumerate(tensor.spectra):
        top = s[0] if s.size and s[0] > 0 else 1.0
        # Spectra come from float32 Gram matrices: values below about
        # sqrt(eps32) ~ 3e-4 of the largest are rounding (or zero padding),
        # and carry under 1e-7 of the energy anyway.
        index = np.flatnonzero(s > FLOOR * top)
        ax.semilogy(index + 1, s[index] / top, marker=".", label=f"mode {mode} ({s.size})")
    ax.set_xscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_ylim(bottom=max(FLOOR, ax.get_ylim()[0]))
    shape = "x".join(str(d) for d in tensor.shape)
    ax.set_title(f"{tensor.name} ({tensor.kind}, {shape})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_summary(plt: Any, report: Report, directory: Path) -> Path:
    """Across layers: relative change, and Tucker vs LoRA error at equal budget."""
    tensors = report.tensors
    y = np.arange(len(tensors))
    height = max(2.5, 0.35 * len(tensors) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, height), sharey=True, layout="constrained")
    left.barh(y, [t.relative_delta or 0.0 for t in tensors], color="tab:gray")
    left.set_xlabel("||dW|| / ||W0||")
    left.set_yticks(y, [t.name for t in tensors], fontsize=8)
    left.invert_yaxis()
    right.barh(y - 0.2, [t.tucker_error for t in tensors], 0.4, label="Tucker (FLoRA)")
    right.barh(y + 0.2, [t.matrix_error for t in tensors], 0.4, label="matrix (LoRA)")
    right.set_xlabel(f"relative error at a rank-{report.options.lora_rank} LoRA budget")
    right.set_xlim(0, 1)
    right.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, directory / SUMMARY_FILE)
