"""The ``tuckerlib`` command line on bad input: exit 2, one line naming the file, nothing lost.

``CASES`` are command lines that must fail before anything is written:
exit status 2, one line on stderr matching the row's pattern (which names
the file or option at fault), no traceback, and every file in the working
directory exactly as it was. ``WRITE_FAILURES`` are disks that fill up
while writing. A new option or failure joins by adding a row.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tuckerlib.cli import main
from tuckerlib.cli.common import UsageError, atomic_output, bundled_example, progress, run
from tuckerlib.io import CheckpointError

torch = pytest.importorskip("torch")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """Checkpoints of every kind in the working directory, which the test runs in."""
    rng = np.random.default_rng(0)
    base = {
        "a.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "b.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
    }
    tuned = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a.weight": tuned["a.weight"]}, shards / "m-1.safetensors")
    save_file({"b.weight": tuned["b.weight"]}, shards / "m-2.safetensors")
    weight_map = {"a.weight": "m-1.safetensors", "b.weight": "m-2.safetensors"}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({k: torch.from_numpy(v) for k, v in base.items()}, tmp_path / "base.pt")
    torch.save({"a.weight": torch.ones(6, 5, device="meta")}, tmp_path / "meta.pt")
    torch.save({"a.weight": torch.ones(6, 5).to_sparse()}, tmp_path / "sparse.pt")
    os.link(tmp_path / "base.safetensors", tmp_path / "hardlink.safetensors")
    os.symlink("base.safetensors", tmp_path / "symlink.safetensors")
    (tmp_path / "figures").mkdir()
    save_file(base, tmp_path / "figures" / "summary.png")
    raw = (tmp_path / "base.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[:-7])
    (tmp_path / "report.txt").write_text("the previous report\n")
    _crafted_files(tmp_path, tuned)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _header_file(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _index(directory: Path, weight_map: object) -> None:
    directory.mkdir()
    text = weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map})
    (directory / "model.safetensors.index.json").write_text(text)


def _peft_adapter(directory: Path, shapes: dict[str, tuple[int, ...]], config: str) -> None:
    directory.mkdir()
    tensors = {f"base_model.model.{k}": np.ones(v, np.float32) for k, v in shapes.items()}
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(config)


def _crafted_files(root: Path, tuned: dict[str, np.ndarray]) -> None:
    """Files crafted to escape, alias or overflow the readers (issue 22)."""
    overlap = {
        "a.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "b.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [16, 48]},
    }
    _header_file(root / "overlap.safetensors", json.dumps(overlap).encode(), b"\0" * 48)
    _header_file(root / "deep.safetensors", b"[" * 100_000, b"")
    _index(root / "climbing", {"a.weight": "../tuned.safetensors"})
    _index(root / "absolute", {"a.weight": str(root / "tuned.safetensors")})
    _index(root / "deepindex", "[" * 100_000)
    lora = '{"peft_type": "LORA", "r": 2, "lora_alpha": 2}'
    _peft_adapter(root / "deep_config", {"fc.lora_A.weight": (2, 3)}, "[" * 100_000)
    embedding = {"emb.lora_embedding_A": (2, 10, 1), "emb.lora_embedding_B": (4, 2)}
    _peft_adapter(root / "embedding_3d", embedding, lora)
    conv = {"conv.lora_A.weight": (2, 3, 3, 3), "conv.lora_B.weight": (4, 0, 1, 1)}
    _peft_adapter(root / "conv_zero", conv, lora)
    backref = '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "rank_pattern": {"(a)\\\\1": 2}}'
    _peft_adapter(
        root / "backref", {"fc.lora_A.weight": (2, 3), "fc.lora_B.weight": (4, 2)}, backref
    )


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _exit_status(args: list[str]) -> int:
    try:
        return main(["analyze", "--quiet", *args])
    except SystemExit as exit_info:  # argparse's own usage errors
        return int(exit_info.code)


BT = ["base.safetensors", "tuned.safetensors"]
BUNDLED_BASE = str(bundled_example()[0])

CASES = [
    # --out or a figure would overwrite a file the run reads
    pytest.param(
        [*BT, "--out", "base.safetensors"],
        r"--out base\.safetensors would overwrite base\.safetensors, which this run reads",
        id="out-is-base",
    ),
    pytest.param(
        [*BT, "--out", "tuned.safetensors"],
        r"would overwrite tuned\.safetensors, .*\(the tuned checkpoint\)",
        id="out-is-tuned",
    ),
    pytest.param(
        ["base.safetensors", "sharded", "--out", "sharded/m-2.safetensors"],
        r"--out sharded/m-2\.safetensors would overwrite .*m-2\.safetensors, .*\(the tuned",
        id="out-is-a-shard",
    ),
    pytest.param(
        ["base.safetensors", "sharded", "--out", "sharded/model.safetensors.index.json"],
        r"would overwrite .*model\.safetensors\.index\.json",
        id="out-is-the-shard-index",
    ),
    pytest.param(
        ["base.pt", "tuned.safetensors", "--out", "base.pt"],
        r"--out base\.pt would overwrite base\.pt",
        id="out-is-a-pt-file",
    ),
    pytest.param(
        [*BT, "--out", "hardlink.safetensors"],
        r"--out hardlink\.safetensors would overwrite base\.safetensors",
        id="out-is-a-hard-link-to-an-input",
    ),
    pytest.param(
        [*BT, "--out", "symlink.safetensors"],
        r"--out symlink\.safetensors would overwrite base\.safetensors",
        id="out-is-a-symlink-to-an-input",
    ),
    pytest.param(
        ["--out", BUNDLED_BASE],
        r"would overwrite .*digits_cnn_base\.safetensors",
        id="out-is-the-bundled-example",
    ),
    pytest.param(
        ["figures/summary.png", "tuned.safetensors", "--plots", "figures"],
        r"--plots figure figures/summary\.png would overwrite figures/summary\.png, .*\(the base",
        id="plots-figure-is-an-input",
    ),
    # outputs that cannot be written at all
    pytest.param(
        [*BT, "--out", "."], r"--out \.: is a directory; give a file name", id="out-is-a-directory"
    ),
    pytest.param(
        [*BT, "--out", "nowhere/report.txt"],
        r"--out nowhere/report\.txt: cannot write there: no directory nowhere",
        id="out-in-a-missing-directory",
    ),
    pytest.param(
        [*BT, "--plots", "base.safetensors"],
        r"--plots base\.safetensors: exists and is not a directory",
        id="plots-is-a-file",
    ),
    pytest.param(
        [*BT, "--plots", "figs", "--out", "figs"],
        r"--out figs and --plots figs are the same path",
        id="out-is-the-plots-directory",
    ),
    pytest.param(
        [*BT, "--plots", "figs", "--out", "figs/summary.png"],
        r"--out figs/summary\.png is also a --plots figure",
        id="out-is-a-figure",
    ),
    # inputs that cannot be read
    pytest.param(
        ["meta.pt", "tuned.safetensors"],
        r"meta\.pt: tensor 'a\.weight' is a meta tensor: it has a shape but holds no values",
        id="meta-tensors",
    ),
    pytest.param(
        ["sparse.pt", "tuned.safetensors"],
        r"sparse\.pt: tensor 'a\.weight' is a sparse tensor",
        id="sparse-tensors",
    ),
    pytest.param(
        ["truncated.safetensors", "tuned.safetensors"],
        r"truncated\.safetensors: tensor .* extends past the end of the file",
        id="truncated-safetensors",
    ),
    pytest.param(
        ["report.txt", "tuned.safetensors"],
        r"report\.txt: not a safetensors file",
        id="text-file-as-checkpoint",
    ),
    pytest.param(
        ["absent.safetensors", "tuned.safetensors"],
        r"absent\.safetensors: no such file or directory",
        id="missing-checkpoint",
    ),
    pytest.param(
        ["figures", "tuned.safetensors"],
        r"figures: no checkpoint here",
        id="directory-without-checkpoint",
    ),
    pytest.param(["base.safetensors"], r"give both BASE and TUNED", id="only-one-checkpoint"),
    # usage errors from the parser
    pytest.param(
        [*BT, "--include", "("],
        r"argument --include: invalid regular expression '\('",
        id="include-bad-regex",
    ),
    pytest.param(
        [*BT, "--exclude", "[a"],
        r"argument --exclude: invalid regular expression",
        id="exclude-bad-regex",
    ),
    pytest.param(
        [*BT, "--budget-like-lora", "2.5"],
        r"--budget-like-lora: expected an integer >= 1, got '2\.5'",
        id="budget-not-an-integer",
    ),
    pytest.param(
        [*BT, "--fixed-kernel-rank", "0"],
        r"--fixed-kernel-rank: expected an integer >= 1, got 0",
        id="kernel-rank-zero",
    ),
    pytest.param([*BT, "--energy", "nan"], r"energy nan is outside \(0, 1\]", id="energy-nan"),
    # files crafted to read outside their place, alias bytes or overflow the parser
    pytest.param(
        ["base.safetensors", "overlap.safetensors"],
        r"overlap\.safetensors: tensor 'b\.weight' \(bytes 16-48\) overlaps the tensor before it",
        id="offsets-overlap",
    ),
    pytest.param(
        ["base.safetensors", "deep.safetensors"],
        r"deep\.safetensors: not a safetensors file \(bad JSON header: maximum recursion",
        id="header-nested-too-deeply",
    ),
    pytest.param(
        ["base.safetensors", "climbing"],
        r"climbing/model\.safetensors\.index\.json: shard '\.\./tuned\.safetensors' is not a "
        r"file name inside climbing",
        id="index-climbs-out",
    ),
    pytest.param(
        ["base.safetensors", "absolute"],
        r"absolute/model\.safetensors\.index\.json: shard '/.*tuned\.safetensors' is not a file",
        id="index-names-an-absolute-path",
    ),
    pytest.param(
        ["base.safetensors", "deepindex"],
        r"deepindex/model\.safetensors\.index\.json: not a checkpoint index \(bad JSON: maximum",
        id="index-nested-too-deeply",
    ),
    pytest.param(
        ["--adapter", "deep_config"],
        r"deep_config/adapter_config\.json: not valid JSON \(nested too deeply\)",
        id="adapter-config-nested-too-deeply",
    ),
    pytest.param(
        ["--adapter", "embedding_3d"],
        r"embedding_3d: layer 'emb': lora_embedding_A \[2, 10, 1\] .*an Embedding pair must be",
        id="adapter-embedding-3d",
    ),
    pytest.param(
        ["--adapter", "conv_zero"],
        r"conv_zero: layer 'conv': .*lora_B \[4, 0, 1, 1\]: every dimension must be >= 1",
        id="adapter-conv-zero-rank",
    ),
    pytest.param(
        ["--adapter", "backref"],
        r"backref/adapter_config\.json: rank_pattern: pattern '\(a\)\\\\1' is not a regular "
        r"expression RE2 can match",
        id="adapter-pattern-re2-refuses",
    ),
]


@pytest.mark.parametrize(("args", "match"), CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workdir, capsys, args, match) -> None:
    before = _snapshot(workdir)
    assert _exit_status(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("tuckerlib"), err
    assert re.search(match, err), err
    assert _snapshot(workdir) == before


def _fail_write_text(reason: int, text: str) -> Callable[..., None]:
    def write_text(self, *args, **kwargs):
        raise OSError(reason, text)  # as a real write(2): no file name attached

    return write_text


def _fail_savefig(reason: int, text: str) -> Callable[..., None]:
    def savefig(self, *args, **kwargs):
        raise OSError(reason, text)

    return savefig


WRITE_FAILURES = [
    pytest.param(
        ("pathlib.Path.write_text", _fail_write_text(errno.ENOSPC, "No space left on device")),
        ["--out", "report.txt"],
        r"report\.txt: cannot write \(No space left on device\)",
        id="disk-full-writing-the-report",
    ),
    pytest.param(
        ("pathlib.Path.write_text", _fail_write_text(errno.EFBIG, "File too large")),
        ["--out", "report.txt"],
        r"report\.txt: cannot write \(File too large\)",
        id="file-too-large-writing-the-report",
    ),
    pytest.param(
        (
            "matplotlib.figure.Figure.savefig",
            _fail_savefig(errno.ENOSPC, "No space left on device"),
        ),
        ["--plots", "figures"],
        r"figures/spectra_a\.weight\.png: cannot write \(No space left on device\)",
        id="disk-full-writing-a-figure",
    ),
    pytest.param(
        (
            "os.replace",
            lambda *a, **k: (_ for _ in ()).throw(
                OSError(errno.EXDEV, "Invalid cross-device link")
            ),
        ),
        ["--out", "report.txt"],
        r"report\.txt: cannot write \(Invalid cross-device link\)",
        id="rename-fails",
    ),
]


@pytest.mark.parametrize(("patch", "args", "match"), WRITE_FAILURES)
def test_write_failures_exit_2_and_keep_the_previous_file(
    workdir, capsys, monkeypatch, patch, args, match
) -> None:
    pytest.importorskip("matplotlib")
    target, failure = patch
    monkeypatch.setattr(target, failure)
    before = _snapshot(workdir)
    assert _exit_status([*BT, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    # The previous report is intact and no temporary file is left behind.
    assert (workdir / "report.txt").read_text() == "the previous report\n"
    assert _snapshot(workdir) == before


def test_a_successful_run_replaces_the_report(workdir, capsys) -> None:
    assert _exit_status([*BT, "--out", "report.txt", "--format", "json"]) == 0
    assert json.loads((workdir / "report.txt").read_text())["version"] == 1
    assert not [p for p in workdir.iterdir() if p.name.startswith(".report.txt")]


def test_figures_whose_names_collide_get_distinct_files(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    base = {n: rng.standard_normal((4, 3)).astype(np.float32) for n in ("x/y", "x_y", "X_Y")}
    save_file(base, tmp_path / "base.safetensors")
    save_file({n: 2 * w for n, w in base.items()}, tmp_path / "tuned.safetensors")
    paths = [str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")]
    assert main(["analyze", *paths, "--quiet", "--plots", str(tmp_path / "figs")]) == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["spectra_X_Y.png", "spectra_x_y-2.png", "spectra_x_y-3.png", "summary.png"]


def _raise(exc: BaseException) -> Callable[[], int]:
    def command() -> int:
        raise exc

    return command


RUN_CASES = [
    pytest.param(
        UsageError("--out x: is a directory"),
        r"^demo: error: --out x: is a directory$",
        id="usage-error",
    ),
    pytest.param(
        CheckpointError("m.pt: not a readable PyTorch checkpoint"),
        r"^demo: error: m\.pt: not a readable",
        id="checkpoint-error",
    ),
    pytest.param(
        OSError(errno.ENOSPC, "No space left on device", "out.bin"),
        r"^demo: error: out\.bin: No space left on device$",
        id="os-error-with-a-file",
    ),
    pytest.param(
        PermissionError(errno.EACCES, "Permission denied", "/root/x"),
        r"^demo: error: /root/x: Permission denied$",
        id="permission-denied",
    ),
]


@pytest.mark.parametrize(("exc", "match"), RUN_CASES)
def test_run_reports_expected_failures_as_one_line(capsys, exc, match) -> None:
    assert run("demo", _raise(exc)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert re.match(match, err.strip()), err


@pytest.mark.parametrize("bug", [KeyError("missing"), RuntimeError("bug"), TypeError("bug")])
def test_run_lets_a_bug_show_its_traceback(bug) -> None:
    with pytest.raises(type(bug)):
        run("demo", _raise(bug))


API_CASES = [
    pytest.param(
        lambda: main("analyze --quiet"),
        TypeError,
        r"argv must be a sequence of arguments \(e\.g\. 'analyze --quiet'\.split\(\)\), got str",
        id="main-argv-string",
    ),
    pytest.param(
        lambda: progress([1, 2], quiet="no"),
        TypeError,
        r"quiet must be True or False, got str",
        id="progress-quiet-string",
    ),
    pytest.param(
        lambda: progress([1, 2], quiet=42),
        TypeError,
        r"quiet must be True or False, got int",
        id="progress-quiet-int",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), API_CASES)
def test_bad_arguments_to_the_python_entry_points(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_atomic_output_turns_a_writer_error_into_one_line(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"old")
    with (
        pytest.raises(UsageError, match=r"adapter_model\.safetensors: cannot write \(File too"),
        atomic_output(target, errors=(safetensors.SafetensorError,)),
    ):
        raise safetensors.SafetensorError("File too large")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]


def test_a_real_process_prints_one_line_for_meta_tensors(workdir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuckerlib", "analyze", "meta.pt", "tuned.safetensors"],
        capture_output=True,
        text=True,
        check=False,
        cwd=workdir,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tuckerlib analyze: error: meta.pt: tensor 'a.weight' is a meta tensor: "
        "it has a shape but holds no values"
    ]
