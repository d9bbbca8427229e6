"""Summaries, tables and the figure of the quality benchmark."""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ANCHORS",
    "Paired",
    "Summary",
    "lr_table",
    "machine",
    "markdown",
    "paired",
    "paired_markdown",
    "study_arguments",
    "study_result",
    "summarize",
    "timing_table",
    "write_csv",
    "write_figure",
    "write_json",
    "write_paired",
    "write_study",
    "write_timing",
]


@dataclass(frozen=True)
class Summary:
    """Mean and spread over seeds of one (study, method, budget, setting) cell."""

    study: str
    method: str
    setting: str
    budget_rank: int | None
    lr: float
    n_seeds: int
    n_trainable: int
    percent_of_model: float
    test_mean: float
    test_std: float
    val_mean: float
    ms_per_step: float
    memory_kib: float
    ranks: str


#: PEFT's methods that FLoRA is compared against; the best of them per budget is "best PEFT".
ANCHORS = ("lora", "dora", "loha", "lokr")


@dataclass(frozen=True)
class Paired:
    """One method's test accuracy minus a reference's at one budget, paired by seed."""

    method: str
    setting: str
    budget_rank: int
    reference: str
    n_seeds: int
    mean: float
    se: float

    @property
    def verdict(self) -> str:
        """``"ahead"``, ``"level"`` (within one standard error) or ``"behind"``."""
        if abs(self.mean) <= self.se:
            return "level"
        return "ahead" if self.mean > 0 else "behind"


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _accuracy_cell(summary: Summary) -> str:
    # A single run has no spread to report: "± 0.000" would claim one.
    if summary.n_seeds == 1:
        return f"{summary.test_mean:.3f}"
    if summary.test_std == 0:
        return f"{summary.test_mean:.3f} (every seed)"
    if summary.test_std < 5e-4:
        return f"{summary.test_mean:.3f} ± <0.001"
    return f"{summary.test_mean:.3f} ± {summary.test_std:.3f}"


def summarize(rows: Iterable[dict], n_model: int) -> list[Summary]:
    """Group run rows by (study, method, setting, budget) and average over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["study"], row["method"], row["setting"], row["budget_rank"])
        groups.setdefault(key, []).append(row)
    summaries = []
    for (study, method, setting, budget_rank), members in groups.items():
        test = [m["test_accuracy"] for m in members]
        summaries.append(
            Summary(
                study=study,
                method=method,
                setting=setting,
                budget_rank=budget_rank,
                lr=members[0]["lr"],
                n_seeds=len(members),
                n_trainable=members[0]["n_trainable"],
                percent_of_model=100.0 * members[0]["n_trainable"] / n_model,
                test_mean=float(np.mean(test)),
                test_std=_std(test),
                val_mean=float(np.mean([m["val_accuracy"] for m in members])),
                ms_per_step=1e3 * float(np.mean([m["seconds_per_step"] for m in members])),
                memory_kib=members[0]["memory_bytes"] / 1024,
                ranks=members[0]["ranks"],
            )
        )
    return summaries


def _paired(
    main: dict[tuple[str, int], dict[int, float]], method: str, budget: int, reference: str
) -> tuple[int, float, float]:
    mine, theirs = main[method, budget], main[reference, budget]
    seeds = sorted(mine.keys() & theirs.keys())
    diffs = [mine[s] - theirs[s] for s in seeds]
    se = _std(diffs) / np.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return len(diffs), float(np.mean(diffs)), float(se)


def paired(rows: Iterable[dict], labels: dict[str, str]) -> list[Paired]:
    """Every FLoRA method against LoRA and against the best PEFT anchor, per budget.

    Differences of test accuracy are paired by seed (same seed, same
    minibatch order); the standard error is the sample standard deviation
    of the differences over the square root of their number. The best
    anchor at a budget is the PEFT method (:data:`ANCHORS`) of the highest
    mean test accuracy there.
    """
    main: dict[tuple[str, int], dict[int, float]] = {}
    for row in rows:
        if row["study"] == "main" and row["budget_rank"] is not None:
            main.setdefault((row["method"], row["budget_rank"]), {})[row["seed"]] = row[
                "test_accuracy"
            ]
    budgets = sorted({b for _, b in main})
    found = []
    for budget in budgets:
        anchors = [a for a in ANCHORS if (a, budget) in main]
        best = max(anchors, key=lambda a: np.mean(list(main[a, budget].values())), default=None)
        for method in (m for m in labels if m.startswith("flora") and (m, budget) in main):
            for reference in dict.fromkeys(r for r in ("lora", best) if r is not None):
                n, mean, se = _paired(main, method, budget, reference)
                found.append(Paired(method, labels[method], budget, reference, n, mean, se))
    return found


def _paired_cells(found: Sequence[Paired], labels: dict[str, str]) -> list[list[str]]:
    return [
        [
            p.setting,
            str(p.budget_rank),
            labels.get(p.reference, p.reference),
            f"{p.mean:+.3f}",
            f"{p.se:.3f}",
            str(p.n_seeds),
            p.verdict,
        ]
        for p in found
    ]


_PAIRED_HEADER = ("Method", "Budget (LoRA r)", "Against", "Paired Δ", "SE", "Seeds", "Verdict")


def paired_markdown(found: Sequence[Paired], labels: dict[str, str] | None = None) -> str:
    """The paired differences as a Markdown table."""
    lines = ["| " + " | ".join(_PAIRED_HEADER) + " |", "|" + "---|" * len(_PAIRED_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _paired_cells(found, labels or {})]
    return "\n".join(lines)


def write_paired(path: Path, found: Sequence[Paired], labels: dict[str, str]) -> None:
    """Write the paired differences for ``.. csv-table::``."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_PAIRED_HEADER)
        writer.writerows(_paired_cells(found, labels))


def study_result(
    rows: list[dict],
    lrs: dict[tuple[str, int | None], float],
    n_model: int,
    labels: dict[str, str],
    *,
    studies: tuple[str, ...],
    started: float,
    device: str,
    **extra: object,
) -> dict:
    """What a study script returns and ``write_study`` writes, from its rows and chosen rates.

    The summaries of each of ``studies`` (``"main"``, ``"sweep"``, ...), the
    paired differences of ``labels``' methods, the chosen rates, the raw rows,
    the model size, ``extra`` facts of the study, and the seconds since
    ``started`` (a ``time.perf_counter()`` reading).
    """
    summaries = summarize(rows, n_model)
    return {
        "summaries": {s: [x for x in summaries if x.study == s] for s in studies},
        "paired": paired(rows, labels),
        "lrs": lr_table(lrs),
        "rows": rows,
        "n_model": n_model,
        **extra,
        "seconds": time.perf_counter() - started,
        "device": device,
    }


def lr_table(chosen: dict[tuple[str, int | None], float]) -> dict[str, dict[str, float]]:
    """The chosen learning rates as ``{method: {budget: lr}}`` (JSON-friendly keys)."""
    table: dict[str, dict[str, float]] = {}
    for (method, budget), lr in chosen.items():
        table.setdefault(method, {})["n/a" if budget is None else str(budget)] = lr
    return table


_COLUMNS = (
    ("Method", lambda s: s.setting),
    ("Budget (LoRA r)", lambda s: "n/a" if s.budget_rank is None else str(s.budget_rank)),
    ("Trainable params", lambda s: f"{s.n_trainable:,}"),
    ("% of model", lambda s: f"{s.percent_of_model:.2f}"),
    ("Test accuracy", _accuracy_cell),
    ("Val accuracy", lambda s: f"{s.val_mean:.3f}"),
    ("LR", lambda s: f"{s.lr:g}"),
    ("Seeds", lambda s: str(s.n_seeds)),
    ("ms / step", lambda s: f"{s.ms_per_step:.1f}"),
    ("Train memory (KiB)", lambda s: f"{s.memory_kib:,.0f}"),
)


def _cells(summaries: Sequence[Summary]) -> list[list[str]]:
    return [[render(s) for _, render in _COLUMNS] for s in summaries]


def write_csv(path: Path, summaries: Sequence[Summary]) -> None:
    """Write one table (header row, one row per summary) for ``.. csv-table::``."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in _COLUMNS])
        writer.writerows(_cells(summaries))


def markdown(summaries: Sequence[Summary]) -> str:
    """The same table as Markdown, for the terminal and reports."""
    header = [name for name, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _cells(summaries)]
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Write raw runs and metadata, sorted keys, for reruns and diffs."""
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_figure(
    path: Path,
    summaries: Sequence[Summary],
    labels: dict[str, str],
    task: str = "rotated digits",
) -> None:
    """Test accuracy against trainable parameters, one line per method, ±1 std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method, label in labels.items():
        points = sorted(
            (s for s in summaries if s.study == "main" and s.method == method),
            key=lambda s: s.n_trainable,
        )
        if not points:
            continue
        ax.errorbar(
            [s.n_trainable for s in points],
            [s.test_mean for s in points],
            yerr=[s.test_std for s in points],
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.2,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test accuracy, {task}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(device: str = "cpu") -> dict:
    """Where a run happened: processor, accelerator, versions, torch threads and the load."""
    import os
    import platform

    import torch

    accelerator = {}
    if device.startswith("cuda"):
        accelerator = {"device": device, "accelerator": torch.cuda.get_device_name()}
    return {
        **accelerator,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("peft", "transformers")},
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }


def write_study(out: Path, prefix: str, result: dict, labels: dict[str, str], task: str) -> None:
    """Write ``{prefix}.png``, ``{prefix}_{study}.csv`` per study and ``{prefix}_runs.json``."""
    out.mkdir(parents=True, exist_ok=True)
    for study, summaries in result["summaries"].items():
        write_csv(out / f"{prefix}_{study}.csv", summaries)
    write_paired(out / f"{prefix}_paired.csv", result["paired"], labels)
    write_figure(out / f"{prefix}.png", result["summaries"]["main"], labels, task)
    meta = {k: v for k, v in result.items() if k not in ("summaries", "paired")}
    meta["machine"] = machine(result.get("device", "cpu"))
    write_json(out / f"{prefix}_runs.json", meta)
    # The study is complete: its progress log (_quality_study.progress_log) is spent.
    (out / f"{prefix}_progress.jsonl").unlink(missing_ok=True)


def write_timing(out: Path | None, prefix: str, rows: Sequence[dict]) -> None:
    """Write a timing-only run to ``{prefix}_timing.json`` in ``out`` (nothing without ``out``)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{prefix}_timing.json", {"rows": list(rows), "machine": machine()})


def study_arguments(
    argv: list[str] | None,
    description: str,
    *,
    timing: str | None = None,
    candidates: bool = False,
) -> argparse.Namespace:
    """The options every quality script takes.

    ``--timing-only`` where ``timing`` says how long it takes, ``--candidates``
    where the script has init candidates beyond FLoRA's default.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke-size run (seconds)")
    if timing is not None:
        parser.add_argument(
            "--timing-only", action="store_true", help=f"only time training steps ({timing})"
        )
    if candidates:
        parser.add_argument(
            "--candidates", action="store_true", help="also run FLoRA's init candidates"
        )
    parser.add_argument("--out", type=Path, help="folder for the figure, tables and raw runs")
    parser.add_argument(
        "--jobs", type=int, default=2, help="training runs at a time, one process each (default 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per run (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="where runs train: cpu (default) or cuda")
    return parser.parse_args(argv)


def timing_table(rows: Sequence[dict]) -> str:
    """Markdown table of a timing-only run (one row per method)."""
    header = [
        "Method",
        "Budget (LoRA r)",
        "Trainable params",
        "ms / step (median)",
        "min",
        "max",
        "Train memory (KiB)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["setting"],
            "n/a" if r["budget_rank"] is None else str(r["budget_rank"]),
            f"{r['n_trainable']:,}",
            f"{1e3 * r['median_seconds']:.1f}",
            f"{1e3 * r['min_seconds']:.1f}",
            f"{1e3 * r['max_seconds']:.1f}",
            f"{r['memory_bytes'] / 1024:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
