"""PEFT LoRA directory -> flora records: the same ΔW, the same outputs, refusals by name."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from lora_cases import flora_model
from torch import nn

import flora
from flora._lora_import import lora_to_flora
from flora._tucker import reconstruct
from flora.io import write_adapter
from tuckerlib.io import AdapterError

peft = pytest.importorskip("peft")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.fc = nn.Linear(8, 6)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, (3, 2), stride=(1, 2), padding=(1, 0))
        self.conv3 = nn.Conv3d(4, 3, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.fc(self.embed(idx)).transpose(1, 2))  # (B, 5, L)
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (B, 4, L, 2)
        return self.conv3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1))


_TARGETS = ["embed", "fc", "conv1", "conv2", "conv3"]


def _peft_dir(tmp_path: Path, **options: object) -> tuple[nn.Module, nn.Module, Path]:
    """(base, PEFT model, saved directory) with random A and B (no zero B)."""
    torch.manual_seed(0)
    base = _Net()
    config = peft.LoraConfig(target_modules=_TARGETS, init_lora_weights=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "lora")
    return base, model.eval(), tmp_path / "lora"


def _delta(record: dict, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    factors = [tensors[f"{name}.factors.{n}"] for n in range(len(record["shape"]))]
    return reconstruct(tensors[f"{name}.core"] * record["scale"], factors)


OPTIONS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
    {"r": 3, "lora_alpha": 5, "rank_pattern": {"conv2": 2, "fc": 6}, "alpha_pattern": {"conv1": 1}},
    {"r": 16, "lora_alpha": 16},  # above several mode sizes: ranks shrink exactly
]


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "rslora", "patterns", "high-rank"])
def test_records_hold_peft_delta_weights(tmp_path, options) -> None:
    _, model, directory = _peft_dir(tmp_path, **options)
    converted = lora_to_flora(directory)
    assert sorted(converted.layers) == sorted(_TARGETS)
    for name, record in converted.layers.items():
        expected = model.base_model.model.get_submodule(name).get_delta_weight("default")
        delta = _delta(record, converted.tensors, name)
        torch.testing.assert_close(delta, expected.detach(), rtol=1e-5, atol=1e-6)
        ranks, shape = record["ranks"], record["shape"]
        assert all(r <= s for r, s in zip(ranks, shape, strict=True))
        assert all(r <= math.prod(ranks) // r for r in ranks)  # usable ranks


def test_loaded_flora_model_matches_peft_outputs(tmp_path) -> None:
    base, model, directory = _peft_dir(tmp_path, **OPTIONS[2])
    converted = lora_to_flora(directory)
    write_adapter(tmp_path / "flora", converted.config, converted.layers, converted.tensors)
    adapted = flora.load_adapter(copy.deepcopy(base), tmp_path / "flora").eval()
    idx = torch.randint(0, 12, (2, 5))
    with torch.no_grad():
        expected = model(idx)
        torch.testing.assert_close(
            adapted(idx), expected, rtol=1e-5, atol=1e-5 * expected.abs().max()
        )


def test_fan_in_fan_out_weights_become_parameters(tmp_path) -> None:
    conv1d_type = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(conv1d_type(5, 7))  # weight (in, out) = (7, 5)
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["0"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(tmp_path / "lora")
    converted = lora_to_flora(tmp_path / "lora")
    assert converted.layers["0.weight"]["kind"] == "Parameter"
    assert converted.layers["0.weight"]["shape"] == [7, 5]
    write_adapter(tmp_path / "flora", converted.config, converted.layers, converted.tensors)
    adapted = flora.load_adapter(copy.deepcopy(base), tmp_path / "flora")
    x = torch.randn(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=1e-5, atol=1e-5)


ROUND_TRIPS = [
    (case, init)
    for case in ("Linear", "Conv1d", "Conv2d-grouped", "Conv2d-depthwise", "Parameter")
    for init in ("gaussian", "hosvd")
] + [("Embedding", "gaussian")]


@pytest.mark.parametrize(("case", "init"), ROUND_TRIPS)
def test_round_trip_flora_lora_flora_is_exact(tmp_path, case, init) -> None:
    base, model = flora_model(case, init)
    flora.save_adapter(model, tmp_path / "flora")
    flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=base)
    converted = lora_to_flora(tmp_path / "lora")
    ((name, layer),) = flora.adapted_layers(model).items()
    with torch.no_grad():
        initial = layer.initial_delta()
        expected = layer.delta_weight() - (0 if initial is None else initial)
    delta = _delta(converted.layers[name], converted.tensors, name)
    scale = float(expected.abs().max())
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6 * scale)


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora=True: DoRA rescales"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"peft_type": "LOHA"}, "peft_type='LOHA': only LoRA adapters"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa': this initialization rewrites"),
        ({"bias": "all"}, "bias='all': the adapter trains biases"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config={'top_k': 2}: an option this reader"),
    ],
)
def test_options_without_exact_form_are_refused_by_name(tmp_path, changes, message) -> None:
    _, _, directory = _peft_dir(tmp_path, r=2, lora_alpha=2)
    _edit_config(directory, **changes)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace("[", r"\[")):
        lora_to_flora(directory)


def test_layers_without_exact_form_are_refused_by_name(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Linear(4, 3))
    config = peft.LoraConfig(
        r=2, target_modules=["0"], modules_to_save=["1"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="no exact FLoRA form") as info:
        lora_to_flora(tmp_path / "lora")
    message = str(info.value)
    assert "'0': a grouped LoRA conv (groups=2) whose lora_A mixes input channels" in message
    assert "'1.weight': modules_to_save" in message


def test_flora_directories_and_malformed_ones_are_refused(tmp_path) -> None:
    _, _, directory = _peft_dir(tmp_path, r=2, lora_alpha=2)
    model = flora.inject(nn.Sequential(nn.Linear(3, 3)), flora.FLoRAConfig(ranks=2))
    flora.save_adapter(model, tmp_path / "flora")
    with pytest.raises(ValueError, match="holds a flora adapter"):
        lora_to_flora(tmp_path / "flora")
    _edit_config(directory, rank_pattern={"fc": 3})
    with pytest.raises(AdapterError, match="layer 'fc': r and rank_pattern give rank 3"):
        lora_to_flora(directory)
