"""Faults while an adapter directory is written: kills, full disks, concurrent writers and readers.

Each test injects one fault into :func:`flora._atomic.replace_directory` (a
process killed with ``os._exit`` at a chosen step, a write that fails, other
threads writing and reading the same directory) and checks that nothing is
lost: the target is the complete old or the complete new adapter, the next
load or save restores what a killed swap left, and hidden leftovers of dead
writers are removed while a live writer's are kept. Every case runs in
seconds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="flora needs torch")

from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

import flora  # noqa: E402
from flora import _atomic  # noqa: E402
from flora.io import CONFIG_NAME, DIGEST_KEY, WEIGHTS_NAME  # noqa: E402
from tuckerlib.io import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _model(value: float, name: str = "default") -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 4))
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]), adapter_name=name)
    with torch.no_grad():
        model[0].adapters[name].core.fill_(value)
    return model


def _core(directory: Path) -> float:
    saved = flora.read_adapter(directory)
    return float(saved.tensors["0.core"][0, 0])


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# A child process saves adapter 2.0 over adapter 1.0 and dies (os._exit) at one step.
_KILL = """
import os, sys, torch, flora
from flora import _atomic
target, step = sys.argv[1], sys.argv[2]
model = torch.nn.Sequential(torch.nn.Linear(6, 4))
flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]))
with torch.no_grad():
    model[0].core.fill_(2.0)
if step != "exchange":
    _atomic.exchange = lambda a, b: False
calls = []
real_rename, real_swap = _atomic._rename, _atomic._swap
def rename(source, destination):
    calls.append(source)
    if step == "between-renames" and len(calls) == 2:
        os._exit(9)
    real_rename(source, destination)
def swap(fresh, target, token):
    if step == "before-swap":
        os._exit(9)
    leftover = real_swap(fresh, target, token)
    if step in ("exchange", "after-swap"):
        os._exit(9)
    return leftover
_atomic._rename, _atomic._swap = rename, swap
flora.save_adapter(model, target)
"""


def _killed_save(target: Path, step: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _KILL, str(target), step],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 9, run.stderr


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, Path]:
    """For each step, a parent directory where a save over adapter 1.0 was killed there."""
    results = {}
    for step in ("before-swap", "between-renames", "after-swap", "exchange"):
        parent = tmp_path_factory.mktemp(step)
        flora.save_adapter(_model(1.0), parent / "adapter")
        _killed_save(parent / "adapter", step)
        results[step] = parent
    return results


@pytest.mark.parametrize(
    ("step", "value"),
    [("before-swap", 1.0), ("between-renames", 1.0), ("after-swap", 2.0), ("exchange", 2.0)],
)
def test_a_kill_at_any_step_leaves_a_loadable_adapter(killed, step, value) -> None:
    parent = killed[step]
    assert _core(parent / "adapter") == value


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_load(killed) -> None:
    parent = killed["between-renames"]
    # read by the test above or now: the old copy is back under its name, nothing hidden left.
    assert _core(parent / "adapter") == 1.0
    assert (parent / "adapter").is_dir()
    assert not any(name.endswith(".old") for name in _hidden(parent))


def test_a_kill_between_the_two_renames_leaves_the_target_missing_until_recovered(
    tmp_path,
) -> None:
    flora.save_adapter(_model(1.0), tmp_path / "adapter")
    _killed_save(tmp_path / "adapter", "between-renames")
    assert not (tmp_path / "adapter").exists()
    assert [n for n in _hidden(tmp_path) if n.endswith(".old")]
    # The next save recovers the old copy first, then replaces it.
    flora.save_adapter(_model(3.0), tmp_path / "adapter")
    assert _core(tmp_path / "adapter") == 3.0
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("step", ["before-swap", "after-swap", "exchange"])
def test_the_next_write_removes_what_killed_writers_left(killed, step) -> None:
    parent = killed[step]
    assert _hidden(parent), "the kill should have left a hidden directory"
    flora.save_adapter(_model(4.0), parent / "adapter")
    assert _core(parent / "adapter") == 4.0
    assert _hidden(parent) == []


def test_a_live_writers_temporary_directory_is_never_removed(tmp_path) -> None:
    flora.save_adapter(_model(1.0), tmp_path / "adapter")
    token = "0" * 32
    live = tmp_path / f".adapter.{token}.tmp"
    live.mkdir()
    (live / "partial").write_text("being written")
    lock = os.open(tmp_path / f".adapter.{token}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        flora.save_adapter(_model(2.0), tmp_path / "adapter")
        assert (live / "partial").read_text() == "being written"
    finally:
        os.close(lock)  # the writer "dies": its lock is free
    flora.save_adapter(_model(3.0), tmp_path / "adapter")
    assert _hidden(tmp_path) == []
    assert _core(tmp_path / "adapter") == 3.0


def test_without_locks_only_provably_stale_directories_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(_atomic, "fcntl", None)
    flora.save_adapter(_model(1.0), tmp_path / "adapter")
    unlocked, locked = "1" * 32, "2" * 32
    for token in (unlocked, locked):
        (tmp_path / f".adapter.{token}.tmp").mkdir()
    (tmp_path / f".adapter.{locked}.lock").touch()
    flora.save_adapter(_model(2.0), tmp_path / "adapter")
    assert _core(tmp_path / "adapter") == 2.0
    # No lock file: its writer is gone (a writer creates its lock before its directory and
    # removes it last). A lock file that cannot be locked may be a live writer's: kept.
    assert _hidden(tmp_path) == [f".adapter.{locked}.lock", f".adapter.{locked}.tmp"]


def test_a_failed_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch) -> None:
    flora.save_adapter(_model(1.0), tmp_path / "adapter")
    monkeypatch.setattr(_atomic, "exchange", lambda a, b: False)
    calls = []
    real = _atomic._rename

    def rename(source: Path, destination: Path) -> None:
        calls.append(source)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(source, destination)

    monkeypatch.setattr(_atomic, "_rename", rename)
    with pytest.raises(OSError, match=r"cannot write \(Input/output error\)") as info:
        flora.save_adapter(_model(2.0), tmp_path / "adapter")
    assert info.value.filename == str(tmp_path / "adapter")
    assert _core(tmp_path / "adapter") == 1.0
    assert _hidden(tmp_path) == []


def test_without_an_atomic_exchange_a_save_still_replaces(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_atomic, "_renameat2", None)
    assert _atomic.exchange(tmp_path, tmp_path) is False
    for value in (1.0, 2.0):
        flora.save_adapter(_model(value), tmp_path / "adapter")
    assert _core(tmp_path / "adapter") == 2.0
    assert _hidden(tmp_path) == []


def test_the_exchange_falls_back_where_the_file_system_lacks_it(tmp_path, monkeypatch) -> None:
    def unsupported(*args) -> int:
        import ctypes

        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(_atomic, "_renameat2", unsupported)
    assert _atomic.exchange(tmp_path, tmp_path) is False
    flora.save_adapter(_model(1.0), tmp_path / "adapter")
    flora.save_adapter(_model(2.0), tmp_path / "adapter")
    assert _core(tmp_path / "adapter") == 2.0


@pytest.mark.skipif(
    _atomic._renameat2 is None,
    reason="renameat2(RENAME_EXCHANGE) exists on Linux only; elsewhere saves take the "
    "two-rename path, tested by test_without_an_atomic_exchange_a_save_still_replaces",
)
def test_the_exchange_swaps_two_directories(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert _atomic.exchange(tmp_path / "a", tmp_path / "b") is True
    assert (tmp_path / "b" / "x").read_text() == "a"
    assert list((tmp_path / "a").iterdir()) == []
    with pytest.raises(FileNotFoundError):
        _atomic.exchange(tmp_path / "a", tmp_path / "missing")


# A full disk while writing: the error names the file, the old adapter stays.
@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
def test_a_full_disk_names_the_file_and_keeps_the_old_adapter(tmp_path, monkeypatch, name):
    flora.save_adapter(_model(1.0), tmp_path / "adapter")
    real_save, real_write = flora.io.save_file, Path.write_text

    def full(path: str) -> None:
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(flora.io, "save_file", lambda t, p, **k: (full(p), real_save(t, p, **k)))
    monkeypatch.setattr(Path, "write_text", lambda s, *a, **k: (full(s), real_write(s, *a, **k)))
    with pytest.raises(OSError, match=r"No space left on device") as info:
        flora.save_adapter(_model(2.0), tmp_path / "adapter")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "adapter" / name)
    assert _core(tmp_path / "adapter") == 1.0
    assert _hidden(tmp_path) == []


# Concurrent writers and readers.
def test_concurrent_writers_all_succeed_and_readers_never_see_a_mix(tmp_path) -> None:
    target = tmp_path / "adapter"
    flora.save_adapter(_model(1.0, "a"), target)
    models = {"a": _model(1.0, "a"), "b": _model(2.0, "b")}
    errors: list[BaseException] = []
    reads: list[tuple[str, float]] = []
    done = threading.Event()

    def write(name: str) -> None:
        try:
            for _ in range(15):
                flora.save_adapter(models[name], target)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            try:
                saved = flora.read_adapter(target)
            except BaseException as exc:
                errors.append(exc)
                return
            reads.append((saved.name, float(saved.tensors["0.core"][0, 0])))

    writers = [threading.Thread(target=write, args=(n,)) for n in ("a", "b", "a", "b")]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in [*writers, *readers]:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    done.set()
    for thread in readers:
        thread.join(timeout=60)
    assert errors == []
    assert reads, "the readers read nothing"
    assert all(value == {"a": 1.0, "b": 2.0}[name] for name, value in reads), reads
    assert flora.read_adapter(target).name in ("a", "b")
    assert _hidden(tmp_path) == []


def test_concurrent_saves_from_processes_all_succeed(tmp_path) -> None:
    target = tmp_path / "adapter"
    code = (
        "import sys, torch, flora\n"
        "m = torch.nn.Sequential(torch.nn.Linear(6, 4))\n"
        "config = flora.FLoRAConfig(ranks=2, target_modules=['0'])\n"
        "flora.inject(m, config, adapter_name=sys.argv[2])\n"
        "for _ in range(6):\n"
        "    flora.save_adapter(m, sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target), name],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    assert flora.read_adapter(target).name in ("a", "b")
    assert _hidden(tmp_path) == []


def _files(config_from: Path, weights_from: Path) -> dict[str, bytes]:
    return {
        CONFIG_NAME: (config_from / CONFIG_NAME).read_bytes(),
        WEIGHTS_NAME: (weights_from / WEIGHTS_NAME).read_bytes(),
    }


def test_a_read_that_pairs_two_saves_is_repeated_until_the_files_match(tmp_path, monkeypatch):
    a = flora.save_adapter(_model(1.0, "a"), tmp_path / "a")
    b = flora.save_adapter(_model(2.0, "b"), tmp_path / "b")
    # The first read pairs a's config with b's weights (as if b's were copied in meanwhile).
    real = flora.io.read_together
    calls = []

    def racing(directory: Path, names):
        calls.append(directory)
        return _files(a, b) if len(calls) == 1 else real(directory, names)

    monkeypatch.setattr(flora.io, "read_together", racing)
    saved = flora.read_adapter(a)
    assert (saved.name, float(saved.tensors["0.core"][0, 0])) == ("a", 1.0)
    assert len(calls) == 2


def test_files_that_keep_changing_give_one_error_naming_the_weights(tmp_path, monkeypatch):
    a = flora.save_adapter(_model(1.0, "a"), tmp_path / "a")
    b = flora.save_adapter(_model(2.0, "b"), tmp_path / "b")
    c = flora.save_adapter(_model(3.0, "c"), tmp_path / "c")
    calls = []

    def changing(directory: Path, names):
        calls.append(directory)
        return _files((a, b)[len(calls) % 2], c)

    monkeypatch.setattr(flora.io, "read_together", changing)
    with pytest.raises(CheckpointError, match=r"c/adapter_model\.safetensors: written with anot"):
        flora.read_adapter(c)
    assert len(calls) == 5


def test_a_hand_edited_config_and_old_files_without_a_digest_still_load(tmp_path) -> None:
    directory = flora.save_adapter(_model(1.0), tmp_path / "adapter")
    document = json.loads((directory / CONFIG_NAME).read_text())
    document["config"]["dropout"] = 0.0
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=4))
    assert _core(directory) == 1.0
    tensors = flora.read_adapter(directory).tensors
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    assert _core(directory) == 1.0


def test_the_weights_record_the_digest_of_their_config(tmp_path) -> None:
    import hashlib

    directory = flora.save_adapter(_model(1.0), tmp_path / "adapter")
    metadata = flora._files.read_tensors(directory / WEIGHTS_NAME)[1]
    config = (directory / CONFIG_NAME).read_bytes()
    assert metadata == {DIGEST_KEY: hashlib.sha256(config).hexdigest()}


# Targets that are links, the current directory, or cannot be written.
def test_a_symlinked_target_is_followed_and_the_link_stays(tmp_path) -> None:
    flora.save_adapter(_model(1.0), tmp_path / "real")
    os.symlink("real", tmp_path / "link")
    flora.save_adapter(_model(2.0), tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert os.readlink(tmp_path / "link") == "real"
    assert _core(tmp_path / "real") == 2.0
    assert _hidden(tmp_path) == []


def test_a_dangling_symlink_target_is_refused(tmp_path) -> None:
    os.symlink("missing", tmp_path / "link")
    with pytest.raises(FileExistsError, match=r"link is a symbolic link to a missing path"):
        flora.save_adapter(_model(1.0), tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


@pytest.mark.parametrize("where", ["target", "parent"])
def test_a_read_only_directory_is_named_in_full_before_anything_changes(
    tmp_path, monkeypatch, where
) -> None:
    # Root may write anywhere, so the check os.access makes is what is faked here.
    target = flora.save_adapter(_model(1.0), tmp_path / "adapter")
    read_only = target if where == "target" else tmp_path
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: Path(p).resolve() != read_only and real(p, mode)
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PermissionError, match=rf"{read_only} is read-only") as info:
        flora.save_adapter(_model(2.0), "adapter")
    assert info.value.filename == "adapter"
    assert _core(target) == 1.0
    assert _hidden(tmp_path) == []
