"""``tuckerlib analyze``: the rank structure of every ΔW between two checkpoints."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tuckerlib.cli._adapter import adapter_report
from tuckerlib.cli._formats import FORMATS, render
from tuckerlib.cli._plots import plot_summary, plot_tensor, pyplot
from tuckerlib.cli._report import AnalyzeOptions, Report, TensorReport, analyze_delta
from tuckerlib.cli.common import (
    EXIT_OK,
    UsageError,
    bundled_example,
    parse_energies,
    positive_int,
    progress,
    regex,
)
from tuckerlib.io import Checkpoint, open_checkpoint, pair_checkpoints, read_delta

__all__ = ["FLOAT64_MAX_SIZE", "add_parser", "analyze_pair", "run_analyze"]

#: ΔW with at most this many entries (32 MiB in float64) is analysed in float64.
FLOAT64_MAX_SIZE = 1 << 22

DESCRIPTION = """\
Report, tensor by tensor, the rank structure of dW = TUNED - BASE: how much of
the change lives in a small multilinear core, the FLoRA (Tucker) ranks a
parameter budget affords, and whether Tucker beats a flattened LoRA at that
budget. BASE/TUNED: a .safetensors file, a directory of sharded safetensors
with its *.index.json, or a .pt/.bin state dict (loaded with
weights_only=True). Without them, analyze runs on a small example pair that
ships with tuckerlib (a CNN trained on scikit-learn's digits, then fine-tuned
on rotated digits). With --adapter DIR instead, the same report for the
update dW of every layer of a flora or PEFT LoRA adapter directory, computed
from its factors without forming dW. Exit status: 0 ok, 2 usage or input
error."""


def add_parser(subparsers: Any) -> None:
    """Register ``analyze`` on a subparsers object."""
    parser = subparsers.add_parser(
        "analyze",
        help="rank structure of every dW between two checkpoints",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", nargs="?", type=Path, metavar="BASE", help="checkpoint before")
    parser.add_argument("tuned", nargs="?", type=Path, metavar="TUNED", help="checkpoint after")
    parser.add_argument(
        "--adapter",
        type=Path,
        metavar="DIR",
        help="instead of BASE and TUNED: the updates of a flora or PEFT LoRA adapter directory, "
        "analysed from their factors",
    )
    parser.add_argument(
        "--energy",
        type=parse_energies,
        default=parse_energies("0.9,0.99"),
        metavar="E[,E...]",
        help="energy fractions for the per-mode energy ranks (default: 0.9,0.99)",
    )
    parser.add_argument(
        "--budget-like-lora",
        type=positive_int,
        default=8,
        metavar="R",
        help="parameter budget per tensor: that of a rank-R LoRA of its (out, rest) "
        "reshape (default: 8)",
    )
    parser.add_argument(
        "--fixed-kernel-rank",
        type=positive_int,
        default=None,
        metavar="K",
        help="pin the kernel modes of convolutions to rank K in the recommended ranks",
    )
    parser.add_argument("--include", type=regex, metavar="REGEX", help="only names matching this")
    parser.add_argument("--exclude", type=regex, metavar="REGEX", help="skip names matching this")
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="table", help="output format (default: table)"
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write PNG figures here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    parser.set_defaults(func=run_analyze)


def _base_norm(base: Checkpoint, name: str) -> float:
    return math.sqrt(sum(float(np.dot(c, c)) for c in base.chunks(name, np.float64)))


def _unusable(delta: np.ndarray) -> str | None:
    # A finite float64 sum proves every entry finite without the boolean
    # temporary of np.isfinite (a quarter of a float32 ΔW); only a float64
    # ΔW near overflow needs the entry-wise check.
    total = float(np.sum(delta, dtype=np.float64))
    if not math.isfinite(total) and not np.all(np.isfinite(delta)):
        return "dW has NaN or infinite entries"
    if not np.any(delta):
        return "unchanged (dW = 0)"
    return None


def analyze_pair(
    base: Checkpoint, tuned: Checkpoint, name: str, options: AnalyzeOptions
) -> TensorReport | str:
    """Read the ΔW of one paired tensor and analyze it; a string is why it is skipped.

    ΔW lives only inside this call, so a loop over tensors holds one at a
    time. Tensors of up to :data:`FLOAT64_MAX_SIZE` entries are analysed in
    float64, where memory is no concern and the Gram route's rounding stays
    far below what the report prints; larger ones in their own precision.
    """
    dtype = np.float64 if math.prod(base.info(name).shape) <= FLOAT64_MAX_SIZE else None
    delta = read_delta(base, tuned, name, dtype)
    reason = _unusable(delta)
    if reason is not None:
        return reason
    return analyze_delta(name, delta, _base_norm(base, name), options)


def _inputs(args: argparse.Namespace) -> tuple[Path, Path, bool]:
    if (args.base is None) != (args.tuned is None):
        raise UsageError("give both BASE and TUNED, or neither to analyze the bundled example")
    if args.base is None:
        return (*bundled_example(), True)
    return args.base, args.tuned, False


def _analyze(base: Checkpoint, tuned: Checkpoint, report: Report, args: argparse.Namespace) -> None:
    pairing = pair_checkpoints(base, tuned, include=args.include, exclude=args.exclude)
    if not pairing.names and all(r.startswith("missing in") for _, r in pairing.skipped):
        filtered = " (after --include/--exclude)" if args.include or args.exclude else ""
        raise UsageError(f"no tensor name is in both {report.base} and {report.tuned}{filtered}")
    report.skipped.extend(pairing.skipped)
    plt = pyplot() if args.plots else None
    if plt is not None:
        args.plots.mkdir(parents=True, exist_ok=True)
    for name in progress(pairing.names, quiet=args.quiet):
        tensor = analyze_pair(base, tuned, name, report.options)
        if isinstance(tensor, str):
            report.skipped.append((name, tensor))
            continue
        report.tensors.append(tensor)
        if plt is not None:
            plot_tensor(plt, tensor, args.plots)
    if plt is not None and report.tensors:
        plot_summary(plt, report, args.plots)


def _pair_report(args: argparse.Namespace) -> Report:
    base_path, tuned_path, bundled = _inputs(args)
    options = AnalyzeOptions(args.energy, args.budget_like_lora, args.fixed_kernel_rank)
    with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
        description = getattr(tuned, "metadata", {}).get("description") if bundled else None
        report = Report(str(base_path), str(tuned_path), options, description=description)
        _analyze(base, tuned, report, args)
    return report


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` with parsed arguments; return the exit status."""
    if args.adapter is not None and args.base is not None:
        raise UsageError("give BASE and TUNED, or --adapter DIR, not both")
    report = adapter_report(args) if args.adapter is not None else _pair_report(args)
    text = render(report, args.format)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if not args.quiet and (args.out is not None or args.plots is not None):
        written = [str(p) for p in (args.out, args.plots) if p is not None]
        print(f"tuckerlib analyze: wrote {' and '.join(written)}", file=sys.stderr)
    return EXIT_OK
