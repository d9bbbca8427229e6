"""``tuckerlib analyze``: pairing, the reported numbers, formats, plots, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tuckerlib import tucker_params
from tuckerlib.analysis import lora_budget, tensor_kind
from tuckerlib.cli import main

PLANTED = {"conv.weight": (3, 2, 2, 1), "fc.weight": (4, 4)}
SHAPES = {"conv.weight": (12, 10, 3, 3), "fc.weight": (20, 16)}


def _planted_delta(rng: np.random.Generator, shape: tuple[int, ...], ranks: tuple[int, ...]):
    factors = [
        np.linalg.qr(rng.standard_normal((i, r)))[0] for i, r in zip(shape, ranks, strict=True)
    ]
    # A core with well-separated unfoldings: its smallest mode singular value
    # carries far more than the float32 rounding of tuned = base + dW.
    core = rng.standard_normal(ranks) + 2.0
    delta = core
    for mode, u in enumerate(factors):
        delta = np.moveaxis(np.tensordot(u, delta, axes=(1, mode)), 0, mode)
    return delta


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base, tuned = {}, {}
    for name, shape in SHAPES.items():
        base[name] = rng.standard_normal(shape).astype(np.float32)
        tuned[name] = (base[name] + 0.1 * _planted_delta(rng, shape, PLANTED[name])).astype(
            np.float32
        )
    base["fc.bias"] = tuned["fc.bias"] = np.zeros(20, np.float32)
    base["frozen.weight"] = tuned["frozen.weight"] = np.ones((3, 3), np.float32)
    base["steps"], tuned["steps"] = np.zeros((2, 2), np.int64), np.ones((2, 2), np.int64)
    base["head.weight"], tuned["head.weight"] = (
        np.ones((4, 5), np.float32),
        np.ones((5, 4), np.float32),
    )
    base["only_base.weight"] = np.ones((2, 2), np.float32)
    tuned["only_tuned.weight"] = np.ones((2, 2), np.float32)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def _json_report(capsys, *args: str) -> dict:
    assert main(["analyze", *args, "--format", "json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_energy_ranks_recover_the_planted_multilinear_rank(pair, capsys) -> None:
    report = _json_report(capsys, *map(str, pair), "--energy", "0.5,0.999999")
    tensors = {t["name"]: t for t in report["tensors"]}
    assert set(tensors) == set(PLANTED)
    for name, ranks in PLANTED.items():
        assert tensors[name]["energy_ranks"]["0.999999"] == list(ranks)
        assert all(a <= b for a, b in zip(tensors[name]["energy_ranks"]["0.5"], ranks, strict=True))
        # The budget of a rank-8 LoRA holds the planted Tucker tensor. ΔW is
        # analyzed in float32 through Gram matrices: errors below about
        # sqrt(eps32) ~ 3e-4 are rounding.
        assert tensors[name]["tucker_error"] < 1e-3
        recommended = tensors[name]["recommended_ranks"]
        assert all(a >= b for a, b in zip(recommended, ranks, strict=True))
        assert tucker_params(SHAPES[name], recommended) <= lora_budget(SHAPES[name], 8)
    assert tensors["conv.weight"]["kind"] == "conv"
    assert tensors["fc.weight"]["kind"] == "linear"
    # A LoRA of the (out, rest) reshape needs rank 3 to be exact: rank 8 is enough...
    assert tensors["conv.weight"]["matrix_error"] < 1e-3
    # ...but at rank 2 it is not, while the Tucker tensor still fits the budget.
    tight = {
        t["name"]: t
        for t in _json_report(capsys, *map(str, pair), "--budget-like-lora", "2")["tensors"]
    }
    assert tight["conv.weight"]["matrix_error"] > 0.05
    assert tight["conv.weight"]["tucker_error"] < 1e-3


def test_json_follows_the_version_1_schema(pair, capsys) -> None:
    base, tuned = pair
    report = _json_report(capsys, str(base), str(tuned), "--energy", "0.90,0.99")
    assert set(report) == {"version", "base", "tuned", "tensors", "skipped"}
    assert report["version"] == 1
    assert (report["base"], report["tuned"]) == (str(base), str(tuned))
    keys = {
        "name", "shape", "kind", "delta_norm", "relative_delta", "energy_ranks",
        "effective_ranks", "tucker_error", "matrix_error", "recommended_ranks",
    }  # fmt: skip
    for tensor in report["tensors"]:
        assert set(tensor) == keys
        ndim = len(tensor["shape"])
        assert tensor["kind"] in {"linear", "conv", "embedding", "other"}
        assert list(tensor["energy_ranks"]) == ["0.90", "0.99"]
        for ranks in tensor["energy_ranks"].values():
            assert len(ranks) == ndim
            assert all(isinstance(r, int) for r in ranks)
        assert len(tensor["effective_ranks"]) == ndim
        assert len(tensor["recommended_ranks"]) == ndim
        assert all(isinstance(tensor[k], float) for k in ("delta_norm", "tucker_error"))
        assert 0.0 <= tensor["matrix_error"] <= 1.0
    base_tensors, tuned_tensors = load_file(base), load_file(tuned)
    for tensor in report["tensors"]:
        w0 = base_tensors[tensor["name"]].astype(np.float64)
        delta = tuned_tensors[tensor["name"]] - base_tensors[tensor["name"]]
        norm = np.linalg.norm(delta.astype(np.float64))
        assert tensor["delta_norm"] == pytest.approx(norm, rel=1e-5)
        assert tensor["relative_delta"] == pytest.approx(norm / np.linalg.norm(w0), rel=1e-5)


def test_skipped_tensors_carry_their_reason(pair, capsys) -> None:
    skipped = {s["name"]: s["reason"] for s in _json_report(capsys, *map(str, pair))["skipped"]}
    assert skipped == {
        "fc.bias": "1-D tensor (bias, norm or scalar): no rank structure",
        "frozen.weight": "unchanged (dW = 0)",
        "steps": "not floating point (I64)",
        "head.weight": "shape differs (base 4x5, tuned 5x4)",
        "only_base.weight": "missing in tuned",
        "only_tuned.weight": "missing in base",
    }


@pytest.mark.parametrize(("pattern", "flag", "expected"), [
    ("^conv", "--include", {"conv.weight"}),
    ("^conv", "--exclude", {"fc.weight"}),
])  # fmt: skip
def test_include_exclude_filter_names(pair, capsys, pattern, flag, expected) -> None:
    report = _json_report(capsys, *map(str, pair), flag, pattern)
    assert {t["name"] for t in report["tensors"]} == expected
    skipped = {s["name"] for s in report["skipped"]}
    assert all((flag == "--include") == bool(__import__("re").search(pattern, n)) for n in skipped)


def test_fixed_kernel_rank_pins_conv_kernel_modes(pair, capsys) -> None:
    report = _json_report(capsys, *map(str, pair), "--fixed-kernel-rank", "1")
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors["conv.weight"]["recommended_ranks"][2:] == [1, 1]
    # The planted kernel mode 2 has rank 2: pinning it to 1 loses energy.
    assert tensors["conv.weight"]["tucker_error"] > 1e-3
    unpinned = {t["name"]: t for t in _json_report(capsys, *map(str, pair))["tensors"]}
    assert tensors["fc.weight"] == unpinned["fc.weight"]  # only convolutions are pinned


def test_table_and_markdown(pair, capsys) -> None:
    assert main(["analyze", *map(str, pair), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "2 tensors analyzed, 6 skipped" in table
    header = next(line for line in table.splitlines() if line.startswith("tensor"))
    for column in ("kind", "shape", "ranks@0.9", "ranks@0.99", "FLoRA ranks", "LoRA err"):
        assert column in header
    row = next(line for line in table.splitlines() if line.startswith("conv.weight"))
    # Columns are aligned: every cell starts where its header does.
    assert row.index("12x10x3x3") == header.index("shape")
    assert "Summary by kind" in table
    assert "missing in base: only_tuned.weight" in table

    assert main(["analyze", *map(str, pair), "--quiet", "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| tensor | kind | shape")
    assert rows[1].startswith("|---|")
    assert any(line.startswith("| `conv.weight` | conv | 12x10x3x3 |") for line in rows)
    assert len({line.count("|") for line in rows[:4]}) == 1


def test_out_file_and_plots(pair, tmp_path: Path, capsys) -> None:
    out, plots = tmp_path / "report.md", tmp_path / "figures"
    args = ["analyze", *map(str, pair), "--format", "markdown", "--out", str(out)]
    assert main([*args, "--plots", str(plots)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "wrote" in captured.err
    assert out.read_text().startswith("## Rank structure")
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["spectra_conv.weight.png", "spectra_fc.weight.png", "summary.png"]
    for path in plots.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fails(capsys, *args: str) -> str:
    assert main(["analyze", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_input_errors_exit_2_with_one_line(pair, tmp_path: Path, capsys) -> None:
    base, tuned = map(str, pair)
    assert "no such file" in _fails(capsys, str(tmp_path / "absent.safetensors"), tuned)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    assert "not a safetensors file" in _fails(capsys, str(garbage), tuned)
    other = tmp_path / "other.safetensors"
    save_file({"unrelated": np.ones((2, 2), np.float32)}, other)
    assert "no tensor name is in both" in _fails(capsys, base, str(other))
    assert "after --include" in _fails(capsys, base, tuned, "--include", "^nothing$")
    assert "give both BASE and TUNED" in _fails(capsys, base)
    unwritable = tmp_path / "missing-dir" / "report.txt"
    assert "no directory" in _fails(capsys, base, tuned, "--quiet", "--out", str(unwritable))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--energy", "0.9,1.5"], "outside (0, 1]"),
        (["--energy", "0.9,x"], "comma-separated"),
        (["--energy", "0.9,0.9"], "twice"),
        (["--budget-like-lora", "0"], "integer >= 1"),
        (["--include", "("], "invalid regular expression"),
        (["--format", "yaml"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_kind_classification_and_budget() -> None:
    assert tensor_kind("model.embed_tokens.weight", (100, 8)) == "embedding"
    assert tensor_kind("transformer.wte.weight", (100, 8)) == "embedding"
    assert tensor_kind("layers.0.q_proj.weight", (8, 8)) == "linear"
    assert tensor_kind("features.0.weight", (8, 3, 3, 3)) == "conv"
    assert tensor_kind("conv1d.weight", (8, 3, 5)) == "conv"
    assert tensor_kind("pos_embed", (1, 197, 768)) == "other"
    assert tensor_kind("rel_bias_table", (10, 4)) == "other"
    assert lora_budget((64, 32, 3, 3), 8) == 8 * (64 + 288)
    assert lora_budget((16, 1, 3, 3), 16) == 9 * (16 + 9)


def test_bundled_example_end_to_end_via_python_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuckerlib", "analyze"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    lines = result.stdout.splitlines()
    assert "5 tensors analyzed" in lines[0]
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"):
        assert any(line.startswith(name) for line in lines)
    assert "digits" in result.stdout
