"""Pieces shared by the ``tuckerlib`` and ``flora`` command lines.

Input and usage errors end the program with exit status 2 and one line on
stderr, never a traceback; results go to stdout (or a file), progress to
stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn, TypeVar

from tuckerlib.io import CheckpointError

__all__ = [
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "UsageError",
    "bundled_example",
    "energy_fraction",
    "parse_energies",
    "positive_int",
    "progress",
    "regex",
    "run",
]

EXIT_OK = 0
EXIT_USAGE = 2

T = TypeVar("T")


class UsageError(Exception):
    """A problem with the command line or its inputs: exit 2 with this message."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one usage line and exit with status 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run(prog: str, command: Callable[[], int]) -> int:
    """Run ``command``; report input errors as one line on stderr with status 2."""
    try:
        return command()
    except (UsageError, CheckpointError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def regex(text: str) -> re.Pattern[str]:
    """Argparse type: a regular expression."""
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None


def energy_fraction(text: str, expected: str = "a number") -> float:
    """Argparse type: one energy fraction in (0, 1]; ``expected`` words the parse error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected} in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"energy {text} is outside (0, 1]")
    return value


def parse_energies(text: str) -> tuple[tuple[str, float], ...]:
    """Argparse type: comma-separated energy fractions in (0, 1], kept with their text."""
    energies = []
    for item in (part.strip() for part in text.split(",")):
        energies.append((item, energy_fraction(item, "comma-separated numbers")))
    keys = [key for key, _ in energies]
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"energy {text!r} lists a value twice")
    return tuple(energies)


def progress(items: Sequence[T], *, quiet: bool, unit: str = "tensor") -> Iterator[T]:
    """Iterate with a tqdm bar on stderr, unless quiet, stderr is no TTY, or no tqdm."""
    if quiet or not sys.stderr.isatty():
        return iter(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return iter(items)
    return iter(tqdm(items, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True))


def bundled_example() -> tuple[Path, Path]:
    """Paths of the example base/tuned checkpoints shipped in ``tuckerlib/data``."""
    data = resources.files("tuckerlib") / "data"
    base, tuned = data / "digits_cnn_base.safetensors", data / "digits_cnn_tuned.safetensors"
    if not (base.is_file() and tuned.is_file()):
        raise UsageError(f"the bundled example checkpoints are missing from {data}")
    return Path(str(base)), Path(str(tuned))


def describe(items: Iterable[str], limit: int = 4) -> str:
    """``"a, b, c and 5 more"``."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"
