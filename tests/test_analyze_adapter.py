"""analyze --adapter: the report from the factors equals the report of the materialized ΔW."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_cases import CASES, flora_model
from torch import nn

import flora
from tuckerlib.cli import main
from tuckerlib.cli._adapter import analyze_layer
from tuckerlib.cli._report import AnalyzeOptions, analyze_delta
from tuckerlib.io import open_adapter

peft = pytest.importorskip("peft")

OPTIONS = [
    AnalyzeOptions(),
    AnalyzeOptions((("0.5", 0.5), ("0.999", 0.999)), lora_rank=2, fixed_kernel_rank=1),
]


def _assert_same_report(directory: Path, options: AnalyzeOptions) -> int:
    checked = 0
    with open_adapter(directory) as adapter:
        for name in adapter:
            layer = adapter[name]
            factored = analyze_layer(layer, options)
            # The weight's name in a checkpoint, from which analyze tells its kind.
            weight = name if layer.kind == "Parameter" else f"{name}.weight"
            dense = analyze_delta(weight, layer.to_tensor(np.float64), 0.0, options)
            # The dense spectra come from float64 Gram matrices: exact zeros
            # there read as noise of about sqrt(eps) times the largest value.
            top = float(dense.spectra[0][0])
            for s, t in zip(factored.spectra, dense.spectra, strict=True):
                np.testing.assert_allclose(s, t, rtol=1e-9, atol=1e-7 * top)
            assert factored.energy_ranks == dense.energy_ranks
            np.testing.assert_allclose(factored.effective_ranks, dense.effective_ranks, rtol=1e-6)
            assert factored.recommended_ranks == dense.recommended_ranks
            assert factored.budget == dense.budget
            # A checkpoint name says "embedding" only when it mentions one.
            assert factored.kind == dense.kind or layer.kind == "Embedding"
            assert factored.delta_norm == pytest.approx(dense.delta_norm, rel=1e-12)
            assert factored.tucker_error == pytest.approx(dense.tucker_error, abs=1e-7)
            assert factored.matrix_error == pytest.approx(dense.matrix_error, abs=1e-7)
            checked += 1
    return checked


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "pinned"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flora_adapter_report_equals_the_materialized_one(tmp_path, case, options) -> None:
    _, model = flora_model(case, "hosvd" if case.startswith("Conv2d") else "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    assert _assert_same_report(tmp_path / "flora", options) == 1


def _peft_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    layers = [nn.Embedding(9, 6), nn.Linear(6, 8), nn.Conv1d(8, 6, 3), nn.Conv2d(6, 5, 3)]
    base = nn.Sequential(*layers, nn.Conv3d(5, 4, 2))
    config = peft.LoraConfig(
        r=4, lora_alpha=3, target_modules=["0", "1", "2", "3", "4"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "pinned"])
def test_lora_adapter_report_equals_the_materialized_one(tmp_path, options) -> None:
    assert _assert_same_report(_peft_dir(tmp_path), options) == 5


def test_json_report_is_version_2(tmp_path, capsys) -> None:
    directory = _peft_dir(tmp_path)
    assert main(["analyze", "--adapter", str(directory), "--format", "json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == 2
    assert (report["base"], report["tuned"]) == (None, None)
    assert (report["adapter"], report["adapter_format"]) == (str(directory), "lora")
    linear = next(t for t in report["tensors"] if t["name"] == "1")
    assert linear["kind"] == "linear"
    assert linear["relative_delta"] is None
    assert linear["adapter_ranks"] == [4]
    assert linear["adapter_params"] == 4 * (6 + 8)
    assert linear["exact_ranks"] == [4, 4]
    assert linear["exact_params"] == 16 + 4 * (6 + 8)
    conv = next(t for t in report["tensors"] if t["name"] == "3")
    assert conv["exact_ranks"][0] == 4
    assert conv["exact_params"] < conv["adapter_params"] or conv["exact_ranks"][1] == 6


def test_table_and_markdown_name_the_adapter(tmp_path, capsys) -> None:
    _, model = flora_model("Conv1d", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    assert main(["analyze", "--adapter", str(tmp_path / "flora"), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("Rank structure of the adapter's updates dW: 1 tensors analyzed")
    assert f"  flora adapter  {tmp_path / 'flora'}" in table
    assert "adapter ranks  adapter params  exact ranks  exact params" in table
    assert main(["analyze", "--adapter", str(tmp_path / "flora"), "--format", "markdown"]) == 0
    assert f"- flora adapter: `{tmp_path / 'flora'}`" in capsys.readouterr().out


def test_skipped_layers_and_filters(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Linear(4, 3), nn.Linear(3, 3))
    config = peft.LoraConfig(
        r=2, target_modules=["0", "1"], modules_to_save=["2"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(base, config).save_pretrained(tmp_path / "lora")
    args = ["analyze", "--adapter", str(tmp_path / "lora"), "--format", "json", "--quiet"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in report["tensors"]] == ["1"]
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert "mixes input channels across groups" in reasons["0"]
    assert reasons["2.weight"].startswith("modules_to_save")
    assert main([*args, "--include", "^1$"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert ([t["name"] for t in report["tensors"]], report["skipped"]) == (["1"], [])


def test_a_zero_update_is_skipped(tmp_path, capsys) -> None:
    model = flora.inject(
        nn.Sequential(nn.Linear(4, 3)), flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    )
    flora.save_adapter(model, tmp_path / "flora")
    assert main(["analyze", "--adapter", str(tmp_path / "flora"), "--quiet"]) == 0
    assert "unchanged (dW = 0): 0" in capsys.readouterr().out


def test_plots(tmp_path) -> None:
    _, model = flora_model("Conv2d", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    args = ["analyze", "--adapter", str(tmp_path / "flora"), "--plots", str(tmp_path / "p")]
    assert main([*args, "--quiet", "--out", str(tmp_path / "r.txt")]) == 0
    assert sorted(p.suffix for p in (tmp_path / "p").iterdir()) == [".png", ".png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "{flora}", "{flora}", "{flora}"], "not both"),
        (["--adapter", "{missing}"], "missing: not a directory"),
        (["--adapter", "{flora}", "--include", "nothing"], "no adapted layer"),
        (["--adapter", "{dora}"], "use_dora=True"),
        (["--adapter", "{flora}", "--out", "{flora}/adapter_config.json"], "would overwrite"),
    ],
)
def test_input_errors_exit_2_with_one_line(tmp_path, capsys, args, message) -> None:
    _, model = flora_model("Linear", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    dora = _peft_dir(tmp_path)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    paths = {"flora": tmp_path / "flora", "missing": tmp_path / "missing", "dora": dora}
    assert main(["analyze", *(a.format(**paths) for a in args), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
