"""Adapter files: save -> load reproduces outputs bitwise; failed loads change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flora
import flora.io


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(idx).transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(h))


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _config(init: str = "zero_core") -> flora.FLoRAConfig:
    return flora.FLoRAConfig(
        ranks=3,
        init=init,
        scale=0.5,
        target_modules=["embed", "conv", "head"],
        target_parameters=["norm.weight"],
    )


def _trained(init: str = "zero_core") -> _Net:
    model = flora.inject(_net(), _config(init))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for p in (layer.core, *layer.factors):
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["types"] == b["types"]
        and a["grad"] == b["grad"]
        and a["state"].keys() == b["state"].keys()
        and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    )


@pytest.mark.parametrize("init", ["zero_core", "hosvd"])
def test_save_load_reproduces_outputs_bitwise(tmp_path: Path, init: str) -> None:
    model = _trained(init)
    idx = torch.randint(0, 10, (2, 7))
    flora.save_adapter(model, tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["layers"]["conv"] == {
        "kind": "Conv1d",
        "shape": [6, 3, 3],
        "ranks": [3, 3, 3],
        "scale": 0.5,
        "init": init,
        "forward": "auto",
        "dropout": 0.0,
        "geometry": {
            "groups": 2,
            "stride": [1],
            "padding": [1],
            "dilation": [1],
            "padding_mode": "zeros",
        },
    }
    assert document["layers"]["embed"]["geometry"] == {"padding_idx": 0, "max_norm": None}
    assert "geometry" not in document["layers"]["head"]
    assert document["layers"]["norm.weight"]["kind"] == "Parameter"
    assert flora.FLoRAConfig.from_dict(document["config"]) == _config(init)
    frozen = flora.load_adapter(_net(), tmp_path)
    assert flora.trainable_parameters(frozen) == 0  # loaded for inference by default
    fresh = flora.load_adapter(_net(), tmp_path, trainable=True)
    assert torch.equal(fresh(idx), model(idx))
    assert flora.trainable_parameters(fresh) == flora.trainable_parameters(model)
    # Frozen tensors may take other torch kernels (matmul folding): rounding only.
    torch.testing.assert_close(frozen(idx), model(idx), rtol=1e-6, atol=1e-6)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved.keys() == flora.adapter_state_dict(model).keys()


def _corrupt_tensors(directory: Path, change: str) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    if change == "missing key":
        del tensors["head.factors.1"]
    else:
        tensors["head.core"] = torch.zeros(2, 3)
    save_file(tensors, str(path))


def _corrupt_config(directory: Path, change: str) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    if change == "wrong kind":
        document["layers"]["conv"]["kind"] = "Conv2d"
    elif change == "unknown module":
        document["layers"]["blocks.9"] = document["layers"].pop("head")
    elif change == "wrong layer shape":
        document["layers"]["head"]["shape"] = [4, 6]
    else:
        document["config"]["rank"] = 4
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    "change",
    [
        "missing key",
        "wrong shape",
        "wrong kind",
        "unknown module",
        "wrong layer shape",
        "unknown config field",
    ],
)
def test_failed_load_leaves_model_unchanged(tmp_path: Path, change: str) -> None:
    flora.save_adapter(_trained("hosvd"), tmp_path)
    if change in ("missing key", "wrong shape"):
        _corrupt_tensors(tmp_path, change)
    else:
        _corrupt_config(tmp_path, change)
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValueError):  # noqa: PT011 - the messages differ per case
        flora.load_adapter(model, tmp_path)
    assert _same(_snapshot(model), before)
    assert not flora.adapted_layers(model)


def test_load_into_adapted_model_fails(tmp_path: Path) -> None:
    flora.save_adapter(_trained(), tmp_path)
    model = _trained()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        flora.load_adapter(model, tmp_path)
    assert _same(_snapshot(model), before)


def test_write_adapter_validates_before_writing(tmp_path: Path) -> None:
    record = {"kind": "Linear", "shape": [3, 4], "ranks": [2, 5], "scale": 1.0, "init": "zero_core"}
    with pytest.raises(ValueError, match="do not fit"):
        flora.write_adapter(tmp_path / "out", flora.FLoRAConfig(), {"fc": record}, {})
    assert not (tmp_path / "out").exists()


def test_save_from_gathered_state_dict_writes_the_same_files(tmp_path: Path) -> None:
    # The FSDP2 recipe: every rank gathers, one rank saves what it gathered.
    model = _trained("hosvd")
    flora.save_adapter(model, tmp_path / "direct")
    state = flora.adapter_state_dict(model)
    flora.save_adapter(model, tmp_path / "given", state_dict=state)
    for name in (flora.io.CONFIG_NAME, flora.io.WEIGHTS_NAME):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "given" / name).read_bytes()
    # The tensors written are the ones passed, not recomputed from the model.
    state["head.core"] = state["head.core"] + 1.0
    flora.save_adapter(model, tmp_path / "changed", state_dict=state)
    written = load_file(str(tmp_path / "changed" / flora.io.WEIGHTS_NAME))
    assert torch.equal(written["head.core"], state["head.core"])


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_save_rejects_a_mismatched_state_dict(tmp_path: Path, change: str) -> None:
    model = _trained()
    state = flora.adapter_state_dict(model)
    if change == "missing":
        del state["head.core"]
    elif change == "unexpected":
        state["head.extra"] = torch.zeros(1)
    else:
        state["head.factors.0"] = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="head"):
        flora.save_adapter(model, tmp_path / "out", state_dict=state)
    assert not (tmp_path / "out").exists()


def test_save_rejects_a_state_dict_that_is_not_a_mapping(tmp_path: Path) -> None:
    model = _trained()
    with pytest.raises(TypeError, match="state_dict"):
        flora.save_adapter(model, tmp_path, state_dict=list(flora.adapter_state_dict(model)))


def _version1(directory: Path, ranks: list[int], init: str = "zero_core") -> torch.Tensor:
    """A version 1 directory (as earlier releases wrote) for Linear(3 -> 5) named "fc"."""
    generator = torch.Generator().manual_seed(0)
    record = {"kind": "Linear", "shape": [5, 3], "ranks": ranks, "scale": 0.5, "init": init}
    document = {
        "format": "flora",
        "format_version": 1,
        "adapter_name": "old",
        "config": {"ranks": 4, "target_modules": ["fc"]},
        "layers": {"fc": record},
    }
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(document))
    tensors = {"fc.core": torch.randn(ranks, generator=generator)}
    for n, (size, rank) in enumerate(zip([5, 3], ranks, strict=True)):
        tensors[f"fc.factors.{n}"] = torch.randn(size, rank, generator=generator)
    if init == "hosvd":
        # The start: the same factors, a tenth of the core.
        tensors["fc.initial_core"] = 0.1 * tensors["fc.core"]
        for n in range(2):
            tensors[f"fc.initial_factors.{n}"] = tensors[f"fc.factors.{n}"].clone()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return 0.5 * tensors["fc.factors.0"] @ tensors["fc.core"] @ tensors["fc.factors.1"].T


class _Fc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 5)


def test_version1_directories_load_with_usable_ranks(tmp_path: Path) -> None:
    # Version 1 kept ranks above the usable ones: (3, 2) compresses exactly to (2, 2).
    delta = _version1(tmp_path / "v1", [3, 2])
    model = flora.load_adapter(_Fc(), tmp_path / "v1")
    layer = model.fc
    assert layer.adapter_names == ("old",)
    assert layer.ranks == (2, 2)
    torch.testing.assert_close(layer.delta_weight(), delta)
    flora.save_adapter(model, tmp_path / "v2")
    document = json.loads((tmp_path / "v2" / "adapter_config.json").read_text())
    assert document["format_version"] == 2
    assert document["layers"]["fc"]["ranks"] == [2, 2]


def test_version1_hosvd_directory_gives_back_its_start(tmp_path: Path) -> None:
    delta = _version1(tmp_path / "v1", [3, 1], init="hosvd")
    model = _Fc()
    weight = model.fc.weight.detach().clone()
    flora.load_adapter(model, tmp_path / "v1")
    layer = model.fc
    assert layer.ranks == (1, 1)
    torch.testing.assert_close(layer.delta_weight(), delta)
    torch.testing.assert_close(layer.base_layer.weight, weight - 0.1 * delta)
    flora.unload(model, merge=False)
    torch.testing.assert_close(model.fc.weight, weight)


def test_attach_adapter_builds_from_tensors_all_or_nothing() -> None:
    model = _net()
    before = _snapshot(model)
    generator = torch.Generator().manual_seed(0)
    b, a = torch.randn(3, 7, generator=generator), torch.randn(7, 6, generator=generator)
    head = flora.TuckerDelta.from_tucker("Linear", torch.eye(7), [b, a.T], scale=2.0)
    assert head.spec.ranks == (3, 3)  # rank 7 on a 3x6 weight, compressed exactly
    wrong = flora.TuckerDelta.from_tucker("Linear", torch.ones(1, 1), [torch.ones(4, 1)] * 2)
    with pytest.raises(ValueError, match=r"layer 'conv'.*Conv1d"):
        flora.attach_adapter(model, "x", {"head": head, "conv": wrong})
    assert _same(_snapshot(model), before)
    flora.attach_adapter(model, "lora", {"head": head}, trainable=False)
    torch.testing.assert_close(model.head.delta_weight(), 2.0 * b @ a)
    assert flora.trainable_parameters(model) == 0


def _edit_layer(directory: Path, layer: str, **changes: object) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document["layers"][layer].pop(key, None)
        else:
            document["layers"][layer][key] = value
    path.write_text(json.dumps(document))


class _Other(_Net):
    """_Net with another geometry but the same weight shapes."""

    def __init__(self, **changes: object) -> None:
        super().__init__()
        if "groups" in changes:
            self.conv = nn.Conv1d(3, 6, 3, padding=1)  # weight (6, 3, 3), as with groups=2
        if "padding_idx" in changes:
            self.embed = nn.Embedding(10, 6, padding_idx=changes["padding_idx"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"groups": 1}, r"layer 'conv': the adapter was saved for a layer with groups=2; .*=1"),
        ({"padding_idx": 3}, r"layer 'embed': .* padding_idx=0; the model's has padding_idx=3"),
        ({"padding_idx": None}, r"layer 'embed': .*=0; the model's has padding_idx=None"),
    ],
)
def test_load_checks_the_recorded_geometry(tmp_path: Path, changes: dict, message: str) -> None:
    flora.save_adapter(_trained(), tmp_path)
    model = _Other(**changes)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        flora.load_adapter(model, tmp_path)
    assert _same(_snapshot(model), before)
    assert flora.read_adapter(tmp_path).geometry["embed"] == {"padding_idx": 0, "max_norm": None}


def test_directories_without_geometry_load_unchecked(tmp_path: Path) -> None:
    flora.save_adapter(_trained(), tmp_path)
    for layer in ("conv", "embed"):
        _edit_layer(tmp_path, layer, geometry=None)
    assert flora.read_adapter(tmp_path).geometry == {}
    flora.load_adapter(_Other(groups=1), tmp_path)


@pytest.mark.parametrize(
    ("layer", "geometry", "message"),
    [
        ("head", {"padding_idx": None, "max_norm": None}, "a Linear layer has no geometry"),
        ("embed", {"padding_idx": 10, "max_norm": None}, r"padding_idx must be null or an int"),
        ("embed", {"padding_idx": 0}, r"must have keys \['padding_idx', 'max_norm'\]"),
        ("conv", {"groups": 4, "stride": [1], "padding": [1], "dilation": [1],
                  "padding_mode": "zeros"}, "groups must be a positive int dividing the 6"),
        ("conv", {"groups": 2, "stride": [1], "padding": "full", "dilation": [1],
                  "padding_mode": "zeros"}, "padding must be 'same', 'valid' or a list of 1"),
    ],
)  # fmt: skip
def test_malformed_geometry_is_refused_by_layer(
    tmp_path: Path, layer: str, geometry: dict, message: str
) -> None:
    flora.save_adapter(_trained(), tmp_path)
    _edit_layer(tmp_path, layer, geometry=geometry)
    with pytest.raises(ValueError, match=rf"layer '{layer}': .*{message}"):
        flora.read_adapter(tmp_path)


def test_write_adapter_takes_geometry_in_records(tmp_path: Path) -> None:
    spec = flora.LayerSpec("Embedding", (5, 3), (2, 2))
    record = {**spec.to_record(), "geometry": {"padding_idx": 4, "max_norm": 2.0}}
    tensors = {"e.core": torch.ones(2, 2), "e.factors.0": torch.ones(5, 2)}
    tensors["e.factors.1"] = torch.ones(3, 2)
    flora.write_adapter(tmp_path, flora.FLoRAConfig(), {"e": record}, tensors)
    saved = flora.read_adapter(tmp_path)
    assert saved.layers["e"] == spec
    assert saved.geometry == {"e": {"padding_idx": 4, "max_norm": 2.0}}
