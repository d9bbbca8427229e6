"""``tuckerlib analyze``: the rank structure of every ΔW between two checkpoints."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tuckerlib.cli._adapter import AdapterReport, analyze_layer, select_layers
from tuckerlib.cli._formats import FORMATS, render
from tuckerlib.cli._plots import SUMMARY_FILE, plot_files, plot_summary, plot_tensor, pyplot
from tuckerlib.cli._report import AnalyzeOptions, Report, TensorReport, analyze_delta
from tuckerlib.cli.common import (
    EXIT_OK,
    UsageError,
    atomic_output,
    bundled_example,
    parse_energies,
    positive_int,
    progress,
    regex,
)
from tuckerlib.io import Checkpoint, open_adapter, open_checkpoint, pair_checkpoints, read_delta

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


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` or ``--plots`` that cannot be written, before any work."""
    if args.out is not None:
        if args.out.is_dir():
            raise UsageError(f"--out {args.out}: is a directory; give a file name")
        if not (args.out.parent.is_dir() or _created_by_plots(args.out.parent, args.plots)):
            raise UsageError(
                f"--out {args.out}: cannot write there: no directory {args.out.parent}"
            )
    if args.plots is not None:
        if args.plots.exists() and not args.plots.is_dir():
            raise UsageError(f"--plots {args.plots}: exists and is not a directory")
        if args.out is not None and _same_file(args.out, args.plots):
            raise UsageError(f"--out {args.out} and --plots {args.plots} are the same path")


def _created_by_plots(directory: Path, plots: Path | None) -> bool:
    """Whether ``--plots`` creates ``directory`` (it makes its missing parents too)."""
    if plots is None:
        return False
    target = directory.resolve()
    return target == plots.resolve() or target in plots.resolve().parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def _file_id(path: Path) -> tuple[int, int] | None:
    """The identity of an existing file (hard links and symlinks included), else ``None``."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _refuse_overwriting(outputs: dict[Path, str], reads: dict[Path, str]) -> None:
    """Stop before writing anything if an output is a file this run reads."""
    read_ids = {_file_id(path): (path, role) for path, role in reads.items()}
    read_ids.pop(None, None)
    for output, option in outputs.items():
        clash = read_ids.get(_file_id(output))
        if clash is not None:
            raise UsageError(
                f"{option} {output} would overwrite {clash[0]}, which this run reads "
                f"({clash[1]}); choose another path"
            )


def _inputs_read(base: Checkpoint, tuned: Checkpoint) -> dict[Path, str]:
    files = {path: "the base checkpoint" for path in base.files}
    files.update({path: "the tuned checkpoint" for path in tuned.files})
    return files


def _figures(names: list[str], args: argparse.Namespace, reads: dict[Path, str]) -> dict[str, Path]:
    """Each tensor's figure file; refuse outputs that clash with each other or with inputs."""
    figures = {} if args.plots is None else plot_files(names, args.plots)
    outputs = {path: "--plots figure" for path in figures.values()}
    if args.plots is not None:
        outputs[args.plots / SUMMARY_FILE] = "--plots figure"
    if args.out is not None:
        for figure in outputs:
            if _same_file(figure, args.out):
                raise UsageError(f"--out {args.out} is also a --plots figure; choose another path")
        outputs[args.out] = "--out"
    _refuse_overwriting(outputs, reads)
    return figures


def _collect(
    names: list[str],
    analyze: Callable[[str], TensorReport | str],
    report: Report,
    args: argparse.Namespace,
    reads: dict[Path, str],
) -> None:
    """Analyze every name into ``report`` (a string result is a skip reason); draw the plots."""
    figures = _figures(names, args, reads)
    plt = pyplot() if args.plots else None
    if plt is not None:
        try:
            args.plots.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--plots {args.plots}: cannot create ({exc.strerror})") from None
    for name in progress(names, quiet=args.quiet):
        tensor = analyze(name)
        if isinstance(tensor, str):
            report.skipped.append((name, tensor))
            continue
        report.tensors.append(tensor)
        if plt is not None:
            plot_tensor(plt, tensor, figures[name])
    if plt is not None and report.tensors:
        plot_summary(plt, report, args.plots)


def _analyze(base: Checkpoint, tuned: Checkpoint, report: Report, args: argparse.Namespace) -> None:
    pairing = pair_checkpoints(base, tuned, include=args.include, exclude=args.exclude)
    if not pairing.names and all(r.startswith("missing in") for _, r in pairing.skipped):
        filtered = " (after --include/--exclude)" if args.include or args.exclude else ""
        raise UsageError(f"no tensor name is in both {report.base} and {report.tuned}{filtered}")
    report.skipped.extend(pairing.skipped)

    def analyze(name: str) -> TensorReport | str:
        return analyze_pair(base, tuned, name, report.options)

    _collect(pairing.names, analyze, report, args, _inputs_read(base, tuned))


def _pair_report(args: argparse.Namespace) -> Report:
    base_path, tuned_path, bundled = _inputs(args)
    _check_outputs(args)
    options = AnalyzeOptions(args.energy, args.budget_like_lora, args.fixed_kernel_rank)
    with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
        description = getattr(tuned, "metadata", {}).get("description") if bundled else None
        report = Report(str(base_path), str(tuned_path), options, description=description)
        _analyze(base, tuned, report, args)
    return report


def _adapter_report(args: argparse.Namespace) -> AdapterReport:
    if args.base is not None:
        raise UsageError("give BASE and TUNED, or --adapter DIR, not both")
    _check_outputs(args)
    options = AnalyzeOptions(args.energy, args.budget_like_lora, args.fixed_kernel_rank)
    path = str(args.adapter)
    with open_adapter(args.adapter) as adapter:
        report = AdapterReport(path, path, options, adapter_format=adapter.format)
        names = select_layers(adapter, report, args.include, args.exclude)

        def analyze(name: str) -> TensorReport | str:
            return analyze_layer(adapter[name], options)

        reads = {file: "the adapter" for file in adapter.files}
        _collect(names, analyze, report, args, reads)
    return report


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` with parsed arguments; return the exit status.

    Outputs are checked before any work: an ``--out`` or a figure of
    ``--plots`` that is a file the run reads is refused, and every file is
    written through a temporary name renamed into place.
    """
    report = _adapter_report(args) if args.adapter is not None else _pair_report(args)
    text = render(report, args.format)
    if args.out is not None:
        with atomic_output(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if not args.quiet and (args.out is not None or args.plots is not None):
        written = [str(p) for p in (args.out, args.plots) if p is not None]
        print(f"tuckerlib analyze: wrote {' and '.join(written)}", file=sys.stderr)
    return EXIT_OK
