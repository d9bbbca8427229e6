"""Write a directory so that readers see the old complete one or the new complete one.

:func:`replace_directory` writes the new files into a hidden directory
``.NAME.<id>.tmp`` beside the target ``NAME`` and swaps it into place:

* Where the OS has an atomic exchange of two paths (Linux
  ``renameat2(RENAME_EXCHANGE)``), the swap is one step: at every instant
  ``NAME`` is the complete old or the complete new directory.
* Elsewhere (another OS, or a file system without it) the swap is two
  renames, ``NAME`` to ``.NAME.<id>.old`` and the new one to ``NAME``; a
  writer killed between them leaves ``NAME`` missing and the old copy under
  its hidden name, which the next load or save of ``NAME`` renames back
  (:func:`recover`).

Each writer holds an exclusive lock on ``.NAME.<id>.lock`` from before its
hidden directory exists until it is gone, so the hidden directories of a
live writer are never touched by others; those whose lock is free (their
writer died) are removed by the next write of ``NAME``. Swaps into one
parent directory are serialized by a lock on that directory, so concurrent
saves into one target all succeed, the last one to swap wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers and cleaners proceed unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "check_not_input",
    "check_target",
    "exchange",
    "recover",
    "replace_directory",
    "write_error",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: ``renameat2``'s system call number, where glibc does not export the function.
_SYSCALLS = {"x86_64": 316, "aarch64": 276, "arm64": 276}
#: Errors that say the exchange is not available here (fall back to two renames).
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


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


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        return function
    number = _SYSCALLS.get(platform.machine())
    if number is None or not hasattr(libc, "syscall"):
        return None
    return lambda *args: libc.syscall(number, *args)


_renameat2 = _libc_renameat2() if platform.system() == "Linux" else None


def exchange(a: Path, b: Path) -> bool:
    """Exchange the paths ``a`` and ``b`` atomically; False if this system cannot.

    Raises
    ------
    OSError
        If the exchange is available but fails (a missing path, no permission).
    """
    if _renameat2 is None:
        return False
    result = _renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


def _hidden(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}\.([0-9a-f]{{32}})\.(tmp|old)")


def _lock_path(target: Path, token: str) -> Path:
    return target.parent / f".{target.name}.{token}.lock"


@contextlib.contextmanager
def _locked(path: Path, *, create: bool, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False if another process holds it.

    A missing lock file (``create=False``) counts as free: its writer is gone.
    Without locks (Windows, some network file systems) a writer proceeds and
    a cleaner (``create=False``) is told the lock is held, so it removes
    nothing it cannot prove stale.
    """
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
    except FileNotFoundError:
        yield True
        return
    if fcntl is None:
        os.close(fd)
        yield create  # without locks, only a missing lock file proves its writer gone
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # no locks here (some network file systems)
            yield create  # a writer proceeds; a cleaner cannot prove the writer gone
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Serialize the swaps into ``parent`` (a lock on the directory itself)."""
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        yield
        return
    if fcntl is None:
        os.close(fd)
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stale(target: Path) -> Iterable[tuple[Path, str, str]]:
    """The hidden directories of ``target`` whose writer is gone: (path, token, "tmp"/"old")."""
    pattern = _hidden(target)
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return
    for name in names:
        found = pattern.fullmatch(name)
        if found is None:
            continue
        token, kind = found.groups()
        with _locked(_lock_path(target, token), create=False, wait=False) as free:
            if free:
                yield target.parent / name, token, kind


def recover(target: Path) -> None:
    """Finish what a killed writer of ``target`` left: restore a lost target, drop leftovers.

    If ``target`` is missing and a dead writer's ``.NAME.<id>.old`` (the
    previous directory, moved aside for a two-rename swap) exists, it is
    renamed back. Only the hidden directories whose writer's lock is free
    are touched, never a live writer's; a failure (a read-only parent) is
    left for a later call.
    """
    target = Path(target)
    if target.exists() or target.is_symlink():
        return
    with _parent_lock(target.parent):
        olds = [(path, token) for path, token, kind in _stale(target) if kind == "old"]
        if not olds or target.exists():
            return
        newest, token = max(olds, key=lambda found: found[0].stat().st_mtime_ns)
        with contextlib.suppress(OSError):
            os.rename(newest, target)
            _fsync(target.parent)
            _lock_path(target, token).unlink(missing_ok=True)


def _clean(target: Path) -> None:
    """Remove the hidden directories that dead writers of ``target`` left."""
    for path, token, _ in list(_stale(target)):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            _lock_path(target, token).unlink(missing_ok=True)


def _resolve(target: Path) -> Path:
    """The directory to replace: a symlink's destination (the link stays), never ``.``."""
    if target.is_symlink():
        if not target.exists():
            raise FileExistsError(f"{target} is a symbolic link to a missing path; remove it")
        target = Path(os.path.realpath(target))
    if target.name in ("", ".", ".."):  # fl/sub/.. is fl: name the directory itself
        target = Path(os.path.realpath(target))
    cwd = Path.cwd().resolve()
    if target.resolve() in (cwd, *cwd.parents):
        raise ValueError(
            f"{target.resolve()} is the current directory (or its parent), which cannot be "
            "replaced; name the directory to write, e.g. ./adapter"
        )
    return target


def check_target(target: Path, allowed: Collection[str]) -> None:
    """Refuse a ``target`` that :func:`replace_directory` would refuse, writing nothing.

    Raises
    ------
    FileExistsError
        If ``target``, or the nearest of its parents that exists, is not a
        directory, or ``target`` is a symbolic link to a missing path.
    ValueError
        If ``target`` holds files not in ``allowed``, or is the current
        directory.
    PermissionError
        If ``target`` or its parent exists and cannot be written (the
        message names the full path).
    """
    target = _resolve(Path(target))
    existing = next((p for p in target.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FileExistsError(f"{target}: cannot write there: {existing} is not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"cannot write ({os.path.abspath(existing)} is read-only)", str(target)
        )
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(
                errno.EACCES,
                f"cannot replace ({os.path.abspath(target)} is read-only)",
                str(target),
            )
        extra = sorted(p.name for p in target.iterdir() if p.name not in allowed)
        if extra:
            raise ValueError(
                f"{target} holds other files {extra}; an adapter directory is replaced as a "
                "whole, so use an empty directory or one that holds an adapter only"
            )


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(target: Path, inputs: Iterable[object], what: str) -> None:
    """Refuse an output directory ``target`` that is, or holds, one of ``inputs``.

    Paths are compared resolved, and by inode (hard links, symlinks); an
    input anywhere under ``target`` (what a replacement would delete)
    counts. Inputs that are not paths (open checkpoints) are skipped.

    Raises
    ------
    ValueError
        Naming the input, ``what`` it is (``"input"``, ``"base checkpoint"``)
        and ``target``.
    """
    target = Path(target)
    real = Path(os.path.realpath(target))
    held = _files_under(real)
    for item in inputs:
        if not isinstance(item, str | os.PathLike):
            continue
        path = Path(os.fspath(item))
        resolved = Path(os.path.realpath(path))
        inside = resolved == real or real in resolved.parents
        linked = any(_same(f, h) for f in [path, *_files_under(resolved)] for h in held)
        if resolved == real or _same(path, target):
            raise ValueError(f"{target} is the {what}; write the output elsewhere")
        if inside or linked:
            raise ValueError(
                f"{target} holds the {what} {path}; writing it would overwrite the {what}, so "
                "write the output elsewhere"
            )


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


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
    and the new directory removed. The swap is atomic where the OS can
    exchange two paths; elsewhere a writer killed between its two renames
    leaves the old directory under a hidden name, which the next load or
    save restores (see the module docstring). A ``target`` that is a
    symbolic link to a directory is followed: the directory it points to is
    replaced and the link stays. Hidden directories that killed writers
    left are removed first.

    Raises
    ------
    FileExistsError
        If ``target`` exists and is not a directory.
    ValueError
        If ``target`` holds files not in ``allowed``, or is the current
        directory (nothing is written).
    OSError
        If writing fails (a full disk, no permission): one error naming the
        file under ``target`` that could not be written, whatever temporary
        name the write went to.
    """
    shown = Path(target)
    target = _resolve(shown)
    recover(target)
    check_target(target, allowed)
    _clean(target)
    token = uuid.uuid4().hex
    fresh = target.parent / f".{target.name}.{token}.tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(shown, exc) from None
    with _locked(_lock_path(target, token), create=True, wait=True):
        try:
            leftover = _write_and_swap(fresh, target, token, fill, shown)
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        finally:
            _lock_path(target, token).unlink(missing_ok=True)
    return shown


def _write_and_swap(
    fresh: Path, target: Path, token: str, fill: Callable[[Path], None], shown: Path
) -> Path | None:
    try:
        fresh.mkdir()
        fill(fresh)
        for path in fresh.iterdir():
            _fsync(path)
        with _parent_lock(target.parent):
            leftover = _swap(fresh, target, token)
        _fsync(target.parent)
    except OSError as exc:
        shutil.rmtree(fresh, ignore_errors=True)
        raise _named(exc, fresh, shown) from None
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return leftover


def _swap(fresh: Path, target: Path, token: str) -> Path | None:
    """Put ``fresh`` at ``target``; the old directory's new path (to remove), if any."""
    if target.exists() and any(target.iterdir()) and exchange(fresh, target):
        return fresh  # now the old directory
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(fresh, target)
        return None
    old = target.parent / f".{target.name}.{token}.old"
    _rename(target, old)
    try:
        _rename(fresh, target)
    except BaseException:
        os.replace(old, target)
        raise
    return old


def _rename(source: Path, destination: Path) -> None:
    """One of the two renames of a swap without :func:`exchange` (a seam for fault tests)."""
    os.replace(source, destination)
