"""The ``tuckerlib`` command line (``tuckerlib analyze``); see the CLI reference."""

from __future__ import annotations

from collections.abc import Sequence

from tuckerlib.cli._analyze import add_parser as _add_analyze
from tuckerlib.cli.common import ArgumentParser, run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tuckerlib`` command line and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        ``0`` on success, ``2`` for a usage or input error (reported as one
        line on stderr).

    Raises
    ------
    TypeError
        If ``argv`` is a single string rather than a sequence of arguments.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from tuckerlib.cli import main
    >>> out = Path(tempfile.mkdtemp()) / "report.json"
    >>> main(["analyze", "--format", "json", "--quiet", "--out", str(out)])
    0
    """
    if isinstance(argv, str):
        raise TypeError(f"argv must be a sequence of arguments (e.g. {argv!r}.split()), got str")
    parser = ArgumentParser(
        prog="tuckerlib", description="Tucker rank analysis of fine-tuned checkpoints."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_analyze(commands)
    args = parser.parse_args(argv)
    return run(f"tuckerlib {args.command}", lambda: args.func(args))
