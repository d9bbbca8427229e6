"""import_lora: PEFT LoRA directories become FLoRA adapters with PEFT's outputs, or are refused."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from lora_cases import CASES, flora_model
from torch import nn

import flora
from tuckerlib.io import AdapterError

peft = pytest.importorskip("peft")


class _Net(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8, padding_idx=padding_idx)
        self.fc = nn.Linear(8, 6)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, (3, 2), stride=(1, 2), padding=(1, 0))
        self.conv3 = nn.Conv3d(4, 3, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.fc(self.embed(idx)).transpose(1, 2))  # (B, 5, L)
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (B, 4, L, 2)
        return self.conv3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1))


_TARGETS = ["embed", "fc", "conv1", "conv2", "conv3"]
_IDX = torch.tensor([[0, 3, 7, 11, 0], [5, 0, 2, 9, 1]])


def _quiet_peft(make: object, *args: object) -> nn.Module:
    with warnings.catch_warnings():
        # PEFT warns about custom models, grouped convs and fan_in_fan_out.
        warnings.simplefilter("ignore")
        return make(*args)


def _save_peft(base: nn.Module, directory: Path, **options: object) -> nn.Module:
    """A PEFT model of ``base`` with random A and B (no zero B), saved to ``directory``."""
    options = {"init_lora_weights": False, **options}
    model = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**options))
    model.save_pretrained(directory)
    return model.eval()


def _peft_dir(tmp_path: Path, **options: object) -> tuple[nn.Module, nn.Module, Path]:
    torch.manual_seed(0)
    base = _Net()
    model = _save_peft(base, tmp_path / "lora", target_modules=_TARGETS, **options)
    return base, model, tmp_path / "lora"


def _assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


OPTIONS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
    {"r": 3, "lora_alpha": 5, "rank_pattern": {"conv2": 2, "fc": 6}, "alpha_pattern": {"conv1": 1}},
    {"r": 3, "lora_alpha": 5, "use_rslora": True, "rank_pattern": {"^conv3": 2}},
    {"r": 16, "lora_alpha": 16},  # above several mode sizes: ranks shrink exactly
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=["plain", "rslora", "patterns", "rslora-patterns", "high-rank"]
)
def test_imported_adapters_give_peft_outputs(tmp_path, options) -> None:
    base, peft_model, directory = _peft_dir(tmp_path, **options)
    model = flora.import_lora(copy.deepcopy(base), directory)
    layers = flora.adapted_layers(model)
    assert sorted(layers) == sorted(_TARGETS)
    for name, layer in layers.items():
        expected = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(layer.delta_weight(), expected.detach(), rtol=1e-5, atol=1e-6)
        assert layer.ranks == flora.LayerSpec(layer.kind, layer.shape, layer.ranks).ranks
    with torch.no_grad():
        _assert_same_outputs(model(_IDX), peft_model(_IDX))
    assert flora.trainable_parameters(model) == 0
    assert layers["fc"].adapters["default"].spec.dropout == 0.0


def test_trainable_import_keeps_dropout_and_gradients(tmp_path) -> None:
    base, _, directory = _peft_dir(tmp_path, r=2, lora_alpha=2, lora_dropout=0.25)
    model = flora.import_lora(copy.deepcopy(base), directory, trainable=True)
    layers = flora.adapted_layers(model)
    assert layers["conv1"].spec.dropout == 0.25
    assert layers["embed"].spec.dropout == 0.0  # PEFT's Embedding has no dropout either
    assert flora.trainable_parameters(model) == sum(
        layer.n_adapter_params for layer in layers.values()
    )


def test_conv1d_weights_stored_in_out_become_conv1d_layers(tmp_path) -> None:
    conv1d_type = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(conv1d_type(5, 7), nn.Linear(5, 4))  # Conv1D weight (in, out) = (7, 5)
    x = torch.randn(2, 7)
    for fan_in_fan_out in (True, False):
        # PEFT sets fan_in_fan_out itself to the module's layout; the branch is x -> B A x.
        directory = tmp_path / f"lora-{fan_in_fan_out}"
        options = {"r": 3, "lora_alpha": 6, "target_modules": ["0", "1"]}
        _save_peft(base, directory, fan_in_fan_out=fan_in_fan_out, **options)
        peft_model = _quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), directory)
        model = _quiet_peft(flora.import_lora, copy.deepcopy(base), directory)
        layers = flora.adapted_layers(model)
        assert {n: layer.kind for n, layer in layers.items()} == {"0": "Conv1D", "1": "Linear"}
        assert layers["0"].shape == (5, 7)  # the (out, in) map of a weight stored (7, 5)
        with torch.no_grad():
            _assert_same_outputs(model(x), peft_model.eval()(x))


def test_padding_rows_and_grouped_convs_import_where_exact(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(10, 6, padding_idx=2), nn.Conv1d(6, 6, 3, groups=3))
    with torch.no_grad():
        base[0].weight[2].normal_()  # a pretrained padding row is rarely zero
    flora_model_ = flora.inject(
        copy.deepcopy(base), flora.FLoRAConfig(ranks=3, init="gaussian", target_modules=["0", "1"])
    )
    with torch.no_grad():
        for layer in flora.adapted_layers(flora_model_).values():
            layer.core.normal_()
    flora.export_lora(flora_model_, tmp_path / "lora")
    peft_model = _quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "lora")
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    idx = torch.tensor([[2, 1, 2, 7, 9, 2]])
    with torch.no_grad():
        head = lambda m: m[1](m[0](idx).transpose(1, 2))  # noqa: E731
        _assert_same_outputs(head(model), head(peft_model.base_model.model))
        _assert_same_outputs(head(model), head(flora_model_))


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.Conv2d(3, 4, 3, dilation=2), "dilation (2, 2): PEFT runs lora_A with dilation 1"),
        (nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), "padding_mode 'circular'"),
        (nn.Embedding(5, 4, max_norm=1.0), "max_norm 1.0: PEFT renormalizes"),
        (nn.Embedding(5, 4, padding_idx=1), "padding_idx 1: the LoRA updates the padding row"),
        (nn.Conv2d(4, 6, 3, groups=2), "a grouped LoRA conv (groups=2) whose lora_A mixes"),
    ],
)
def test_layers_without_exact_form_are_refused_by_name(tmp_path, layer, reason) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 3), layer)
    _save_peft(base, tmp_path / "lora", r=2, target_modules=["0", "1"])
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="no exact FLoRA form") as info:
        flora.import_lora(model, tmp_path / "lora")
    assert f"layer '1' ({reason}" in str(info.value)
    _assert_unchanged(model, before)


def test_models_that_do_not_match_the_lora_are_refused_by_name(tmp_path) -> None:
    _, _, directory = _peft_dir(tmp_path, r=2, lora_alpha=2)
    other = _Net()
    other.fc = nn.Linear(8, 7)
    other.conv1 = nn.Conv2d(6, 5, 3)
    del other.conv3
    with pytest.raises(ValueError, match="no exact FLoRA form") as info:
        flora.import_lora(other, directory)
    message = str(info.value)
    assert "layer 'fc' (the LoRA is for a 6x8 (out x in) map, the model's weight has" in message
    assert "layer 'conv1' (the model's 'conv1' is a Conv2d, not a torch.nn.Conv1d)" in message
    assert "layer 'conv3' (the model has no module 'conv3')" in message


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora=True: DoRA rescales"),
        ({"lora_bias": True}, "lora_bias=True, but the adapter holds no lora_B.bias"),
        ({"peft_type": "LOHA"}, "peft_type='LOHA': only LoRA adapters"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa': this initialization rewrites"),
        ({"bias": "all"}, "bias='all': the adapter trains biases"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config={'top_k': 2}: an option this reader"),
    ],
)
def test_options_without_exact_form_are_refused_by_name(tmp_path, changes, message) -> None:
    base, _, directory = _peft_dir(tmp_path, r=2, lora_alpha=2)
    _edit_config(directory, **changes)
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace("[", r"\[")):
        flora.import_lora(model, directory)
    _assert_unchanged(model, before)


class _Headed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_modules_to_save_become_saved_modules(tmp_path) -> None:
    torch.manual_seed(0)
    base = _Headed().eval()
    config = peft.LoraConfig(
        r=2, target_modules=["body"], modules_to_save=["head"], init_lora_weights=False
    )
    peft_model = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), config)
    with torch.no_grad():
        saved = peft_model.base_model.model.head.modules_to_save["default"]
        for p in saved.parameters():
            p.add_(torch.randn_like(p))
        saved[1].running_var.fill_(2.0)
    peft_model.save_pretrained(tmp_path / "lora")
    loaded = _quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "lora")
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    assert isinstance(model.head, flora.ModulesToSave)
    x = torch.randn(6, 4)
    with torch.no_grad():
        _assert_same_outputs(model(x), loaded.eval()(x))
        _assert_same_outputs(model(x), peft_model.eval()(x))
        with flora.disable_adapter(model):
            torch.testing.assert_close(model(x), base(x))


def test_a_second_named_adapter_on_an_adapted_model(tmp_path) -> None:
    base, peft_model, directory = _peft_dir(tmp_path, r=3, lora_alpha=6)
    model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(ranks=2, target_modules=["fc"]))
    flora.import_lora(model, directory, adapter_name="lora")
    assert sorted(flora.adapter_names(model)) == ["default", "lora"]
    assert flora.active_adapters(model) == ["default"]
    flora.set_adapter(model, "lora")
    with torch.no_grad():
        _assert_same_outputs(model(_IDX), peft_model(_IDX))


def test_a_failed_import_leaves_the_model_bit_for_bit_unchanged(tmp_path) -> None:
    torch.manual_seed(0)
    base = _Net()
    base.conv3 = nn.Conv3d(4, 3, 2, dilation=(1, 1, 2))  # only the last layer has no exact form
    _save_peft(base, tmp_path / "lora", r=2, target_modules=_TARGETS)
    _save_peft(base, tmp_path / "first", r=2, target_modules=_TARGETS[:-1])
    model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(target_modules=["fc"]))
    model.conv2.bias.requires_grad_(True)  # a choice of the user's, to be kept
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'conv3' \(dilation \(1, 1, 2\)"):
        flora.import_lora(model, tmp_path / "lora", adapter_name="lora")
    _assert_unchanged(model, before)
    # Every layer converts; attaching fails at the end (the name is taken).
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        flora.import_lora(model, tmp_path / "first")
    _assert_unchanged(model, before)
    flora.import_lora(model, tmp_path / "first", adapter_name="lora")
    assert sorted(flora.adapter_names(model)) == ["default", "lora"]


ROUND_TRIPS = [
    (case, init)
    for case in ("Linear", "Conv1d", "Conv2d-grouped", "Conv2d-depthwise", "Parameter")
    for init in ("gaussian", "hosvd")
] + [("Embedding", "gaussian"), ("Embedding", "hosvd"), ("Conv3d", "gaussian")]


@pytest.mark.parametrize(("case", "init"), ROUND_TRIPS)
def test_round_trip_flora_lora_flora_is_exact(tmp_path, case, init) -> None:
    base, model = flora_model(case, init)
    flora.export_lora(model, tmp_path / "lora")
    back = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    ((name, layer),) = flora.adapted_layers(model).items()
    imported = flora.adapted_layers(back)[name]
    with torch.no_grad():
        initial = layer.initial_delta()
        expected = layer.delta_weight() - (0 if initial is None else initial)
        delta = imported.delta_weight()
        x = CASES[case][1]()
        _assert_same_outputs(back(x), model(x))
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert imported.spec.init == "zero_core"


def test_flora_directories_and_malformed_ones_are_refused(tmp_path) -> None:
    base, _, directory = _peft_dir(tmp_path, r=2, lora_alpha=2)
    _, model = flora_model("Linear", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    with pytest.raises(ValueError, match=r"not a PEFT LoRA one; use flora\.load_adapter"):
        flora.import_lora(nn.Sequential(nn.Linear(6, 5)), tmp_path / "flora")
    _edit_config(directory, rank_pattern={"fc": 3})
    with pytest.raises(AdapterError, match="layer 'fc': r and rank_pattern give rank 3"):
        flora.import_lora(copy.deepcopy(base), directory)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        flora.import_lora(copy.deepcopy(base), directory, adapter_name="a.b")
