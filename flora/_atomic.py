"""Write a directory so that readers see the old complete one or the new complete one."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

__all__ = ["check_target", "replace_directory", "write_error"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, reason: object, code: int | None = None) -> OSError:
    """An :class:`OSError` naming ``path``: ``"cannot write (No space left on device)"``.

    ``reason`` is an exception (its ``strerror``, else its text) or a text.
    The error number picks the subclass (``PermissionError`` for ``EACCES``).
    """
    if isinstance(reason, OSError):
        code = reason.errno if code is None else code
        reason = reason.strerror or str(reason) or type(reason).__name__
    elif isinstance(reason, BaseException):
        reason = str(reason) or type(reason).__name__
    return OSError(errno.EIO if code is None else code, f"cannot write ({reason})", str(path))


def check_target(target: Path, allowed: Collection[str]) -> None:
    """Refuse a ``target`` that :func:`replace_directory` would refuse, writing nothing.

    Raises
    ------
    FileExistsError
        If ``target``, or the nearest of its parents that exists, is not a
        directory.
    ValueError
        If ``target`` holds files not in ``allowed``.
    """
    existing = next((p for p in target.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FileExistsError(f"{target}: cannot write there: {existing} is not a directory")
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        extra = sorted(p.name for p in target.iterdir() if p.name not in allowed)
        if extra:
            raise ValueError(
                f"{target} holds other files {extra}; an adapter directory is replaced as a "
                "whole, so use an empty directory or one that holds an adapter only"
            )


def _named(exc: OSError, fresh: Path, target: Path) -> OSError:
    """``exc`` naming the file in ``target`` that the write into ``fresh`` was for."""
    name = Path(exc.filename) if exc.filename else target
    if name == fresh or fresh in name.parents:
        name = target / name.relative_to(fresh)
    return write_error(name, exc)


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
    OSError
        If writing fails (a full disk, no permission): one error naming the
        file under ``target`` that could not be written, whatever temporary
        name the write went to.
    """
    target = Path(target)
    check_target(target, allowed)
    fresh = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fresh.mkdir()
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        fill(fresh)
        for path in fresh.iterdir():
            _fsync(path)
        _swap(fresh, target)
    except OSError as exc:
        shutil.rmtree(fresh, ignore_errors=True)
        raise _named(exc, fresh, target) from None
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
