"""Bias updates in the LoRA ecosystem: PEFT's lora_bias both ways, compress, analyze, summary.

A flora adapter's bias update ``Δb`` is added to the layer's output; PEFT's
``lora_bias`` adds ``scaling · lora_B.bias``. Every conversion must keep
it exactly, and everything that rebuilds or reports adapters must keep or
name it.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flora
import flora.lora
from flora.cli import main as flora_main
from tuckerlib.cli import main as tuckerlib_main
from tuckerlib.io import AdapterError, open_adapter

peft = pytest.importorskip("peft")

# case -> (layer factory taking the base layer's ``bias`` flag, input shape)
LAYERS = {
    "Linear": (lambda bias: nn.Linear(6, 5, bias=bias), (3, 6)),
    "Conv1d": (lambda bias: nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=bias), (2, 4, 9)),
    "Conv2d": (lambda bias: nn.Conv2d(4, 6, (3, 2), padding=1, bias=bias), (2, 4, 6, 5)),
    "Conv3d": (lambda bias: nn.Conv3d(3, 4, 2, bias=bias), (2, 3, 4, 4, 3)),
    "Conv2d-grouped": (
        lambda bias: nn.Conv2d(6, 9, 3, groups=3, padding="same", bias=bias),
        (2, 6, 5, 5),
    ),
    "Conv2d-depthwise": (lambda bias: nn.Conv2d(4, 4, 3, groups=4, bias=bias), (2, 4, 5, 5)),
}


class _Three(nn.Module):
    """Three parallel layers of one kind: ``tuned`` and ``plain`` have a bias, ``nobias`` none."""

    def __init__(self, make) -> None:
        super().__init__()
        self.tuned = make(True)
        self.plain = make(True)
        self.nobias = make(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tuned(x) + self.plain(x) + self.nobias(x)


def _flora(case: str, init: str = "gaussian") -> tuple[nn.Module, nn.Module]:
    """(base, adapted copy): one adapter with a bias update on ``tuned`` only."""
    torch.manual_seed(0)
    base = _Three(LAYERS[case][0]).eval()
    model = copy.deepcopy(base)
    kind = case.split("-")[0]
    generator = torch.Generator().manual_seed(1)
    adapters = {}
    for name in ("tuned", "plain", "nobias"):
        weight = getattr(base, name).weight
        spec = flora.LayerSpec.from_template(
            kind, tuple(weight.shape), 3, scale=0.7, init=init, bias=name == "tuned"
        )
        delta = flora.TuckerDelta.create(spec, weight)
        with torch.no_grad():
            for p in (delta.core, *delta.factors):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
            if delta.bias is not None:
                delta.bias.copy_(torch.randn(delta.bias.shape, generator=generator))
        adapters[name] = delta
    flora.attach_adapter(model, "default", adapters)
    return base, model.eval()


def _quiet(make, *args, **kwargs):
    with warnings.catch_warnings():
        # PEFT warns about grouped convs, custom models, lora_bias without a base bias, and
        # takes a saved lora_B bias (1-D) for a tensor sharded by DeepSpeed or FSDP.
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


def _peft_model(base: nn.Module, directory: Path) -> nn.Module:
    return _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), directory).eval()


def _assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


def _export(model: nn.Module, tmp_path: Path, source: str) -> Path:
    if source == "model":
        return flora.export_lora(model, tmp_path / "lora")
    flora.save_adapter(model, tmp_path / "flora")
    return flora.export_lora(tmp_path / "flora", tmp_path / "lora")


# Export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["model", "directory"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_peft_loads_bias_updates_with_the_flora_outputs(tmp_path, case, source) -> None:
    base, model = _flora(case)
    out = _export(model, tmp_path, source)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    delta_b = model.tuned.adapters["default"].bias.detach()
    assert torch.equal(tensors["base_model.model.tuned.lora_B.bias"], delta_b)
    for name in ("plain", "nobias"):  # lora_bias is one setting: zero where there is no Δb
        assert not tensors[f"base_model.model.{name}.lora_B.bias"].any()
    x = torch.randn(LAYERS[case][1])
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, out)(x), model(x))


@pytest.mark.parametrize("case", ["Linear", "Conv2d-grouped", "Conv3d"])
def test_hosvd_adapters_export_their_bias_update(tmp_path, case) -> None:
    base, model = _flora(case, init="hosvd")
    out = _export(model, tmp_path, "directory")
    x = torch.randn(LAYERS[case][1])
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, out)(x), model(x))


def test_peft_merges_the_exported_bias_into_layers_that_have_one(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv1d(4, 5, 3), nn.ReLU(), nn.Conv1d(5, 3, 1), nn.Flatten(), nn.Linear(15, 2)
    ).eval()
    model = flora.inject(
        copy.deepcopy(base),
        flora.FLoRAConfig(ranks=2, bias=True, init="gaussian", target_modules=["0", "2", "4"]),
    )
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            layer.core.normal_()
            layer.adapters["default"].bias.normal_()
    merged = _peft_model(base, flora.export_lora(model, tmp_path / "lora")).merge_and_unload()
    assert [type(m) for m in merged] == [type(m) for m in base]
    x = torch.randn(2, 4, 7)
    expected = flora.merged_state_dict(model)
    with torch.no_grad():
        _assert_same_outputs(merged(x), model(x))
        for key in ("0.bias", "2.bias", "4.bias"):
            torch.testing.assert_close(merged.state_dict()[key], expected[key])


class _Weighted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@pytest.mark.parametrize(
    ("base", "config", "refused", "biased", "what"),
    [
        (
            lambda: nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 5)),
            {"target_modules": ["0", "1"]},
            "0",
            "1",
            "Embedding layers",
        ),
        (
            lambda: nn.Sequential(nn.Linear(6, 5), _Weighted()),
            {"target_modules": ["0"], "target_parameters": ["1.weight"]},
            "1.weight",
            "0",
            "target_parameters",
        ),
    ],
    ids=["embedding", "parameter"],
)
def test_layers_peft_refuses_lora_bias_for_are_refused_by_name(
    tmp_path, base, config, refused, biased, what
) -> None:
    model = flora.inject(base(), flora.FLoRAConfig(ranks=2, bias=True, **config))
    sources = {"model": model, "directory": flora.save_adapter(model, tmp_path / "flora")}
    for source in sources.values():
        with pytest.raises(flora.LoraConversionError, match="no exact LoRA form") as info:
            flora.export_lora(source, tmp_path / "lora")
        message = str(info.value)
        expected = f"layer '{refused}' (the bias updates of ['{biased}'] need PEFT's lora_bias=True"
        assert expected in message
        assert f"which PEFT refuses for {what})" in message
        assert not (tmp_path / "lora").exists()


# Import -------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, (3, 2), stride=(1, 2), padding=(1, 0))
        self.conv3 = nn.Conv3d(4, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.fc(x).transpose(1, 2))  # (B, 5, L)
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (B, 4, L, 2)
        return self.conv3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1))


_TARGETS = ["fc", "conv1", "conv2", "conv3"]


def _peft_trained(base: nn.Module, directory: Path, **options: object) -> nn.Module:
    """A PEFT lora_bias model of ``base`` with random A, B and lora_B bias, saved."""
    config = peft.LoraConfig(init_lora_weights=False, lora_bias=True, **options)
    model = _quiet(peft.get_peft_model, copy.deepcopy(base), config)
    _quiet(model.save_pretrained, directory)
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [
        {"r": 3, "lora_alpha": 6},
        {"r": 3, "lora_alpha": 5, "use_rslora": True, "rank_pattern": {"conv2": 2}},
        {"r": 2, "lora_alpha": 2, "alpha_pattern": {"^fc": 8}},
    ],
    ids=["plain", "rslora-patterns", "alpha-pattern"],
)
def test_peft_trained_lora_bias_imports_with_peft_outputs(tmp_path, options) -> None:
    torch.manual_seed(0)
    base = _Net().eval()
    peft_model = _peft_trained(base, tmp_path / "lora", target_modules=_TARGETS, **options)
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    layers = flora.adapted_layers(model)
    assert sorted(layers) == sorted(_TARGETS)
    for name, layer in layers.items():
        lora = peft_model.base_model.model.get_submodule(name)
        expected = lora.scaling["default"] * lora.lora_B["default"].bias.detach()
        assert expected.abs().max() > 0.01
        torch.testing.assert_close(layer.adapters["default"].bias, expected, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        _assert_same_outputs(model(x), peft_model(x))
        peft_model.merge_adapter()  # PEFT's own merge adds scaling · lora_B.bias too
        flora.merge(model)
        _assert_same_outputs(model(x), peft_model(x))


def test_trainable_import_trains_the_bias_update(tmp_path) -> None:
    torch.manual_seed(0)
    base = _Net()
    _peft_trained(base, tmp_path / "lora", r=2, target_modules=["fc"])
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "lora", trainable=True)
    model(torch.randn(2, 5, 8)).sum().backward()
    assert model.fc.adapters["default"].bias.grad is not None
    assert flora.trainable_parameters(model) == model.fc.adapters["default"].spec.n_params


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_round_trip_flora_lora_flora_keeps_bias_updates_exactly(tmp_path, case) -> None:
    base, model = _flora(case)
    flora.export_lora(model, tmp_path / "lora")
    back = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    original, imported = flora.adapted_layers(model), flora.adapted_layers(back)
    tuned = imported["tuned"].adapters["default"].bias
    torch.testing.assert_close(tuned, original["tuned"].adapters["default"].bias, rtol=0, atol=0)
    # lora_bias is one setting: a layer with a bias gets a zero Δb, one without gets none.
    assert torch.equal(imported["plain"].adapters["default"].bias, torch.zeros(tuned.shape[0]))
    assert imported["nobias"].adapters["default"].bias is None
    x = torch.randn(LAYERS[case][1])
    with torch.no_grad():
        _assert_same_outputs(back(x), model(x))
        for name, layer in original.items():
            expected = layer.delta_weight()
            scale = float(expected.abs().max())
            torch.testing.assert_close(
                imported[name].delta_weight(), expected, rtol=1e-5, atol=1e-6 * scale
            )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_trained_lora_bias_on_a_layer_without_bias_is_refused_by_name(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    peft_model = _peft_trained(base, tmp_path / "lora", r=2, target_modules=["0", "1"])
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(flora.LoraConversionError, match="no exact FLoRA form") as info:
        flora.import_lora(model, tmp_path / "lora")
    assert "layer '1' (lora_bias: PEFT adds its trained lora_B bias to the output of this" in str(
        info.value
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not isinstance(model[0], flora.FLoRALayer)
    # A zero lora_B bias adds nothing there: the layer imports without a bias update.
    with torch.no_grad():
        peft_model.base_model.model[1].lora_B["default"].bias.zero_()
    _quiet(peft_model.save_pretrained, tmp_path / "zero")
    flora.import_lora(model, tmp_path / "zero")
    assert model[1].adapters["default"].bias is None
    assert model[0].adapters["default"].bias is not None
    x = torch.randn(3, 4)
    with torch.no_grad():
        _assert_same_outputs(model(x), peft_model(x))


def test_a_trained_lora_bias_on_a_conv1d_becomes_its_bias_update(tmp_path) -> None:
    conv1d_type = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(conv1d_type(5, 7))
    peft_model = _peft_trained(
        base, tmp_path / "lora", r=2, target_modules=["0"], fan_in_fan_out=True
    )
    model = flora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    assert model[0].kind == "Conv1D"
    assert model[0].adapters["default"].bias is not None
    x = torch.randn(3, 7)
    with torch.no_grad():
        _assert_same_outputs(model(x), peft_model(x))


# Reading adapter directories ------------------------------------------------------------------


def test_open_adapter_reads_bias_updates_of_both_formats(tmp_path) -> None:
    _, model = _flora("Conv2d")
    flora.save_adapter(model, tmp_path / "flora")
    with open_adapter(tmp_path / "flora") as adapter:
        tuned, plain = adapter["tuned"], adapter["plain"]
    np.testing.assert_array_equal(
        tuned.bias, model.tuned.adapters["default"].bias.numpy(force=True)
    )
    assert plain.bias is None
    assert tuned.stored_params == model.tuned.adapters["default"].spec.n_params - 6  # Δb apart
    torch.manual_seed(0)
    peft_model = _peft_trained(_Net(), tmp_path / "lora", r=2, lora_alpha=3, target_modules=["fc"])
    with open_adapter(tmp_path / "lora") as adapter:
        fc = adapter["fc"]
    expected = 1.5 * peft_model.base_model.model.fc.lora_B["default"].bias.detach().numpy()
    np.testing.assert_allclose(fc.bias, expected, rtol=1e-6)
    assert fc.stored_params == 2 * 8 + 6 * 2


def _edit_config(directory: Path, edit) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "adapter_model.safetensors")


_FLORA_BAD = [
    (lambda d: d["layers"]["tuned"].update(bias="yes"), None, "layer 'tuned': bias must be True"),
    (
        lambda d: d["layers"]["plain"].update(bias=True),
        None,
        r"missing \['plain\.bias'\]",
    ),
    (None, lambda t: t.pop("tuned.bias"), r"missing \['tuned\.bias'\]"),
    (
        lambda d: d["layers"]["tuned"].update(kind="Embedding", shape=[5, 6]),
        None,
        "bias updates exist for .* layers only, not for a Embedding",
    ),
]


@pytest.mark.parametrize(("config", "tensors", "message"), _FLORA_BAD)
def test_malformed_flora_bias_updates_are_named(tmp_path, config, tensors, message) -> None:
    _, model = _flora("Linear")
    directory = flora.save_adapter(model, tmp_path / "flora")
    if config is not None:
        _edit_config(directory, config)
    if tensors is not None:
        _edit_tensors(directory, tensors)
    with pytest.raises(AdapterError, match=message):
        open_adapter(directory)


_LORA_B_BIAS = "base_model.model.fc.lora_B.bias"


def test_malformed_peft_lora_bias_is_named(tmp_path) -> None:
    torch.manual_seed(0)
    directory = tmp_path / "lora"
    _peft_trained(_Net(), directory, r=2, target_modules=["fc", "conv1"])
    _edit_config(directory, lambda d: d.update(lora_bias="yes"))
    with pytest.raises(AdapterError, match="lora_bias must be true or false, got 'yes'"):
        open_adapter(directory)
    _edit_config(directory, lambda d: d.update(lora_bias=True))
    _edit_tensors(directory, lambda t: t.update({_LORA_B_BIAS: torch.ones(2)}))
    with pytest.raises(AdapterError, match=r"layer 'fc': lora_B.bias must be floating with shape"):
        open_adapter(directory)
    _edit_tensors(directory, lambda t: t.pop(_LORA_B_BIAS))
    with pytest.raises(AdapterError, match="layer 'fc': lora_bias=True, but the adapter holds no"):
        open_adapter(directory)
    # Without lora_bias PEFT does not load a lora_B bias: named, and refused by import_lora.
    _edit_config(directory, lambda d: d.update(lora_bias=False))
    with open_adapter(directory) as adapter:
        assert adapter["conv1"].bias is None
        assert ("conv1.lora_B.bias", "a lora_B bias without lora_bias=True in the config, which "
                "PEFT does not load") in adapter.skipped  # fmt: skip
    with pytest.raises(flora.LoraConversionError, match=r"'conv1\.lora_B\.bias' \(a lora_B bias"):
        flora.import_lora(_Net(), directory)


def test_embeddings_of_a_lora_bias_adapter_are_skipped_by_name(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 5))
    directory = tmp_path / "lora"
    peft_model = _quiet(
        peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(target_modules=["0", "1"])
    )
    peft_model.save_pretrained(directory)  # PEFT refuses lora_bias with an Embedding: write it
    _edit_config(directory, lambda d: d.update(lora_bias=True))
    _edit_tensors(directory, lambda t: t.update({"base_model.model.1.lora_B.bias": torch.ones(5)}))
    with open_adapter(directory) as adapter:
        assert list(adapter) == ["1"]
        assert adapter.skipped == [
            (
                "0",
                "lora_bias=True, which PEFT refuses for an Embedding: PEFT does not load this "
                "adapter",
            )
        ]
    with pytest.raises(flora.LoraConversionError, match=r"layer '0' \(lora_bias=True, which PEFT"):
        flora.import_lora(copy.deepcopy(base), directory)


# Compress, combine, summary, analyze ---------------------------------------------------------


@pytest.mark.parametrize("case", ["Linear", "Conv2d", "Conv2d-grouped"])
@pytest.mark.parametrize("init", ["gaussian", "hosvd"])
def test_compress_keeps_bias_updates_bit_for_bit(case, init) -> None:
    base, model = _flora(case, init)
    layers = flora.adapted_layers(model)
    biases = {n: layer.adapters["default"].bias for n, layer in layers.items()}
    before = {n: layer.effective_weight() for n, layer in layers.items()}
    x = torch.randn(LAYERS[case][1])
    with torch.no_grad():
        outputs = model(x)
    held = copy.deepcopy(model)
    # At its ranks a gaussian adapter compresses exactly; a hosvd one's ΔW − ΔW_init needs more.
    errors = flora.compress(held, ranks=100)
    assert init == "hosvd" or max(errors.values()) < 1e-6
    errors = flora.compress(model, ranks=1)
    for name, layer in flora.adapted_layers(model).items():
        for compressed in (layer, flora.adapted_layers(held)[name]):
            adapter = compressed.adapters["default"]
            assert adapter.spec.bias == (biases[name] is not None)
            if biases[name] is not None:
                assert torch.equal(adapter.bias, biases[name])
        change = before[name] - getattr(base, name).weight.detach()
        after = layer.effective_weight() - getattr(base, name).weight.detach()
        measured = float((change - after).norm() / change.norm())
        assert errors[name] == pytest.approx(measured, rel=1e-4)  # the error of ΔW alone
    if init == "gaussian":
        with torch.no_grad():
            _assert_same_outputs(held(x), outputs)


def test_add_weighted_adapter_combines_bias_updates_of_some_adapters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    for name, bias in (("a", True), ("b", False)):
        config = flora.FLoRAConfig(ranks=2, init="gaussian", bias=bias, target_modules=["0"])
        flora.inject(model, config, adapter_name=name)
        with torch.no_grad():
            model[0].adapters[name].core.normal_()
    with torch.no_grad():
        model[0].adapters["a"].bias.normal_()
    flora.add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix")
    layer = model[0]
    assert torch.equal(layer.adapters["mix"].bias, 0.5 * layer.adapters["a"].bias)
    x = torch.randn(3, 6)
    with torch.no_grad():
        weight = (
            layer.base_layer.weight + 0.5 * layer.delta_weight("a") + 2 * layer.delta_weight("b")
        )
        bias = layer.base_layer.bias + 0.5 * layer.adapters["a"].bias
        flora.set_adapter(model, "mix")
        _assert_same_outputs(model(x), torch.nn.functional.linear(x, weight, bias))


def test_summary_marks_bias_updates_and_counts_them() -> None:
    _, model = _flora("Linear")
    lines = flora.summary(model).splitlines()
    assert lines[0].split() == ["layer", "kind", "shape", "default*", "params"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    tucker = 3 * 3 + 5 * 3 + 6 * 3
    assert "(3, 3)+b" in rows["tuned"]
    assert rows["tuned"].endswith(f" {tucker + 5}")
    assert "+b" not in rows["plain"]
    assert rows["plain"].endswith(f" {tucker}")


def test_analyze_adapter_names_bias_updates_and_leaves_them_out(tmp_path, capsys) -> None:
    _, model = _flora("Conv2d")
    flora.save_adapter(model, tmp_path / "flora")
    torch.manual_seed(0)
    _peft_trained(_Net(), tmp_path / "lora", r=2, target_modules=["fc"])
    for directory, biased in ((tmp_path / "flora", "tuned"), (tmp_path / "lora", "fc")):
        out = tmp_path / f"{directory.name}.json"
        assert tuckerlib_main(["analyze", "--adapter", str(directory), "--format", "json",
                               "--out", str(out), "--quiet"]) == 0  # fmt: skip
        tensors = {t["name"]: t for t in json.loads(out.read_text())["tensors"]}
        assert {n for n, t in tensors.items() if t["bias_update"]} == {biased}
        if biased == "tuned":
            spec = model.tuned.adapters["default"].spec
            assert tensors["tuned"]["adapter_params"] == spec.n_params - spec.shape[0]  # no Δb
        assert tuckerlib_main(["analyze", "--adapter", str(directory), "--quiet"]) == 0
        text = capsys.readouterr().out
        assert "+b: the layer also carries a bias update" in text
        assert "not part of dW: not analysed" in text
        assert f"\n{biased} " in text
        assert "+b  " in text


def test_analyze_adapter_says_when_only_a_bias_update_changed(tmp_path) -> None:
    model = flora.inject(
        nn.Sequential(nn.Linear(6, 5)), flora.FLoRAConfig(bias=True, target_modules=["0"])
    )
    with torch.no_grad():
        model[0].adapters["default"].bias.fill_(1.0)  # trained Δb, untouched zero core
    flora.save_adapter(model, tmp_path / "flora")
    out = tmp_path / "report.json"
    assert tuckerlib_main(["analyze", "--adapter", str(tmp_path / "flora"), "--format", "json",
                           "--out", str(out), "--quiet"]) == 0  # fmt: skip
    skipped = json.loads(out.read_text())["skipped"]
    assert skipped == [
        {"name": "0", "reason": "unchanged (dW = 0); its bias update is not analysed"}
    ]


# Command line and errors ----------------------------------------------------------------------


def test_cli_export_names_the_bias_updates(tmp_path, capsys) -> None:
    base, model = _flora("Conv1d")
    flora.save_adapter(model, tmp_path / "flora")
    assert flora_main(["export-lora", str(tmp_path / "flora"), str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "tuned   Conv1d  6x4x3  3,3,3+b" in out
    assert "+b: the bias updates of tuned are lora_B.bias of PEFT's lora_bias" in out
    x = torch.randn(LAYERS["Conv1d"][1])
    with torch.no_grad():
        _assert_same_outputs(_peft_model(base, tmp_path / "lora")(x), model(x))


def test_cli_export_refusals_are_one_line_and_bugs_keep_their_traceback(
    tmp_path, capsys, monkeypatch
) -> None:
    _, model = _flora("Linear")
    flora.save_adapter(model, tmp_path / "flora")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert flora_main(["export-lora", str(tmp_path / "flora"), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora export-lora: error:")
    assert "holds other files" in err
    assert err.count("\n") == 1

    def broken(*args, **kwargs):
        raise ValueError("a bug, not an input error")

    monkeypatch.setattr(flora.lora, "peft_config", broken)
    with pytest.raises(ValueError, match="a bug, not an input error"):
        flora_main(["export-lora", str(tmp_path / "flora"), str(tmp_path / "lora")])
    assert not (tmp_path / "lora").exists()


def test_conversion_refusals_are_typed(tmp_path) -> None:
    _, model = _flora("Linear")
    flora.save_adapter(model, tmp_path / "flora")
    lora = flora.export_lora(model, tmp_path / "lora")
    with pytest.raises(flora.LoraConversionError, match="not a PEFT LoRA one"):
        flora.import_lora(nn.Linear(2, 2), tmp_path / "flora")
    with pytest.raises(flora.LoraConversionError, match="PEFT LoRA adapter, not a flora one"):
        flora.export_lora(lora, tmp_path / "again")
    with pytest.raises(flora.LoraConversionError, match="holds adapter 'default', not 'x'"):
        flora.export_lora(tmp_path / "flora", tmp_path / "again", adapter_name="x")
    with pytest.raises(flora.LoraConversionError, match="is the source"):
        flora.export_lora(tmp_path / "flora", tmp_path / "flora")
    with pytest.raises(flora.LoraConversionError, match="base_model is for directory sources"):
        flora.export_lora(model, tmp_path / "again", base_model=model)
    # An argument the model cannot use stays a plain ValueError, as in save_adapter.
    with pytest.raises(ValueError, match="no adapter 'x'") as info:
        flora.export_lora(model, tmp_path / "again", adapter_name="x")
    assert type(info.value) is ValueError


def test_extract_summary_counts_the_carried_tensors(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    base = {"fc.weight": torch.randn(8, 5), "fc.bias": torch.randn(8)}
    tuned = {"fc.weight": 2 * base["fc.weight"], "fc.bias": base["fc.bias"] + 1}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    args = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
            "--ranks", "1", "--quiet", "--out"]  # fmt: skip
    assert flora_main([*args, str(tmp_path / "a"), "--carry-1d"]) == 0
    out = capsys.readouterr().out
    assert (
        "1 layers, 14 core and factor parameters for 40 weights (35.0%), plus 8 values of " in out
    )
    assert flora_main([*args, str(tmp_path / "b")]) == 0
    assert "1 layers, 14 core and factor parameters for 40 weights (35.0%).\n" in (
        capsys.readouterr().out
    )
