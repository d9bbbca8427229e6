"""Charts of the benchmark tables, drawn at build time from ``_static/benchmarks/*.csv``.

The benchmarks page renders the same CSV files as tables (``csv-table``), so
replacing a CSV with a new run's numbers updates the table and its chart
together. Each function draws one figure on the current matplotlib figure
(the ``plot`` directive saves it).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

DATA = Path(__file__).resolve().parent.parent / "_static" / "benchmarks"


def read(name: str) -> list[dict[str, str]]:
    """The rows of ``_static/benchmarks/<name>.csv`` as dicts of strings."""
    with open(DATA / f"{name}.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def number(text: str) -> float:
    """The leading number of a cell such as ``"56.0×"`` or ``"16,448"``; NaN for ``n/a``."""
    match = re.match(r"\s*([-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?)", text)
    return float(match.group(1).replace(",", "")) if match else float("nan")


def grouped_bars(
    rows: list[dict[str, str]],
    group: str,
    series: str,
    value: str,
    *,
    ylabel: str,
    title: str,
    reference: float | None = None,
    log: bool = False,
    size: tuple[float, float] = (7.0, 3.8),
) -> None:
    """One cluster of bars per value of ``group``, one bar per value of ``series``."""
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    cells = {(r[group], r[series]): number(r[value]) for r in rows}
    fig, ax = plt.subplots(figsize=size)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        heights = [cells.get((g, name), np.nan) for g in groups]
        ax.bar(
            np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, heights, width, label=name
        )
    if reference is not None:
        ax.axhline(reference, color="0.3", linewidth=0.8, linestyle="--")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Below the axes, so that no bar hides behind it.
    ax.legend(
        fontsize="small",
        ncols=min(len(names), 4),
        frameon=False,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
    )
    fig.tight_layout()


def lines(
    rows: list[dict[str, str]],
    x: str,
    curves: dict[str, tuple[str, str]],
    *,
    split: str,
    xlabel: str,
    ylabel: str,
    title: str,
    size: tuple[float, float] = (7.0, 3.2),
) -> None:
    """One panel per value of ``split``; ``curves`` maps a label to (column, line style)."""
    panels = list(dict.fromkeys(r[split] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=size, sharey=True)
    for ax, panel in zip(np.atleast_1d(axes), panels, strict=True):
        subset = [r for r in rows if r[split] == panel]
        xs = [number(r[x]) for r in subset]
        for label, (column, style) in curves.items():
            ax.plot(xs, [number(r[column]) for r in subset], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_title(panel, fontsize="medium")
        ax.set_xlabel(xlabel)
    np.atleast_1d(axes)[0].set_ylabel(ylabel)
    np.atleast_1d(axes)[0].legend(fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
