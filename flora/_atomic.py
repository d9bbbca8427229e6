"""Write a directory of files so that readers see the old one or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replace_directory"]


def _check_target(target: Path, replaceable: frozenset[str]) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    others = sorted(p.name for p in target.iterdir() if p.name not in replaceable)
    if others:
        raise ValueError(
            f"{target} holds other files ({', '.join(others)}); write to a new or empty directory"
        )


@contextmanager
def replace_directory(target: Path, replaceable: frozenset[str]) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` that replaces it when the block succeeds.

    The files are written into a temporary directory on the same file system
    and renamed into place; if the block raises, the temporary directory is
    removed and ``target`` is untouched. An existing ``target`` may hold only
    files named in ``replaceable`` (the files being rewritten), so nothing
    else is ever deleted.

    Raises
    ------
    ValueError
        If ``target`` is a file, or a directory holding other files.
    """
    target = Path(target)
    _check_target(target, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old / target.name, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
