"""Pieces shared by the ``tuckerlib`` and ``flora`` command lines.

Input and usage errors end the program with exit status 2 and one line on
stderr, never a traceback; results go to stdout (or a file), progress to
stderr. Files are written to a temporary name beside the target and renamed
into place, so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn, TypeVar

from tuckerlib._validation import check_bool
from tuckerlib.io import CheckpointError

__all__ = [
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "UsageError",
    "atomic_output",
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


def _os_reason(exc: OSError) -> str:
    """What went wrong, in the operating system's words: ``No space left on device``."""
    return exc.strerror or str(exc) or type(exc).__name__


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {_os_reason(exc)}"
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def run(prog: str, command: Callable[[], int]) -> int:
    """Run ``command``; report input and environment errors as one line with status 2.

    Expected failures arrive typed, named where they happen:
    :class:`UsageError` (the command line, or a file it cannot write, see
    :func:`atomic_output`) and :class:`~tuckerlib.io.CheckpointError` (a
    checkpoint that is missing, unreadable, malformed or unsafe); both
    name the file. An :class:`OSError` that reaches this point is an
    environment error too (a full disk, a missing permission) and is
    reported with the file the operating system names. Any other exception
    is a bug and propagates with its traceback.

    Parameters
    ----------
    prog : str
        The program name that starts each error line, e.g. ``"tuckerlib analyze"``.
    command : callable
        Runs the command and returns its exit status.

    Returns
    -------
    int
        The status ``command`` returned, or ``2`` after printing
        ``"{prog}: error: {message}"`` on stderr.

    Examples
    --------
    >>> from tuckerlib.cli.common import UsageError, run
    >>> def command():
    ...     raise UsageError("model.pt: no such file")
    >>> run("demo", command)
    2
    """
    try:
        return command()
    except (UsageError, CheckpointError, OSError) as exc:
        print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE


@contextlib.contextmanager
def atomic_output(path: Path, *, errors: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Write a file through a temporary name in its directory, renamed into place at the end.

    Parameters
    ----------
    path : pathlib.Path
        The file to create or replace.
    errors : tuple of exception types, optional
        Exceptions of a writer that mean "could not write" besides
        :class:`OSError` (for example ``safetensors.SafetensorError``).

    Yields
    ------
    pathlib.Path
        A new, empty file beside ``path`` to write to. When the block ends
        without an exception it replaces ``path`` (``os.replace``); on any
        exception it is removed and ``path`` is left as it was.

    Raises
    ------
    UsageError
        If the file cannot be created, written or renamed (a missing
        directory, no permission, a full disk): one line naming ``path``
        and the reason.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from tuckerlib.cli.common import atomic_output
    >>> report = Path(tempfile.mkdtemp()) / "report.txt"
    >>> with atomic_output(report) as tmp:
    ...     _ = tmp.write_text("done")
    >>> report.read_text()
    'done'
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        # Mode 0o666 lets the umask decide the permissions, as for any new file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({_os_reason(exc)})") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, *errors) as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
        raise UsageError(f"{path}: cannot write ({reason})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
    """Iterate with a tqdm bar on stderr, unless quiet, stderr is no TTY, or no tqdm.

    Raises
    ------
    TypeError
        If ``quiet`` is not a bool.
    """
    if check_bool(quiet, "quiet") or not sys.stderr.isatty():
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
