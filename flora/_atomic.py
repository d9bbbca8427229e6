"""Write a directory so that readers see the old complete one or the new complete one."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

__all__ = ["replace_directory"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(
    target: Path, fill: Callable[[Path], None], *, allowed: Collection[str]
) -> Path:
    """Let ``fill`` write into a new directory beside ``target``, then swap it into place.

    ``target`` may be missing, empty, or hold only files named in
    ``allowed`` (the previous copy of the same directory), which
    is then replaced as a whole. If ``fill`` fails, ``target`` is untouched
    and the new directory removed. Between the two renames of a replacement
    the old directory exists under a hidden name beside ``target``, so an
    interrupted swap never leaves a mix of old and new files.

    Raises
    ------
    FileExistsError
        If ``target`` exists and is not a directory.
    ValueError
        If ``target`` holds files not in ``allowed`` (nothing is written).
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        extra = sorted(p.name for p in target.iterdir() if p.name not in allowed)
        if extra:
            raise ValueError(
                f"{target} holds other files {extra}; an adapter directory is replaced as a "
                "whole, so use an empty directory or one that holds an adapter only"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    fresh.mkdir()
    try:
        fill(fresh)
        for path in fresh.iterdir():
            _fsync(path)
        _swap(fresh, target)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    _fsync(target.parent)
    return target


def _swap(fresh: Path, target: Path) -> None:
    if not target.exists():
        os.replace(fresh, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(fresh, target)
        return
    old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
    os.replace(target, old)
    try:
        os.replace(fresh, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)
