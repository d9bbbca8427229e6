"""Render an ``analyze`` report as an aligned table, Markdown or JSON."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Callable, Sequence

from tuckerlib.analysis import TENSOR_KINDS
from tuckerlib.cli._report import Report, TensorReport
from tuckerlib.cli.common import describe

__all__ = ["FORMATS", "render"]

LEGEND = (
    "ranks@E: smallest rank of each mode's unfolding keeping a fraction E of ||dW||^2.",
    "eff. ranks: effective rank of each mode (entropy of its spectrum, Roy & Vetterli 2007).",
    "budget: parameters of a rank-{R} LoRA of the tensor's (out, rest) reshape.",
    "FLoRA ranks: Tucker ranks within the budget that keep the most energy.",
    "Tucker err, LoRA err: ||dW - approx|| / ||dW|| of the Tucker approximation at the FLoRA "
    "ranks and of the best rank-r matrix of the (out, rest) reshape, within the same budget.",
)


def _ints(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:#.3g}"


def _count(n: int) -> str:
    for factor, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= factor:
            return f"{n / factor:.3g}{suffix}"
    return str(n)


def _tensor_columns(report: Report) -> list[tuple[str, Callable[[TensorReport], str]]]:
    columns: list[tuple[str, Callable[[TensorReport], str]]] = [
        ("tensor", lambda t: t.name),
        ("kind", lambda t: t.kind),
        ("shape", lambda t: "x".join(str(d) for d in t.shape)),
        ("dW norm", lambda t: _number(t.delta_norm)),
        ("rel. dW", lambda t: _number(t.relative_delta)),
    ]
    for key, _ in report.options.energies:
        columns.append((f"ranks@{key}", lambda t, key=key: _ints(t.energy_ranks[key])))
    columns += [
        ("eff. ranks", lambda t: ",".join(f"{r:.1f}" for r in t.effective_ranks)),
        ("budget", lambda t: _count(t.budget)),
        ("FLoRA ranks", lambda t: _ints(t.recommended_ranks)),
        ("Tucker err", lambda t: f"{t.tucker_error:.3f}"),
        ("LoRA err", lambda t: f"{t.matrix_error:.3f}"),
    ]
    return columns + report.extra_columns()


def _pooled(tensors: list[TensorReport], attr: str) -> float:
    # The relative error of all these ΔW taken together as one vector.
    total = sum(t.delta_norm**2 for t in tensors)
    return math.sqrt(sum((getattr(t, attr) * t.delta_norm) ** 2 for t in tensors) / total)


def _summary_rows(report: Report) -> list[list[str]]:
    groups = [(kind, [t for t in report.tensors if t.kind == kind]) for kind in TENSOR_KINDS]
    groups = [(kind, ts) for kind, ts in groups if ts]
    if len(groups) > 1:
        groups.append(("all", report.tensors))
    rows = []
    for kind, ts in groups:
        base2 = sum(t.base_norm**2 for t in ts)
        delta2 = sum(t.delta_norm**2 for t in ts)
        wins = sum(t.tucker_error < t.matrix_error for t in ts)
        rows.append(
            [
                kind,
                str(len(ts)),
                _count(sum(math.prod(t.shape) for t in ts)),
                _number(math.sqrt(delta2 / base2) if base2 > 0 else None),
                f"{_pooled(ts, 'tucker_error'):.3f}",
                f"{_pooled(ts, 'matrix_error'):.3f}",
                f"{wins} of {len(ts)}",
            ]
        )
    return rows


SUMMARY_HEADER = ["kind", "tensors", "params", "rel. dW", "Tucker err", "LoRA err", "Tucker better"]


def _aligned(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _skipped_groups(report: Report) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, reason in report.skipped:
        groups.setdefault(reason, []).append(name)
    return groups


def _table(report: Report) -> str:
    what, sources = report.heading()
    width = max(len(label) for label, _ in sources)
    lines = [
        f"Rank structure of {what}: {len(report.tensors)} tensors analyzed, "
        f"{len(report.skipped)} skipped",
        *(f"  {label.ljust(width)}  {_display_path(path)}" for label, path in sources),
    ]
    if report.description:
        lines += textwrap.wrap(
            report.description, 96, initial_indent="  about  ", subsequent_indent=" " * 9
        )
    lines.append("")
    if report.tensors:
        columns = _tensor_columns(report)
        rows = [[cell(t) for _, cell in columns] for t in report.tensors]
        lines += _aligned([title for title, _ in columns], rows)
        lines += ["", "Summary by kind (errors of all dW of a kind taken together)"]
        lines += _aligned(SUMMARY_HEADER, _summary_rows(report), indent="  ")
        lines.append("")
    if report.skipped:
        lines.append(f"Skipped {len(report.skipped)} tensors")
        lines += [
            f"  {reason}: {describe(names)}" for reason, names in _skipped_groups(report).items()
        ]
        lines.append("")
    if report.tensors:
        for text in (*report.notes(), *LEGEND):
            lines += textwrap.wrap(
                text.format(R=report.options.lora_rank), 96, subsequent_indent="  "
            )
    return "\n".join(lines).rstrip() + "\n"


def _display_path(path: str) -> str:
    # Paths below the working directory (the bundled example in a source
    # checkout) read better relative.
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return path if relative.startswith("..") else relative


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def _markdown(report: Report) -> str:
    what, sources = report.heading()
    lines = [
        f"## Rank structure of {what}",
        "",
        *(f"- {label}: `{_display_path(path)}`" for label, path in sources),
    ]
    if report.description:
        lines.append(f"- about: {report.description}")
    lines.append(f"- {len(report.tensors)} tensors analyzed, {len(report.skipped)} skipped")
    lines.append("")
    if report.tensors:
        columns = _tensor_columns(report)
        rows = [[cell(t) for _, cell in columns] for t in report.tensors]
        rows = [[f"`{row[0]}`", *row[1:]] for row in rows]
        lines += _md_table([title for title, _ in columns], rows)
        lines += ["", "### Summary by kind", ""]
        lines += _md_table(SUMMARY_HEADER, _summary_rows(report))
        lines.append("")
    if report.skipped:
        lines += ["### Skipped", ""]
        lines += _md_table(["tensor", "reason"], [[f"`{n}`", r] for n, r in report.skipped])
        lines.append("")
    if report.tensors:
        legend = (*report.notes(), *LEGEND)
        lines += [f"- {text.format(R=report.options.lora_rank)}" for text in legend]
    return "\n".join(lines).rstrip() + "\n"


def _json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"


FORMATS: dict[str, Callable[[Report], str]] = {
    "table": _table,
    "markdown": _markdown,
    "json": _json,
}


def render(report: Report, fmt: str) -> str:
    """The report as text in format ``fmt`` (``table``, ``markdown`` or ``json``)."""
    return FORMATS[fmt](report)
