"""One owner of the flora adapter format: tuckerlib.io.flora_format.

Both readers (``flora.load_adapter`` with PyTorch, ``tuckerlib.io.open_adapter``
without) go through the schema module, so they refuse the same malformed
directories with the same message; the tensor-key layout is spelled out in
that module only; the ΔW rule gives the update the layer applies.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="flora needs torch")

from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import flora  # noqa: E402
from tuckerlib.cli import main as tuckerlib_main  # noqa: E402
from tuckerlib.io import AdapterError, CheckpointError, open_adapter  # noqa: E402
from tuckerlib.io import flora_format as fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.emb = nn.Embedding(10, 4, padding_idx=3)
        self.norm = nn.LayerNorm(4)


def _adapted(init: str = "hosvd") -> nn.Module:
    torch.manual_seed(0)
    config = flora.FLoRAConfig(
        ranks=2, target_modules=["fc", "emb"], modules_to_save=["norm"], init=init
    )
    model = flora.inject(Net(), config)
    with torch.no_grad():  # a trained adapter: move every core away from its start
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return flora.save_adapter(_adapted(), tmp_path_factory.mktemp("format") / "adapter")


def _config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        path = directory / fmt.CONFIG_NAME
        document = json.loads(path.read_text())
        edit(document)
        path.write_text(json.dumps(document))

    return build


def _layer(**changes: object) -> Callable[[Path], None]:
    return _config(lambda d: d["layers"]["fc"].update(changes))


def _raw_config(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        path = directory / fmt.CONFIG_NAME
        path.write_text(edit(path.read_text()))

    return build


def _tensors(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def build(directory: Path) -> None:
        path = directory / fmt.WEIGHTS_NAME
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))

    return build


C, W = r"adapter_config\.json: ", r"adapter_model\.safetensors: "

MALFORMED = [
    # the four disagreements of issue 21, each now refused by both
    pytest.param(_config(lambda d: d.update(modules_to_save="norm")),
                 C + r"modules_to_save must be a list of module names, got 'norm'",
                 id="modules-to-save-bare-string"),
    pytest.param(_config(lambda d: d.update(notes="x")),
                 C + r"the config must have keys .*unknown \['notes'\]",
                 id="unknown-top-level-key"),
    pytest.param(_raw_config(lambda text: '{"format": "flora",' + text[1:]),
                 C + r"not valid JSON \(key 'format' appears twice\)", id="duplicate-json-key"),
    pytest.param(_layer(ranks=[4, 2]),
                 C + r"layer 'fc': ranks \(4, 2\) do not fit shape \(4, 6\).*usable ranks are "
                 r"\(2, 2\)", id="ranks-beyond-usable"),
    # more of the same table
    pytest.param(_config(lambda d: d.update(modules_to_save=["norm", "norm"])),
                 C + r"modules_to_save lists a module twice", id="modules-to-save-twice"),
    pytest.param(_config(lambda d: d.update(format_version=3)),
                 C + r"unsupported format_version 3", id="format-version"),
    pytest.param(_config(lambda d: d.update(layers={})),
                 C + r"layers must be a non-empty JSON object", id="no-layers"),
    pytest.param(_config(lambda d: d.update(adapter_name=3)),
                 C + r"adapter_name must be a str, got int", id="adapter-name-int"),
    pytest.param(_config(lambda d: d.update(library_version=1)),
                 C + r"library_version must be a string", id="library-version-int"),
    pytest.param(_config(lambda d: d["layers"].update({"fc.": d["layers"].pop("fc")})),
                 C + r"layer name 'fc\.' must be a dotted module name", id="layer-name"),
    pytest.param(_layer(kind="Dense"), C + r"layer 'fc': kind must be one of", id="kind"),
    pytest.param(_layer(init="orthogonal"), C + r"layer 'fc': init must be one of",
                 id="init"),
    pytest.param(_layer(forward="sparse"), C + r"layer 'fc': forward must be one of",
                 id="forward"),
    pytest.param(_layer(scale=0), C + r"layer 'fc': scale must be finite and non-zero",
                 id="scale-zero"),
    pytest.param(_layer(dropout=1.0), C + r"layer 'fc': dropout must lie in \[0, 1\)",
                 id="dropout"),
    pytest.param(_layer(bias="yes"), C + r"layer 'fc': bias must be True or False",
                 id="bias-not-bool"),
    pytest.param(_config(lambda d: d["layers"]["emb"].update(bias=True)),
                 C + r"layer 'emb': bias updates exist for .* not for a Embedding",
                 id="bias-on-embedding"),
    pytest.param(_layer(extra=1), C + r"layer 'fc': a layer record must have keys",
                 id="record-unknown-key"),
    pytest.param(_layer(geometry={"groups": 1}), C + r"layer 'fc': a Linear layer has no geometry",
                 id="geometry-on-linear"),
    pytest.param(_config(lambda d: d["layers"]["emb"]["geometry"].update(padding_idx=10)),
                 C + r"layer 'emb': geometry: padding_idx must be null or an int in \[0, 10\)",
                 id="padding-idx-out-of-range"),
    pytest.param(_tensors(lambda t: t.pop("fc.initial_core")),
                 W + r"adapter tensors do not match the config: missing \['fc\.initial_core'\]",
                 id="missing-tensor"),
    pytest.param(_tensors(lambda t: t.update(stray=torch.ones(1))),
                 W + r"adapter tensors .*unexpected \['stray'\]", id="unexpected-tensor"),
    pytest.param(_tensors(lambda t: [t.pop(k) for k in list(t) if k.startswith("modules_")]),
                 W + r"adapter tensors .*saved modules without tensors \['norm'\]",
                 id="saved-module-empty"),
]  # fmt: skip


def _refusal(read: Callable[[Path], object], directory: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        read(directory)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def _open(directory: Path) -> None:
    with open_adapter(directory):
        pass


@pytest.mark.parametrize(("build", "match"), MALFORMED)
def test_both_readers_refuse_the_same_directories_alike(saved, tmp_path, build, match) -> None:
    directory = Path(shutil.copytree(saved, tmp_path / "adapter"))
    build(directory)
    from_flora = _refusal(lambda d: flora.load_adapter(Net(), d), directory)
    from_tuckerlib = _refusal(_open, directory)
    assert from_flora == from_tuckerlib
    assert from_flora.startswith(str(directory)), from_flora
    assert re.search(match, from_flora), from_flora
    with pytest.raises(AdapterError):
        _open(directory)


def test_the_analysis_command_refuses_them_too(saved, tmp_path, capsys) -> None:
    directory = Path(shutil.copytree(saved, tmp_path / "adapter"))
    _config(lambda d: d.update(modules_to_save="norm"))(directory)
    assert tuckerlib_main(["analyze", "--adapter", str(directory)]) == 2
    assert "modules_to_save must be a list of module names, got 'norm'" in capsys.readouterr().err


def test_a_valid_directory_reads_alike(saved) -> None:
    loaded = flora.load_adapter(Net(), saved)
    with open_adapter(saved) as adapter:
        assert sorted(adapter) == sorted(flora.read_adapter(saved).layers) == ["emb", "fc"]
        assert adapter.skipped[0][0] == "norm"
        for name in adapter:
            host = dict(loaded.named_modules())[name]
            # The change the layer makes to its pretrained weight: ΔW − ΔW_init,
            # without the padding row the embedding never applies.
            expected = (host.delta_weight() - host.initial_delta()).detach().double().numpy()
            np.testing.assert_allclose(adapter[name].to_tensor(np.float64), expected, atol=1e-6)


def test_version_1_ranks_need_only_fit_the_shape(saved, tmp_path) -> None:
    directory = Path(shutil.copytree(saved, tmp_path / "adapter"))

    def to_version_1(d: dict) -> None:
        for key in ("modules_to_save", "base_model_name_or_path", "library_version", "peft_type"):
            d.pop(key, None)
        d["format_version"] = 1
        d["layers"]["emb"].pop("geometry")

    _config(to_version_1)(directory)
    _tensors(lambda t: [t.pop(k) for k in list(t) if k.startswith("modules_")])(directory)
    # (3, 2) is no usable rank pair of a (4, 6) matrix, but version 1 stored such ranks.
    layer = fmt.check_layer("fc", {**_FC, "ranks": [3, 2]}, version=1)
    assert (layer.ranks, layer.stored_ranks) == ((2, 2), (3, 2))
    with pytest.raises(ValueError, match=r"layer 'fc': ranks \(5, 2\) do not fit shape"):
        fmt.check_layer("fc", {**_FC, "ranks": [5, 2]}, version=1)
    with pytest.raises(ValueError, match=r"layer 'fc': ranks \(3, 2\) do not fit shape"):
        fmt.check_layer("fc", {**_FC, "ranks": [3, 2]})
    with open_adapter(directory) as adapter:
        assert adapter["fc"].stored_ranks == (2, 2)
    assert flora.read_adapter(directory).layers["fc"].ranks == (2, 2)


_FC = {"kind": "Linear", "shape": [4, 6], "ranks": [2, 2], "scale": 1.0, "init": "zero_core"}


def test_difference_is_the_same_for_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    core, initial_core = rng.standard_normal((2, 3)), rng.standard_normal((1, 2))
    factors = [rng.standard_normal((4, 2)), rng.standard_normal((5, 3))]
    initial = [rng.standard_normal((4, 1)), rng.standard_normal((5, 2))]
    joined_core, joined = fmt.difference(core, factors, initial_core, initial)
    dense = np.einsum("ab,ia,jb->ij", joined_core, *joined)
    expected = np.einsum("ab,ia,jb->ij", core, *factors) - np.einsum(
        "ab,ia,jb->ij", initial_core, *initial
    )
    np.testing.assert_allclose(dense, expected, atol=1e-12)
    as_torch = [torch.from_numpy(a) for a in (core, *factors, initial_core, *initial)]
    torch_core, torch_factors = fmt.difference(
        as_torch[0], as_torch[1:3], as_torch[3], as_torch[4:]
    )
    assert isinstance(torch_core, torch.Tensor)
    np.testing.assert_array_equal(torch_core.numpy(), joined_core)
    for ours, theirs in zip(torch_factors, joined, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs)


def test_update_factors_masks_the_padding_row_and_checks_init() -> None:
    record = fmt.check_layer(
        "emb",
        {
            **_FC,
            "kind": "Embedding",
            "shape": [5, 3],
            "geometry": {"padding_idx": 1, "max_norm": None},
        },
    )
    factors = [np.ones((5, 2)), np.ones((3, 2))]
    _, masked = fmt.update_factors(record, np.ones((2, 2)), factors)
    assert masked[0][1].tolist() == [0.0, 0.0]
    assert factors[0][1].tolist() == [1.0, 1.0]  # the input is not changed
    with pytest.raises(ValueError, match=r"layer 'emb': the initial core and factors come"):
        fmt.update_factors(record, np.ones((2, 2)), factors, (np.ones((2, 2)), factors))


def test_kinds_are_one_table() -> None:
    # The schema reads the kind registry's torch-free table, as flora.spec does.
    assert fmt.KINDS is flora.spec.KINDS
    assert fmt.BIAS_KINDS is flora.spec.BIAS_KINDS
    assert tuple(flora.spec.BIAS_KINDS) == ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
    with pytest.raises(TypeError):
        fmt.KINDS[0] = "Dense"  # type: ignore[index]


def _literal_parts(tree: ast.AST) -> list[str]:
    """String constants of ``tree`` outside docstrings (f-string pieces included)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    ]  # fmt: skip


#: The pieces that spell a tensor key of the format.
_KEY_PIECES = (".core", ".initial_core", ".factors.", ".initial_factors.", "modules_to_save.")
#: ``f"{layer}.bias"`` also names a model's own bias parameter in a checkpoint (not an
#: adapter key): the extraction reads the tuned checkpoint's biases with it.
_BIAS_ELSEWHERE = {"flora/_carry.py"}


def test_the_tensor_keys_are_spelled_in_the_schema_module_only() -> None:
    spelled: dict[str, set[str]] = {}
    for package in ("flora", "tuckerlib"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = _literal_parts(ast.parse(path.read_text(encoding="utf-8")))
            where = str(path.relative_to(ROOT))
            for piece in _KEY_PIECES:
                if any(part == piece or part.startswith(piece) for part in parts):
                    spelled.setdefault(piece, set()).add(where)
            if ".bias" in parts and where not in _BIAS_ELSEWHERE:
                spelled.setdefault(".bias", set()).add(where)
    schema = {"tuckerlib/io/flora_format.py"}
    assert spelled == dict.fromkeys([*_KEY_PIECES, ".bias"], schema)
