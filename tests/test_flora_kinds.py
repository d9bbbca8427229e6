"""The layer-kind registry: one record per kind, user kinds end to end, the docs table."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import flora
from flora.kinds import kind_of_module, layer_kind, registered_kinds
from tuckerlib.io import open_adapter
from tuckerlib.io.layer_kinds import KINDS, kind_rule

DOCS = Path(__file__).resolve().parents[1] / "docs" / "layer_kinds.rst"


class Gated(nn.Module):
    """A user's layer: ``x ↦ sigmoid(g) ⊙ (x Wᵀ)``, weight ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.gate = nn.Parameter(torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate) * F.linear(x, self.weight)


class FLoRAGated(flora.Linear):
    """Its FLoRA layer: the branch goes through the same gate."""

    kind = "Gated"
    base_type = Gated

    def _gate(self, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.base_layer.gate).to(y.dtype) * y

    def factorized_branch(self, x, adapter):
        return self._gate(super().factorized_branch(x, adapter))

    def dense_branch(self, x, delta):
        return self._gate(F.linear(x, delta))

    def fused_forward(self, x, delta):
        return self._gate(F.linear(x, self.base_weight() + delta))


@pytest.fixture
def gated():
    kind = flora.register_layer_kind(FLoRAGated, default_ranks=(3, 3))
    yield kind
    flora.unregister_layer_kind("Gated")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Gated(6, 5), nn.ReLU(), Gated(5, 4)).eval()


def test_builtin_records_cover_every_kind_once() -> None:
    names = [kind.name for kind in registered_kinds()]
    assert names == [
        "Linear",
        "QuantizedLinear",  # another storage of the Linear kind (bitsandbytes bases)
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "Embedding",
        "Conv1D",
        "MultiheadAttention",
    ]
    assert set(names) - {"QuantizedLinear"} | {"Parameter"} == set(KINDS)
    assert tuple(KINDS) == flora.spec.KINDS
    assert "Conv1D" in flora.spec.BIAS_KINDS
    assert dict(flora.DEFAULT_RANKS)["Conv1D"] == (8, 8)


def test_module_types_match_subclasses_most_specific_first() -> None:
    class MyLinear(nn.Linear):
        pass

    assert kind_of_module(MyLinear(2, 2)).name == "Linear"
    assert kind_of_module(nn.Conv2d(1, 1, 1)).name == "Conv2d"
    assert kind_of_module(nn.ReLU()) is None
    # MultiheadAttention's out_proj: its forward is never called, so no kind takes it.
    assert kind_of_module(nn.MultiheadAttention(4, 2).out_proj) is None
    flora.register_layer_kind(
        type("FLoRAMine", (flora.Linear,), {"kind": "Mine"}), module_types=[MyLinear]
    )
    try:
        assert kind_of_module(MyLinear(2, 2)).name == "Mine"
        assert kind_of_module(nn.Linear(2, 2)).name == "Linear"
    finally:
        flora.unregister_layer_kind("Mine")


def test_torch_free_rules_give_the_update_shape() -> None:
    assert kind_rule("Conv1D").delta_shape((32, 96)) == (96, 32)
    assert kind_rule("Linear").delta_shape((96, 32)) == (96, 32)
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'Nope'"):
        kind_rule("Nope")
    code = (
        "import sys, tuckerlib.io.layer_kinds as k; print(k.KINDS); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[1] == "False"


def test_a_user_kind_is_adapted_end_to_end(gated, tmp_path) -> None:
    base = _model()
    x = torch.randn(3, 6)
    model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(target_modules=["0", "2"]))
    assert isinstance(model[0], FLoRAGated)
    assert model[0].ranks == (3, 3)
    assert torch.equal(model(x), base(x))  # the core starts at zero
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            layer.core.normal_()
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in flora.adapted_layers(model).items():
            expected.get_submodule(name).weight += layer.delta_weight()
    for mode in ("dense", "factorized"):
        for layer in flora.adapted_layers(model).values():
            layer.forward_mode = mode
        torch.testing.assert_close(model(x), expected(x))
    flora.merge(model)
    torch.testing.assert_close(model(x), expected(x))
    flora.unmerge(model)
    flora.save_adapter(model, tmp_path / "gated")
    with open_adapter(tmp_path / "gated") as adapter:
        assert adapter["0"].kind == "Gated"
    loaded = flora.load_adapter(copy.deepcopy(base), tmp_path / "gated")
    torch.testing.assert_close(loaded(x), expected(x))
    plain = flora.unload(loaded, merge=False)
    assert type(plain[0]) is Gated
    assert torch.equal(plain[0].weight, base[0].weight)


def test_a_user_kind_has_no_lora_form(gated, tmp_path) -> None:
    model = flora.inject(_model(), flora.FLoRAConfig(target_modules=["0"]))
    with pytest.raises(flora.LoraConversionError, match=r"layer '0' \(a Gated layer: PEFT"):
        flora.export_lora(model, tmp_path / "lora")


def test_duplicates_are_refused_naming_the_kind(gated) -> None:
    with pytest.raises(ValueError, match="layer kind 'Gated' is registered already"):
        flora.register_layer_kind(FLoRAGated)
    other = type("FLoRAOther", (FLoRAGated,), {"kind": "Other"})
    with pytest.raises(
        ValueError, match=r"kind 'Other': module types .*Gated.* belong to kinds \['Gated'\]"
    ):
        flora.register_layer_kind(other)
    assert "Other" not in KINDS  # nothing half-registered
    clash = type("FLoRALinear2", (flora.Linear,), {"kind": "Linear"})
    with pytest.raises(ValueError, match="layer kind 'Linear' is registered already"):
        flora.register_layer_kind(clash)
    with pytest.raises(TypeError, match=r"must be a flora\.FLoRALayer subclass"):
        flora.register_layer_kind(Gated)
    with pytest.raises(ValueError, match="kind name must be an identifier"):
        flora.register_layer_kind(
            type("Bad", (flora.Linear,), {"kind": "a b"}), module_types=[nn.GELU]
        )
    with pytest.raises(ValueError, match="'Linear' is built in"):
        flora.unregister_layer_kind("Linear")


def test_an_unregistered_kind_no_longer_matches(gated) -> None:
    flora.unregister_layer_kind("Gated")
    try:
        with pytest.raises(TypeError, match=r"module '0' is a Gated, which inject cannot adapt"):
            flora.inject(_model(), flora.FLoRAConfig(target_modules=["0"]))
    finally:
        flora.register_layer_kind(FLoRAGated, default_ranks=(3, 3))


def _docs_table() -> dict[str, list[str]]:
    """Kind to its cells in the supported-layers table of docs/layer_kinds.rst."""
    lines = DOCS.read_text().split(".. list-table::")[1].splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if line and not line.startswith(" "))
    table = "\n".join(lines[:end])
    rows = {}
    for block in table.split("   * - ")[1:]:
        cells = [" ".join(c.split()) for c in block.split("\n     - ")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_docs_table_lists_every_builtin_kind() -> None:
    rows = _docs_table()
    builtin = [k.name for k in registered_kinds() if k.layer.__module__.startswith("flora.")]
    assert list(rows) == ["Kind", *builtin, "Parameter"]
    for name in builtin:
        kind = layer_kind(name)
        assert rows[name][3].startswith("yes") == (kind.lora is not None), name
        # Kinds that wrap their module have a factorized branch; parametrized weights run dense.
        assert rows[name][1].startswith("yes") == (kind.parameters is None), name
        assert rows[name][2].startswith("yes"), name


class Doubled(nn.Module):
    """A Linear whose parameter stores ``2 W`` (a stand-in for a quantized base)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.stored = nn.Parameter(2 * torch.randn(n_out, n_in, dtype=torch.float64))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.stored / 2)


def test_another_storage_of_linear_reads_and_writes_through_functions(tmp_path) -> None:
    # The hook quantized bases use: read_weight dequantizes (a new tensor,
    # no view), write_weight stores; adapters save and load as "Linear".
    def read(module: nn.Module) -> torch.Tensor:
        return module.stored / 2

    def write(module: nn.Module, value: torch.Tensor) -> None:
        module.stored.copy_(2 * value)

    record = flora.register_layer_kind(
        flora.Linear, module_types=[Doubled], read_weight=read, write_weight=write, name="Doubled"
    )
    try:
        assert record.saved_kind == "Linear"
        assert record.rule.default_ranks == (8, 8)
        torch.manual_seed(0)
        base = nn.Sequential(Doubled(6, 5))
        original = base[0].stored.detach().clone()
        x = torch.randn(3, 6, dtype=torch.float64)
        config = flora.FLoRAConfig(target_modules=["0"], ranks=2, init="gaussian")
        model = flora.inject(copy.deepcopy(base), config)
        layer = model[0]
        assert type(layer) is flora.Linear
        assert layer.kind == "Linear"
        with torch.no_grad():
            layer.core.normal_()
            expected = F.linear(x, original / 2 + layer.delta_weight())
            for mode in ("dense", "factorized"):
                layer.forward_mode = mode
                torch.testing.assert_close(model(x), expected)
            flora.merge(model)
            torch.testing.assert_close(layer.base_layer.stored, original + 2 * layer.delta_weight())
            torch.testing.assert_close(model(x), expected)
            flora.unmerge(model)
            torch.testing.assert_close(layer.base_layer.stored, original)
        flora.save_adapter(model, tmp_path / "a")
        assert flora.read_adapter(tmp_path / "a").layers["0"].kind == "Linear"
        loaded = flora.load_adapter(copy.deepcopy(base), tmp_path / "a")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
        with pytest.raises(ValueError, match="layer kind 'Doubled' is registered already"):
            flora.register_layer_kind(flora.Linear, module_types=[nn.GELU], name="Doubled")
    finally:
        flora.unregister_layer_kind("Doubled")
    assert "Linear" in KINDS
    assert kind_of_module(Doubled(2, 2)) is None


class Twice(nn.Module):
    """A user's layer: ``x ↦ 2 x Wᵀ``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.linear(x, self.weight)


class FLoRATwice(flora.FLoRALayer):
    """Only the dense branch: fused_forward's default is base + dense branch."""

    kind = "Twice"
    base_type = Twice
    factorizable = False

    def dense_branch(self, x, delta):
        return 2 * F.linear(x, delta)


def test_a_layer_with_only_a_dense_branch_runs_and_merges_through_the_defaults() -> None:
    flora.register_layer_kind(FLoRATwice, default_ranks=(2, 2))
    try:
        torch.manual_seed(0)
        base = nn.Sequential(Twice(6, 4))
        model = flora.inject(copy.deepcopy(base), flora.FLoRAConfig(target_modules=["0"]))
        layer = model[0]
        with torch.no_grad():
            layer.core.normal_()
        x = torch.randn(3, 6)
        expected = 2 * F.linear(x, base[0].weight + layer.delta_weight())
        assert layer.choose_forward(x) == "dense"
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(layer.fused_forward(x, layer.delta_weight()), expected)
        flora.merge(model)
        torch.testing.assert_close(model(x), expected)
        with pytest.raises(NotImplementedError, match=r"FLoRATwice defines no factorized_branch"):
            layer.factorized_branch(x, layer.adapter())
    finally:
        flora.unregister_layer_kind("Twice")


def test_auto_without_branch_costs_names_the_missing_hook() -> None:
    factorizable = type("FLoRATwiceF", (FLoRATwice,), {"kind": "TwiceF", "factorizable": True})
    flora.register_layer_kind(factorizable, module_types=[Twice])
    try:
        model = flora.inject(nn.Sequential(Twice(6, 4)), flora.FLoRAConfig(target_modules=["0"]))
        with pytest.raises(NotImplementedError, match=r"FLoRATwiceF defines no branch_costs"):
            model(torch.randn(3, 6))
        model[0].forward_mode = "dense"
        assert model(torch.randn(3, 6)).shape == (3, 4)
    finally:
        flora.unregister_layer_kind("TwiceF")
