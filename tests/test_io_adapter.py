"""open_adapter: flora and PEFT LoRA directories as Tucker updates equal to the layers' ΔW."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_cases import CASES, flora_model
from safetensors.torch import load_file, save_file
from torch import nn

import flora
from tuckerlib.io import AdapterError, CheckpointError, open_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("init", ["gaussian", "hosvd"])
def test_flora_layers_read_as_their_update(tmp_path, case, init) -> None:
    _, model = flora_model(case, init)
    flora.save_adapter(model, tmp_path / "flora")
    ((name, layer),) = flora.adapted_layers(model).items()
    with open_adapter(tmp_path / "flora") as adapter:
        assert adapter.format == "flora"
        assert adapter.skipped == []
        read = adapter[name]
    assert (read.kind, read.shape, read.stored_ranks) == (layer.kind, layer.shape, layer.ranks)
    assert read.stored_params == layer.n_adapter_params
    # The update as the layer applies it: an Embedding's padding row is zero.
    with torch.no_grad():
        expected = layer.delta_weight()
        initial = layer.initial_delta()
        if initial is not None:
            expected = expected - initial
    np.testing.assert_allclose(read.to_tensor(), expected.numpy(), rtol=1e-5, atol=1e-6)
    if case == "Embedding":
        assert read.geometry == {"padding_idx": 0, "max_norm": None}
        assert not read.to_tensor()[0].any()


def _peft_dir(tmp_path: Path, base: nn.Module, **options: object) -> nn.Module:
    config = peft.LoraConfig(init_lora_weights=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "lora")
    return model


def test_peft_layers_read_as_their_delta_weight(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Embedding(9, 4),
        nn.Linear(4, 6),
        nn.Conv1d(6, 5, 3),
        nn.Conv2d(5, 4, 2),
        nn.Conv3d(4, 2, 2),
    )
    model = _peft_dir(
        tmp_path,
        base,
        r=3,
        lora_alpha=5,
        use_rslora=True,
        target_modules=["0", "1", "2", "3", "4"],
        rank_pattern={"2": 2},
        alpha_pattern={"^3": 7},
    )
    with open_adapter(tmp_path / "lora") as adapter:
        assert adapter.format == "lora"
        kinds = {name: adapter[name].kind for name in adapter}
        assert kinds == {
            "0": "Embedding",
            "1": "Linear",
            "2": "Conv1d",
            "3": "Conv2d",
            "4": "Conv3d",
        }
        for name in adapter:
            expected = model.base_model.model.get_submodule(name).get_delta_weight("default")
            np.testing.assert_allclose(
                adapter[name].to_tensor(), expected.detach().numpy(), rtol=1e-5, atol=1e-6
            )
        assert adapter["2"].stored_ranks == (2,)
        assert adapter["3"].scale == pytest.approx(7 / 3**0.5)


def test_peft_target_parameters_read_as_parameters(tmp_path) -> None:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.matrix = nn.Parameter(torch.randn(5, 6))
    holder.stack = nn.Parameter(torch.randn(3, 4, 6))
    other = nn.Module()
    other.matrix = nn.Parameter(torch.randn(5, 6))
    base = nn.Sequential(other, holder)
    _peft_dir(tmp_path, base, r=2, target_modules=[], target_parameters=["0.matrix", "1.stack"])
    with open_adapter(tmp_path / "lora") as adapter:
        assert list(adapter) == ["0.matrix"]
        assert adapter["0.matrix"].kind == "Parameter"
        assert adapter["0.matrix"].shape == (5, 6)
        assert [name for name, _ in adapter.skipped] == ["1.stack"]
        assert "3-D target_parameters" in adapter.skipped[0][1]


def _flora_dir(tmp_path: Path) -> Path:
    _, model = flora_model("Linear", "gaussian")
    return flora.save_adapter(model, tmp_path / "flora")


#: An ``_edit`` value that removes the key.
_DROP = object()


def _edit(directory: Path, **changes: object) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    document.update(changes)
    document = {k: v for k, v in document.items() if v is not _DROP}
    path.write_text(json.dumps(document))


def test_flora_format_2_lists_modules_to_save_as_skipped(tmp_path) -> None:
    directory = _flora_dir(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["modules_to_save.head.weight"] = torch.ones(2, 2)
    save_file(tensors, directory / "adapter_model.safetensors")
    _edit(directory, format_version=2, modules_to_save=["head"])
    with open_adapter(directory) as adapter:
        assert list(adapter) == ["0"]
        assert adapter.skipped[0][0] == "head"
        assert "modules_to_save" in adapter.skipped[0][1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 3}, "unsupported format_version 3; this flora reads 1 and 2"),
        ({"layers": {}}, "layers must be a non-empty JSON object"),
        ({"layers": {"0": {"kind": "Linear"}}}, "layer '0': a layer record must have keys"),
        ({"format": "other", "peft_type": _DROP}, "neither a flora adapter config"),
        # A flora folder's peft_type names flora, for PEFT's reader and this one.
        ({"format": "other"}, "peft_type='FLORA: a flora adapter, not a PEFT one"),
    ],
)
def test_malformed_flora_configs_are_named(tmp_path, change, message) -> None:
    directory = _flora_dir(tmp_path)
    _edit(directory, **change)
    with pytest.raises(AdapterError, match=message):
        open_adapter(directory)


def test_malformed_files_are_named(tmp_path) -> None:
    directory = _flora_dir(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    save_file({**tensors, "stray": torch.ones(1)}, directory / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"missing \[\], unexpected \['stray'\]"):
        open_adapter(directory)
    del tensors["0.factors.1"]
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"missing \['0\.factors\.1'\]"):
        open_adapter(directory)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter weights"):
        open_adapter(directory)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        open_adapter(directory)
    with pytest.raises(AdapterError, match="not an adapter directory"):
        open_adapter(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        open_adapter(tmp_path / "missing")


def test_reading_and_analysis_need_no_torch(tmp_path) -> None:
    directory = _flora_dir(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from tuckerlib.cli import main
        from tuckerlib.io import open_adapter
        with open_adapter({str(directory)!r}) as adapter:
            shape = adapter["0"].to_tensor().shape
        status = main(["analyze", "--adapter", {str(directory)!r}, "--quiet", "--format", "json",
                       "--out", {str(tmp_path / "report.json")!r}])
        print(shape, status, "torch" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(5, 6) 0 False"


def test_peft_pickle_weights_read_safely(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    config = peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "lora", safe_serialization=False)
    assert (tmp_path / "lora" / "adapter_model.bin").is_file()
    with open_adapter(tmp_path / "lora") as adapter:
        expected = model.base_model.model[0].get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(adapter["0"].to_tensor(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("case", "geometry", "message"),
    [
        ("Embedding", {"padding_idx": 10, "max_norm": None}, r"geometry: padding_idx must be null"),
        ("Embedding", {"padding_idx": True, "max_norm": None}, r"geometry: padding_idx must be"),
        ("Embedding", [0], "the geometry of a Embedding must have keys"),
        ("Linear", {"groups": 1}, "a Linear layer has no geometry"),
    ],
)
def test_malformed_flora_geometry_is_named(tmp_path, case, geometry, message) -> None:
    _, model = flora_model(case, "gaussian")
    directory = flora.save_adapter(model, tmp_path / "flora")
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    document["layers"]["0"]["geometry"] = geometry
    path.write_text(json.dumps(document))
    with pytest.raises(AdapterError, match=f"layer '0': {message}"):
        open_adapter(directory)


def _crafted_lora(tmp_path: Path, rank_pattern: dict[str, int]) -> Path:
    """A PEFT LoRA directory for one Linear named 34 'a's and a '!', with ``rank_pattern``."""
    directory = tmp_path / "crafted"
    directory.mkdir()
    name = "a" * 34 + "!"
    save_file(
        {
            f"base_model.model.{name}.lora_A.weight": torch.ones(2, 3),
            f"base_model.model.{name}.lora_B.weight": torch.ones(4, 2),
        },
        str(directory / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "rank_pattern": rank_pattern}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_a_crafted_rank_pattern_cannot_hang_the_reader(tmp_path) -> None:
    directory = _crafted_lora(tmp_path, {"(a+)+": 5})
    # The catastrophic key does not match (the name ends in "!"), so r = 2 and
    # scale 1 apply; Python's re takes over a minute to find that out.
    with open_adapter(directory) as adapter:
        (name,) = adapter
        assert adapter[name].stored_ranks == (2,)
        np.testing.assert_allclose(adapter[name].to_tensor(), 2 * np.ones((4, 3)))


def test_a_pattern_re2_cannot_run_is_named(tmp_path) -> None:
    directory = _crafted_lora(tmp_path, {r"(a)\1": 2})
    with pytest.raises(AdapterError, match=r"rank_pattern: pattern '\(a\)\\\\1' is not a regular"):
        open_adapter(directory)


def test_without_re2_only_patterns_that_cannot_backtrack_are_read(tmp_path, monkeypatch) -> None:
    import tuckerlib.io._patterns as patterns

    monkeypatch.setattr(patterns, "_re2", lambda: None)
    assert patterns.suffix_matcher(r"layers\.0\.q_proj")("model.layers.0.q_proj")
    with pytest.raises(AdapterError, match=r"repeats or alternates.*install google-re2"):
        open_adapter(_crafted_lora(tmp_path, {"(a+)+": 5}))
