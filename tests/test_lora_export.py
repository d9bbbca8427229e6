"""export_lora: PEFT loads the export with the FLoRA model's outputs; refusals name layers."""

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
import flora.lora
from flora.cli import main

peft = pytest.importorskip("peft")


def _peft_model(base: nn.Module, directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        # PEFT warns about grouped convs (no merging) and custom models.
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


def _strip_geometry(directory: Path) -> None:
    """Make ``directory`` look like one written before layers recorded their geometry."""
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    for record in document["layers"].values():
        record.pop("geometry", None)
    path.write_text(json.dumps(document))


SOURCES = ["model", "directory", "legacy directory"]


def _export(
    tmp_path: Path, case: str, init: str = "gaussian", source: str = "directory"
) -> tuple[nn.Module, ...]:
    base, model = flora_model(case, init)
    if source == "model":
        flora.export_lora(model, tmp_path / "lora")
    else:
        flora.save_adapter(model, tmp_path / "flora")
        if source == "legacy directory":
            _strip_geometry(tmp_path / "flora")
        options = {"base_model": base} if source == "legacy directory" else {}
        flora.export_lora(tmp_path / "flora", tmp_path / "lora", **options)
    return base, model, _peft_model(base, tmp_path / "lora")


def _assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_the_export_with_the_flora_outputs(tmp_path, case, source) -> None:
    base, model, peft_model = _export(tmp_path, case, source=source)
    x = CASES[case][1]()
    with torch.no_grad():
        _assert_same_outputs(peft_model(x), model(x))
        assert (peft_model(x) - base(x)).abs().max() > 0.1


@pytest.mark.parametrize("source", ["model", "directory"])
@pytest.mark.parametrize("case", ["Linear", "Conv2d", "Conv2d-grouped", "Conv3d"])
def test_hosvd_adapters_export_their_change_to_the_pretrained_weight(
    tmp_path, case, source
) -> None:
    _, model, peft_model = _export(tmp_path, case, init="hosvd", source=source)
    x = CASES[case][1]()
    with torch.no_grad():
        _assert_same_outputs(peft_model(x), model(x))


@pytest.mark.parametrize("source", ["model", "directory"])
def test_hosvd_embedding_with_padding_row(tmp_path, source) -> None:
    _, model, peft_model = _export(tmp_path, "Embedding", init="hosvd", source=source)
    x = CASES["Embedding"][1]()
    with torch.no_grad():
        _assert_same_outputs(peft_model(x), model(x))


def test_config_and_keys_follow_peft(tmp_path) -> None:
    base, model = flora_model("Conv2d-grouped", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    out = flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 9  # groups * min(R_0, out/groups) = 3 * 3
    assert config["target_modules"] == ["0"]
    loaded = peft.LoraConfig.from_pretrained(out)
    assert loaded.r == 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), loaded)
    expected = {
        k.replace(".default", ""): tuple(v.shape)
        for k, v in peft_model.state_dict().items()
        if "lora_" in k
    }
    from safetensors.torch import load_file

    assert {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()} == (
        expected
    )


def test_rank_patterns_hold_per_layer_ranks(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4), nn.Sequential(nn.Linear(4, 4)))
    model = copy.deepcopy(base)
    config = flora.FLoRAConfig(
        ranks=3, init="gaussian", rank_pattern={"1": (2, 2)}, target_modules="all-linear"
    )
    flora.inject(model, config)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            layer.core.normal_()
    flora.save_adapter(model, tmp_path / "flora")
    out = flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3
    # Anchored: "^1" must not also catch "2.0.1"-like suffixes.
    assert config["rank_pattern"] == config["alpha_pattern"] == {"^1": 2}
    x = torch.randn(2, 8)
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, out)(x), model(x))


def test_a_meta_device_base_model_is_enough(tmp_path) -> None:
    base, model = flora_model("Conv2d-grouped", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    _strip_geometry(tmp_path / "flora")
    with torch.device("meta"):
        skeleton = nn.Sequential(CASES["Conv2d-grouped"][0]())
    flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=skeleton)
    x = CASES["Conv2d-grouped"][1]()
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, tmp_path / "lora")(x), model(x))


def _refusal(tmp_path: Path, layer: nn.Module, source: str) -> str:
    base = nn.Sequential(layer)
    model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(ranks=2, target_modules=["0"]))
    flora.save_adapter(model, tmp_path / "flora")
    if source == "legacy directory":
        _strip_geometry(tmp_path / "flora")
    sources = {"model": model, "directory": tmp_path / "flora"}
    options = {"base_model": base} if source == "legacy directory" else {}
    with pytest.raises(ValueError, match="no exact LoRA form") as info:
        flora.export_lora(sources.get(source, tmp_path / "flora"), tmp_path / "lora", **options)
    assert not (tmp_path / "lora").exists()
    return str(info.value)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.Conv2d(3, 4, 3, dilation=2), "dilation"),
        (nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
        (nn.Embedding(5, 4, max_norm=1.0), "max_norm"),
    ],
)
def test_layers_peft_cannot_reproduce_are_refused_by_name(tmp_path, layer, reason, source) -> None:
    message = _refusal(tmp_path, layer, source)
    assert "layer '0'" in message
    assert reason in message


def test_a_dilated_pointwise_conv_is_exact(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 1, dilation=2))
    model = flora.inject(
        copy.deepcopy(base), flora.FLoRAConfig(ranks=2, init="gaussian", target_modules=["0"])
    )
    with torch.no_grad():
        model[0].core.normal_()
    flora.save_adapter(model, tmp_path / "flora")
    flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=base)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, tmp_path / "lora")(x), model(x))


def test_parameters_peft_cannot_hold_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    experts = nn.Module()
    experts.stack = nn.Parameter(torch.randn(3, 4, 5))
    experts.a = nn.Parameter(torch.randn(4, 5))
    experts.b = nn.Parameter(torch.randn(4, 5))
    model = flora.inject(
        nn.Sequential(experts), flora.FLoRAConfig(ranks=2, target_parameters=["stack", "a", "b"])
    )
    flora.save_adapter(model, tmp_path / "flora")
    with pytest.raises(ValueError, match="no exact LoRA form") as info:
        flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    message = str(info.value)
    assert "'0.stack' (a 3-D parameter" in message
    assert "layers '0.stack', '0.a', '0.b' (several parameters of one module" in message


def test_directories_without_geometry_need_the_base_model(tmp_path) -> None:
    _, model = flora_model("Conv1d", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    _strip_geometry(tmp_path / "flora")
    with pytest.raises(ValueError, match=r"layer '0' \(the adapter directory does not record"):
        flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    wrong = nn.Sequential(nn.Conv1d(4, 6, 5))
    with pytest.raises(ValueError, match=r"adapter is for shape \[6, 4, 3\]"):
        flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=wrong)
    with pytest.raises(ValueError, match="is a Linear, not a Conv1d"):
        flora.export_lora(
            tmp_path / "flora", tmp_path / "lora", base_model=nn.Sequential(nn.Linear(2, 2))
        )


def test_a_base_model_must_agree_with_the_recorded_geometry(tmp_path) -> None:
    _, model = flora_model("Conv2d-grouped", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    other = nn.Sequential(nn.Conv2d(6, 9, 3, groups=3, padding=2))
    with pytest.raises(ValueError, match=r"layer '0' \(the directory records .*'padding': 'same'"):
        flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=other)
    path = tmp_path / "flora" / "adapter_config.json"
    document = json.loads(path.read_text())
    document["layers"]["0"]["geometry"]["groups"] = 2
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"groups must be a positive int dividing the 9"):
        flora.export_lora(tmp_path / "flora", tmp_path / "lora")


def test_bad_sources_and_targets(tmp_path) -> None:
    _, model = flora_model("Linear", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    with pytest.raises(TypeError, match="an adapted model or a flora adapter directory"):
        flora.export_lora(42, tmp_path / "lora")
    with pytest.raises(ValueError, match="base_model is for directory sources"):
        flora.export_lora(model, tmp_path / "lora", base_model=model)
    with pytest.raises(ValueError, match=r"no adapter 'other'; the model has \['default'\]"):
        flora.export_lora(model, tmp_path / "lora", adapter_name="other")
    with pytest.raises(ValueError, match="holds adapter 'default', not 'other'"):
        flora.export_lora(tmp_path / "flora", tmp_path / "lora", adapter_name="other")
    with pytest.raises(ValueError, match="is the source"):
        flora.export_lora(tmp_path / "flora", tmp_path / "flora")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files \['notes.txt'\]"):
        flora.export_lora(tmp_path / "flora", tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    out = flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    with pytest.raises(ValueError, match="PEFT LoRA adapter, not a flora one"):
        flora.export_lora(out, tmp_path / "again")


class _Heads(nn.Module):
    """A body and two heads; the second head's name is given."""

    def __init__(self, second: str) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))
        self.second = second
        setattr(self, second, nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(h) + getattr(self, self.second)(h)


def _with_saved_head(second: str = "aux") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = _Heads(second).eval()
    config = flora.FLoRAConfig(
        ranks=3, init="gaussian", target_modules=["body"], modules_to_save=["head"]
    )
    model = flora.inject(copy.deepcopy(base), config)
    with torch.no_grad():
        model.body.core.normal_()
        copy_ = model.head.copies["default"]
        for p in copy_.parameters():
            p.add_(torch.randn_like(p))
        copy_[1].running_mean.fill_(0.5)
    return base, model.eval()


@pytest.mark.parametrize("source", ["model", "directory", "directory alone"])
def test_saved_modules_export_as_peft_modules_to_save(tmp_path, source) -> None:
    base, model = _with_saved_head()
    if source == "model":
        flora.export_lora(model, tmp_path / "lora")
    else:
        flora.save_adapter(model, tmp_path / "flora")
        given = base if source == "directory" else None
        flora.export_lora(tmp_path / "flora", tmp_path / "lora", base_model=given)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    peft_model = _peft_model(base, tmp_path / "lora")
    x = torch.randn(4, 6)
    with torch.no_grad():
        _assert_same_outputs(peft_model(x), model(x))
        with flora.disable_adapter(model):
            plain = model(x)
        assert (model(x) - plain).abs().max() > 0.1


def test_saved_modules_peft_would_not_load_alone_are_refused(tmp_path) -> None:
    # "head" is a plain-string suffix of "lm_head": PEFT would wrap both.
    _, model = _with_saved_head("lm_head")
    message = r"'head' \(modules_to_save: PEFT wraps every module"
    with pytest.raises(ValueError, match=message) as info:
        flora.export_lora(model, tmp_path / "lora")
    assert "['lm_head']" in str(info.value)
    assert not (tmp_path / "lora").exists()


def test_a_name_clash_unseen_without_the_base_fails_loudly_in_peft(tmp_path) -> None:
    # Without the base's names the "head"/"lm_head" clash is not seen at
    # export; PEFT then wraps lm_head too and refuses to load, by key name.
    base, model = _with_saved_head("lm_head")
    flora.save_adapter(model, tmp_path / "flora")
    flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    with pytest.raises(KeyError, match="lm_head"):
        _peft_model(base, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"PEFT wraps every module whose name ends with 'head'"):
        flora.export_lora(tmp_path / "flora", tmp_path / "again", base_model=base)


def test_a_saved_module_holding_an_adapted_layer_is_refused_from_a_directory(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2)))
    config = flora.FLoRAConfig(ranks=2, target_modules=["1.0"])
    flora.inject(model, config)
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]), adapter_name="b")
    record = flora.read_adapter(flora.save_adapter(model, tmp_path / "a"))
    tensors = dict(record.tensors)
    tensors.update({f"modules_to_save.1.0.{k}": torch.ones(2, 4) for k in ["weight"]})
    tensors["modules_to_save.1.0.bias"] = torch.ones(2)
    flora.write_adapter(
        tmp_path / "flora", record.config, record.layers, tensors, modules_to_save=["1"]
    )
    with pytest.raises(ValueError, match=r"'1' \(modules_to_save: the adapter's LoRA targets"):
        flora.export_lora(tmp_path / "flora", tmp_path / "lora")


def test_a_failed_write_keeps_the_previous_export(tmp_path, monkeypatch) -> None:
    _, model = flora_model("Linear", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    out = flora.export_lora(tmp_path / "flora", tmp_path / "lora")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model[0].core.add_(1.0)
    flora.save_adapter(model, tmp_path / "flora2")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(flora.lora, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        flora.export_lora(tmp_path / "flora2", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flora", "flora2", "lora"]
    monkeypatch.undo()
    flora.export_lora(tmp_path / "flora2", out)  # a re-export replaces the old one
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def test_cli_exports_linear_adapters(tmp_path, capsys) -> None:
    base, model = flora_model("Linear", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    assert main(["export-lora", str(tmp_path / "flora"), str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "0      Linear  5x6    3,3          3       33" in out
    assert "1 layers, 33 LoRA parameters for" in out
    x = torch.randn(2, 6)
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, tmp_path / "lora")(x), model(x))


def test_cli_exports_conv_adapters_that_record_their_geometry(tmp_path, capsys) -> None:
    base, model = flora_model("Conv2d-grouped", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    assert main(["export-lora", str(tmp_path / "flora"), str(tmp_path / "lora")]) == 0
    assert "0      Conv2d  9x2x3x3" in capsys.readouterr().out
    x = CASES["Conv2d-grouped"][1]()
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, tmp_path / "lora")(x), model(x))


def test_cli_refusals_exit_2_with_one_line(tmp_path, capsys) -> None:
    _, model = flora_model("Conv2d", "gaussian")
    flora.save_adapter(model, tmp_path / "flora")
    _strip_geometry(tmp_path / "flora")
    assert main(["export-lora", str(tmp_path / "flora"), str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("flora export-lora: error:")
    assert "layer '0'" in err
    assert main(["export-lora", str(tmp_path / "missing"), str(tmp_path / "lora")]) == 2
    assert "missing: not a directory" in capsys.readouterr().err
