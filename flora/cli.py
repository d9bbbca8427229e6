"""The ``flora`` command line: ``flora extract``, ``flora export-lora``; see the CLI reference."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flora.extraction import Extraction, ExtractionError, extract
from flora.lora import LoraConversionError, export_lora
from tuckerlib.cli.common import (
    EXIT_OK,
    ArgumentParser,
    UsageError,
    describe,
    energy_fraction,
    positive_int,
    progress,
    regex,
    run,
)
from tuckerlib.io import open_adapter

__all__ = ["main"]

DESCRIPTION = """\
Extract a FLoRA adapter from a full fine-tune: each changed weight of 2 or
more dimensions, dW = TUNED - BASE, becomes a truncated Tucker tensor
(ST-HOSVD, optionally refined by HOOI), written as an adapter directory that
flora.load_adapter accepts for the model with the BASE weights. Each layer's
kind is guessed from its name and shape, or read from the model's modules
with --model (needed for GPT-2's Conv1D and MultiheadAttention). Ranks: fixed
(--ranks), by energy (--energy) or within a LoRA-like budget
(--budget-like-lora, the default with R = 8). --carry-1d also carries the
changed biases (as bias updates of the adapted layers) and norm layers
(saved whole) into the adapter. Prints each layer's relative error
||dW - adapter|| / ||dW||. Exit status: 0 ok, 2 usage or input error."""


def _ranks(text: str) -> int | tuple[int, ...]:
    parts = [positive_int(part.strip()) for part in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _add_extract(commands: Any) -> None:
    parser = commands.add_parser(
        "extract",
        help="turn a full fine-tune into a FLoRA adapter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", type=Path, metavar="BASE", help="checkpoint before fine-tuning")
    parser.add_argument("tuned", type=Path, metavar="TUNED", help="checkpoint after fine-tuning")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="ADAPTER_DIR", help="directory to write"
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--ranks",
        type=_ranks,
        metavar="R[,R...]",
        help="one rank for every mode (clipped to its size), or one per mode",
    )
    rule.add_argument(
        "--energy",
        type=energy_fraction,
        metavar="E",
        help="per mode, keep this fraction of the energy",
    )
    rule.add_argument(
        "--budget-like-lora",
        type=positive_int,
        metavar="R",
        help="ranks keeping the most energy within a rank-R LoRA's parameters (default: 8)",
    )
    parser.add_argument(
        "--fixed-kernel-rank",
        type=positive_int,
        metavar="K",
        help="pin the kernel modes of convolutions to rank K (with any rule; not with per-mode "
        "--ranks)",
    )
    parser.add_argument("--include", type=regex, metavar="REGEX", help="only names matching this")
    parser.add_argument("--exclude", type=regex, metavar="REGEX", help="skip names matching this")
    parser.add_argument("--refine", action="store_true", help="refine each ST-HOSVD with HOOI")
    parser.add_argument(
        "--carry-1d",
        action="store_true",
        help="carry the changed biases and norm layers into the adapter too",
    )
    parser.add_argument(
        "--as-parameters",
        action="store_true",
        help="adapt every weight as a generic parameter instead of guessing "
        "Linear/ConvNd/Embedding from names and shapes (not with --model)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help="the base model's Hugging Face folder (config.json; no weights are read): each "
        "layer's kind is its module's (GPT-2's Conv1D, MultiheadAttention, ...)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=_run_extract)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _summary(result: Extraction) -> str:
    header = ["layer", "kind", "shape", "ranks", "params", "rel. error"]
    rows = [
        [
            layer.name,
            layer.kind,
            "x".join(map(str, layer.shape)),
            ",".join(map(str, layer.ranks)),
            str(layer.n_params),
            f"{layer.relative_error:.4f}",
        ]
        for layer in result.layers
    ]
    lines = _table(header, rows)
    adapter = sum(layer.n_params for layer in result.layers)
    dense = sum(math.prod(layer.shape) for layer in result.layers)
    carried = f", plus {result.carried_values} values of carried tensors" if result.carried else ""
    lines.append(
        f"\nWrote {result.directory}: {len(result.layers)} layers, {adapter} core and factor "
        f"parameters for {dense} weights ({adapter / dense:.1%}){carried}."
    )
    for title, entries in (("Carried", result.carried), ("Not in the adapter", result.skipped)):
        if entries:
            lines.append(f"{title} ({len(entries)} tensors):")
            groups: dict[str, list[str]] = {}
            for name, reason in entries:
                groups.setdefault(reason, []).append(name)
            lines += [f"  {reason}: {describe(names)}" for reason, names in groups.items()]
    return "\n".join(lines) + "\n"


def _rank_rule(args: argparse.Namespace) -> dict[str, object] | None:
    """The ``rank=`` of :func:`flora.extract` that the rank options give (None: its default)."""
    names = ("ranks", "energy", "budget_like_lora", "fixed_kernel_rank")
    rule = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return rule or None


def _run_extract(args: argparse.Namespace) -> int:
    try:
        model = None if args.model is None else _base_skeleton(args.model, "--model")
        result = extract(
            args.base,
            args.tuned,
            args.out,
            rank=_rank_rule(args),
            include=args.include,
            exclude=args.exclude,
            refine=args.refine,
            as_parameters=args.as_parameters,
            model=model,
            carry_1d=args.carry_1d,
            progress=lambda names: progress(names, quiet=args.quiet),
        )
    except ExtractionError as exc:
        # Input the parser could not check (the checkpoints' contents, --out);
        # any other exception from extract is a bug and keeps its traceback.
        raise UsageError(str(exc)) from None
    sys.stdout.write(_summary(result))
    return EXIT_OK


EXPORT_DESCRIPTION = """\
Write a flora adapter directory as a PEFT LoRA adapter directory with the
same update, exactly: each layer's Tucker update becomes a LoRA pair of rank
R_0 (the rank of its output mode), which peft.PeftModel.from_pretrained loads;
bias updates become PEFT's lora_bias; modules saved whole (modules_to_save)
are carried from the directory. The directory alone is enough where it
records its layers' geometry (as flora.save_adapter writes it); Conv and
Embedding layers of directories that do not (written by flora extract or
earlier releases) need the base model's layer properties: --base names a
Hugging Face model folder (its config.json; no weights are read), which also
checks that PEFT's name matching loads each saved module alone. A layer with
no exact LoRA form is refused by name. Exit status: 0 ok, 2 usage or input
error."""


def _add_export(commands: Any) -> None:
    parser = commands.add_parser(
        "export-lora",
        help="write a flora adapter as an exact PEFT LoRA adapter",
        description=EXPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, metavar="FLORA_DIR", help="flora adapter directory")
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="PEFT LoRA directory to write")
    parser.add_argument(
        "--base",
        type=Path,
        metavar="PATH",
        help="the base model's Hugging Face folder (config.json), for layer properties and names",
    )
    parser.set_defaults(func=_run_export)


def _base_skeleton(path: Path, option: str = "--base") -> Any:
    """The model a Hugging Face folder's ``config.json`` describes, on the meta device.

    Its module names, types and layer properties are what an export checks
    and an extraction reads the kinds from; no weight is read or allocated.
    The class is the config's first ``architectures`` entry; errors name
    ``option``.
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise UsageError(f"{option} needs transformers installed") from None
    if not (path / "config.json").is_file():
        raise UsageError(f"{option} {path}: no config.json (a Hugging Face model folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {path}: {str(exc).splitlines()[0]}") from None
    names = config.architectures or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise UsageError(
            f"{option} {path}: config.json names no transformers model class in "
            f"architectures (found {names})"
        )
    with torch.device("meta"):
        return model_class(config)


def _export_summary(source: Path, out: Path) -> str:
    with open_adapter(source) as flora_adapter, open_adapter(out) as lora_adapter:
        rows, biases = [], []
        for name in lora_adapter:
            flora_layer, lora_layer = flora_adapter[name], lora_adapter[name]
            ranks = ",".join(map(str, flora_layer.stored_ranks))
            if flora_layer.bias is not None:
                biases.append(name)
                ranks += "+b"
            rows.append(
                [
                    name,
                    flora_layer.kind,
                    "x".join(map(str, flora_layer.shape)),
                    ranks,
                    str(lora_layer.stored_ranks[0]),
                    str(lora_layer.stored_params),
                ]
            )
        flora_params = sum(flora_adapter[name].stored_params for name in lora_adapter)
    lora_params = sum(int(row[-1]) for row in rows)
    lines = _table(["layer", "kind", "shape", "FLoRA ranks", "LoRA r", "LoRA params"], rows)
    lines.append(
        f"\nWrote {out}: {len(rows)} layers, {lora_params} LoRA parameters for {flora_params} "
        "FLoRA parameters, the same update."
    )
    if biases:
        lines.append(
            f"+b: the bias updates of {describe(biases)} are lora_B.bias of PEFT's lora_bias "
            "(zero on the other layers), not counted above."
        )
    return "\n".join(lines) + "\n"


def _run_export(args: argparse.Namespace) -> int:
    try:
        base = None if args.base is None else _base_skeleton(args.base)
        export_lora(args.source, args.out, base_model=base)
    except LoraConversionError as exc:
        # Input the parser could not check: layers without a LoRA form (each
        # named), the wrong kind of directory, an --out that cannot take the
        # adapter. Unreadable directories and failed writes (CheckpointError,
        # OSError) reach run(); any other exception is a bug and keeps its
        # traceback.
        raise UsageError(str(exc)) from None
    sys.stdout.write(_export_summary(args.source, args.out))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flora`` command line and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        ``0`` on success, ``2`` for a usage or input error (reported as one
        line on stderr).

    Examples
    --------
    >>> import tempfile
    >>> from importlib import resources
    >>> from pathlib import Path
    >>> from flora.cli import main
    >>> data = resources.files("tuckerlib") / "data"
    >>> out = Path(tempfile.mkdtemp()) / "adapter"
    >>> main(["extract", str(data / "digits_cnn_base.safetensors"),
    ...       str(data / "digits_cnn_tuned.safetensors"), "--out", str(out), "--quiet",
    ...       "--include", "fc"])  # doctest: +ELLIPSIS
    layer  kind    shape    ranks  params  rel. error
    -----  ------  -------  -----  ------  ----------
    fc1    Linear  128x256  7,7    2737    0.28...
    fc2    Linear  10x128   7,7    1015    0.17...
    <BLANKLINE>
    Wrote ...adapter: 2 layers, 3752 core and factor parameters for 34048 weights (11.0%).
    Not in the adapter (2 tensors):
      1-D tensor (bias, norm or scalar): no rank structure: fc1.bias, fc2.bias
    0

    An input error is one line on stderr and exit status 2:

    >>> main(["extract", "absent.safetensors", str(data / "digits_cnn_tuned.safetensors"),
    ...       "--out", str(out)])
    2
    """
    parser = ArgumentParser(prog="flora", description="FLoRA adapters from the command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(commands)
    _add_export(commands)
    args = parser.parse_args(argv)
    return run(f"flora {args.command}", lambda: args.func(args))
