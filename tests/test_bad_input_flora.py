"""flora on bad input: one clear error naming the argument or file, and nothing changed.

``CALLS`` are bad arguments to the model-level functions: each row calls
one function on a model with two adapters and a saved module, and must
raise the row's exception with a message matching its pattern (which names
the argument at fault), leaving the model's tensors, module types and
``requires_grad`` flags exactly as they were. ``VALUES`` are bad arguments
to functions that take no model (configs, specs, writers). ``FILES``
corrupt one part of a saved adapter directory; loading it must raise a
:class:`tuckerlib.io.CheckpointError` (a ``ValueError``) whose message
starts with the file at fault. ``EXTRACT`` and ``CLI`` are bad input to
``flora.extract`` and ``flora extract``: the command line exits with status
2 and one line on stderr, and no file changes. A new function, option or
file problem joins by adding a row.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="flora needs torch")

from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

import flora  # noqa: E402
from flora.cli import main  # noqa: E402
from flora.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from tuckerlib.io import CheckpointError  # noqa: E402


class Net(nn.Module):
    def __init__(self, *, head_bias: bool = False, device: str | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4, device=device)
        self.conv = nn.Conv1d(4, 4, 3, padding=1, device=device)
        self.norm = nn.BatchNorm1d(4, device=device)
        self.head = nn.Linear(4, 2, bias=head_bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(self.fc(x).unsqueeze(-1)))
        return self.head(h.squeeze(-1))


CONFIG = flora.FLoRAConfig(
    ranks=2, target_modules=["fc", "conv", "head"], modules_to_save=["norm"], init="gaussian"
)


def _adapted() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    for name in ("a", "b"):
        flora.inject(model, CONFIG, adapter_name=name)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.core.normal_()
    return model


@pytest.fixture
def model() -> nn.Module:
    return _adapted()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """An adapter directory saved from ``_adapted()``'s adapter "a"."""
    return flora.save_adapter(_adapted(), tmp_path_factory.mktemp("saved") / "a", adapter_name="a")


def _snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {name: type(m) for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return tensors, types, grads


def _assert_unchanged(model: nn.Module, before: tuple[dict, dict, dict]) -> None:
    tensors, types, grads = _snapshot(model)
    assert types == before[1]
    assert grads == before[2]
    assert tensors.keys() == before[0].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[0][key]), key


def _weights(model: nn.Module, **changes: object) -> dict[str, object]:
    state = dict(flora.adapter_state_dict(model, adapter_name="a"))
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def _write(tmp: Path, name: str, kind: str, shape: tuple, ranks: tuple, **spec) -> Path:
    layer = flora.LayerSpec(kind, shape, ranks, **spec)
    tensors = {f"{name}.core": torch.ones(ranks)}
    for n, (size, rank) in enumerate(zip(shape, ranks, strict=True)):
        tensors[f"{name}.factors.{n}"] = torch.ones(size, rank)
    if layer.bias:
        tensors[f"{name}.bias"] = torch.ones(shape[0])
    return flora.write_adapter(tmp / "other", flora.FLoRAConfig(), {name: layer}, tensors)


def _delta(shape: tuple[int, int], bias: bool = False) -> flora.TuckerDelta:
    bias_tensor = torch.ones(shape[0]) if bias else None
    factors = [torch.ones(shape[0], 1), torch.ones(shape[1], 1)]
    return flora.TuckerDelta.from_tucker("Linear", torch.ones(1, 1), factors, bias=bias_tensor)


def _enter(context) -> None:
    with context:
        pass


def _other_files(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("keep me")
    return tmp


NAN = float("nan")
Call = Callable[[nn.Module, Path], object]

CALLS = [
    # inject
    pytest.param(
        lambda m, t: flora.inject(None, CONFIG),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="inject-model-none",
    ),
    pytest.param(
        lambda m, t: flora.inject(m, {"ranks": 2}),
        TypeError,
        r"config must be a FLoRAConfig, got dict",
        id="inject-config-dict",
    ),
    pytest.param(
        lambda m, t: flora.inject(m, CONFIG, adapter_name=3),
        TypeError,
        r"adapter_name must be a str, got int",
        id="inject-name-int",
    ),
    pytest.param(
        lambda m, t: flora.inject(m, CONFIG, adapter_name="x.y"),
        ValueError,
        r"adapter_name must be a non-empty string without '\.'",
        id="inject-name-dotted",
    ),
    pytest.param(
        lambda m, t: flora.inject(m, CONFIG, adapter_name="a"),
        ValueError,
        r"already has an adapter 'a'",
        id="inject-name-taken",
    ),
    pytest.param(
        lambda m, t: flora.inject(m, flora.FLoRAConfig(target_modules=["nope"]), adapter_name="c"),
        ValueError,
        r"target_modules entry 'nope' matches no name",
        id="inject-unknown-target",
    ),
    pytest.param(
        lambda m, t: flora.inject(
            m, flora.FLoRAConfig(target_modules=["fc"], rank_pattern={"nope": 1}), adapter_name="c"
        ),
        ValueError,
        r"rank_pattern key 'nope' matches no adapted layer",
        id="inject-unknown-pattern",
    ),
    pytest.param(
        lambda m, t: flora.inject(m, flora.FLoRAConfig(target_modules=["norm"]), adapter_name="c"),
        TypeError,
        r"module 'norm' is a ModulesToSave, which inject cannot adapt",
        id="inject-saved-module-as-target",
    ),
    pytest.param(
        lambda m, t: flora.inject(
            m, flora.FLoRAConfig(target_modules=["fc"], modules_to_save=["fc"]), adapter_name="c"
        ),
        ValueError,
        r"modules_to_save entry 'fc' holds FLoRA adapters",
        id="inject-adapted-module-saved",
    ),
    # merge, unmerge, unload
    pytest.param(
        lambda m, t: flora.merge(m, adapter_names=["zz"]),
        ValueError,
        r"adapter_names: the model has no adapter \['zz'\]; it has \['a', 'b'\]",
        id="merge-unknown-name",
    ),
    pytest.param(
        lambda m, t: flora.merge(m, adapter_names=[None]),
        TypeError,
        r"adapter_names must be an adapter name or a list of them",
        id="merge-name-none",
    ),
    pytest.param(
        lambda m, t: flora.merge(m, adapter_names=["a", "a"]),
        ValueError,
        r"adapter_names names an adapter twice",
        id="merge-duplicate-names",
    ),
    pytest.param(
        lambda m, t: flora.merge(m, adapter_names=[]),
        ValueError,
        r"adapter_names must name at least one adapter",
        id="merge-no-names",
    ),
    pytest.param(
        lambda m, t: flora.merge(m, safe="no"),
        TypeError,
        r"safe must be True or False",
        id="merge-safe-string",
    ),
    pytest.param(
        lambda m, t: flora.merge(None),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="merge-model-none",
    ),
    pytest.param(
        lambda m, t: flora.unmerge(m),
        RuntimeError,
        r"no adapter is merged",
        id="unmerge-unmerged",
    ),
    pytest.param(
        lambda m, t: flora.unload(m, merge="no"),
        TypeError,
        r"merge must be True or False",
        id="unload-merge-string",
    ),
    pytest.param(
        lambda m, t: flora.unload(nn.Linear(2, 2)),
        ValueError,
        r"the model has no FLoRA adapters",
        id="unload-plain-model",
    ),
    # named adapters
    pytest.param(
        lambda m, t: flora.set_adapter(m, "zz"),
        ValueError,
        r"names: the model has no adapter \['zz'\]",
        id="set-adapter-unknown",
    ),
    pytest.param(
        lambda m, t: flora.set_adapter(m, 3),
        TypeError,
        r"names must be an adapter name or a list of them, got 3",
        id="set-adapter-int",
    ),
    pytest.param(
        lambda m, t: flora.set_adapter(m, []),
        ValueError,
        r"names must name at least one",
        id="set-adapter-empty",
    ),
    pytest.param(
        lambda m, t: flora.set_adapter(m, ["a", "b"]),
        ValueError,
        r"saved module 'norm': adapters \['a', 'b'\] each have a copy",
        id="set-adapter-two-saved-copies",
    ),
    pytest.param(
        lambda m, t: flora.delete_adapter(m, "zz"),
        ValueError,
        r"adapter_name: the model has no adapter \['zz'\]",
        id="delete-unknown",
    ),
    pytest.param(
        lambda m, t: flora.delete_adapter(m, ["a"]),
        TypeError,
        r"adapter_name must be a str, got \['a'\]",
        id="delete-list",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a", "b"], [1.0], "mix"),
        ValueError,
        r"weights has 1 entries for 2 adapters",
        id="combine-weights-length",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a", "b"], [1.0, NAN], "mix"),
        ValueError,
        r"weights must be finite, got \[1\.0, nan\]",
        id="combine-weight-nan",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a", "a"], [1.0, 1.0], "mix"),
        ValueError,
        r"adapter_names names an adapter twice",
        id="combine-duplicate-names",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["zz"], [1.0], "mix"),
        ValueError,
        r"adapter_names: the model has no adapter \['zz'\]",
        id="combine-unknown-name",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a"], [1.0], "b"),
        ValueError,
        r"already has an adapter 'b'",
        id="combine-new-name-taken",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a"], [1.0], 3),
        TypeError,
        r"new_name must be a str, got int",
        id="combine-new-name-int",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a"], ["1"], "mix"),
        TypeError,
        r"weights must be real numbers",
        id="combine-weight-string",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a"], [True], "mix"),
        TypeError,
        r"weights must be real numbers",
        id="combine-weight-bool",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a", "b"], {1.0, 2.0}, "mix"),
        TypeError,
        r"weights must be a sequence of real numbers",
        id="combine-weights-set",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a"], 1.0, "mix"),
        TypeError,
        r"weights must be a sequence of real numbers",
        id="combine-weights-scalar",
    ),
    # model-level queries
    pytest.param(
        lambda m, t: flora.trainable_parameters(None),
        TypeError,
        r"model must be a torch\.nn\.Module, got NoneType",
        id="trainable-parameters-none",
    ),
    pytest.param(
        lambda m, t: flora.summary(None),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="summary-none",
    ),
    pytest.param(
        lambda m, t: flora.adapter_names("model"),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="adapter-names-string",
    ),
    pytest.param(
        lambda m, t: flora.active_adapters(None),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="active-adapters-none",
    ),
    pytest.param(
        lambda m, t: flora.adapted_layers(None),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="adapted-layers-none",
    ),
    pytest.param(
        lambda m, t: flora.merged_state_dict(None),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="merged-state-dict-none",
    ),
    pytest.param(
        lambda m, t: _enter(flora.disable_adapter(None)),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="disable-adapter-none",
    ),
    pytest.param(
        lambda m, t: flora.adapter_state_dict(m, adapter_name="zz"),
        ValueError,
        r"no adapter 'zz'",
        id="adapter-state-dict-unknown",
    ),
    pytest.param(
        lambda m, t: flora.adapter_state_dict(m, adapter_name=["a"]),
        TypeError,
        r"adapter_name must be a str",
        id="adapter-state-dict-list",
    ),
    # attach_adapter
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"fc": "delta"}),
        TypeError,
        r"adapters must be a dict from layer name to flora\.TuckerDelta",
        id="attach-not-a-delta",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"nope": _delta((4, 6))}),
        ValueError,
        r"layer 'nope': the model has no module 'nope'",
        id="attach-unknown-layer",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"fc": _delta((4, 5))}),
        ValueError,
        r"layer 'fc': the adapter is for shape \[4, 5\], the model's weight has shape \[4, 6\]",
        id="attach-wrong-shape",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"head": _delta((2, 4), bias=True)}),
        ValueError,
        r"layer 'head': the adapter carries a bias update, but the model's Linear has no bias",
        id="attach-bias-update-without-bias",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"fc": _delta((4, 6))}, trainable="yes"),
        TypeError,
        r"trainable must be True or False",
        id="attach-trainable-string",
    ),
    # save_adapter
    pytest.param(
        lambda m, t: flora.save_adapter(None, t),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="save-model-none",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(m, None, adapter_name="a"),
        TypeError,
        r"directory must be a str or os\.PathLike, got NoneType",
        id="save-directory-none",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(m, t, adapter_name="zz"),
        ValueError,
        r"no adapter 'zz'; the model has \['a', 'b'\]",
        id="save-unknown-name",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(m, _other_files(t), adapter_name="a"),
        ValueError,
        r"holds other files \['notes\.txt'\]",
        id="save-into-directory-with-other-files",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(m, _other_files(t) / "notes.txt", adapter_name="a"),
        FileExistsError,
        r"notes\.txt exists and is not a directory",
        id="save-to-a-file",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(m, _other_files(t) / "notes.txt" / "a", adapter_name="a"),
        FileExistsError,
        r"notes\.txt/a: cannot write there: .*notes\.txt is not a directory",
        id="save-under-a-file",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(
            m, t, adapter_name="a", state_dict=_weights(m, **{"fc.core": np.ones((2, 2))})
        ),
        TypeError,
        r"adapter tensor 'fc\.core' must be a torch\.Tensor, got ndarray",
        id="save-state-dict-numpy-value",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(
            m, t, adapter_name="a", state_dict=_weights(m, **{"fc.core": 1.0})
        ),
        TypeError,
        r"adapter tensor 'fc\.core' must be a torch\.Tensor, got float",
        id="save-state-dict-float-value",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(m, t, adapter_name="a", state_dict=[1, 2]),
        TypeError,
        r"state_dict must be a dict of tensors",
        id="save-state-dict-list",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(
            m, t, adapter_name="a", state_dict=_weights(m, **{"fc.core": None})
        ),
        ValueError,
        r"missing \['fc\.core'\]",
        id="save-state-dict-missing-key",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(
            m, t, adapter_name="a", state_dict=_weights(m, **{"fc.core": torch.full((2, 2), NAN)})
        ),
        ValueError,
        r"adapter tensors \['fc\.core'\] hold NaN or infinite values",
        id="save-state-dict-nan",
    ),
    pytest.param(
        lambda m, t: flora.save_adapter(
            m,
            t,
            adapter_name="a",
            state_dict=_weights(m, **{"fc.core": torch.ones(2, 2, device="meta")}),
        ),
        ValueError,
        r"meta tensors: \['fc\.core'\]",
        id="save-state-dict-meta",
    ),
    # load_adapter: arguments, and adapters that do not fit the model
    pytest.param(
        lambda m, t: flora.load_adapter(m, t / "x", adapter_name={"a": 1}),
        TypeError,
        r"adapter_name must be a str, got dict",
        id="load-name-dict",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, t / "x", trainable="yes"),
        TypeError,
        r"trainable must be True or False",
        id="load-trainable-string",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(None, t / "x"),
        TypeError,
        r"model must be a torch\.nn\.Module",
        id="load-model-none",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, t / "absent"),
        CheckpointError,
        r"absent: no such directory",
        id="load-missing-directory",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, None),
        TypeError,
        r"directory must be a str or os\.PathLike",
        id="load-directory-none",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, _write(t, "fc", "Conv1d", (4, 6, 1), (1, 1, 1))),
        ValueError,
        r"layer 'fc': expected a torch\.nn\.Conv1d, the model has a FLoRA Linear|"
        r"layer 'fc' is a FLoRA Linear, not a Conv1d",
        id="load-other-kind",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, _write(t, "fc", "Linear", (4, 5), (1, 1))),
        ValueError,
        r"layer 'fc': the adapter is for shape \[4, 5\]",
        id="load-other-shape",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, _write(t, "nope", "Linear", (4, 6), (1, 1))),
        ValueError,
        r"layer 'nope': the model has no module 'nope'",
        id="load-unknown-layer",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, _write(t, "head", "Linear", (2, 4), (1, 1), bias=True)),
        ValueError,
        r"layer 'head': the adapter carries a bias update, but the model's Linear",
        id="load-bias-update-onto-layer-without-bias",
    ),
    pytest.param(
        lambda m, t: flora.load_adapter(m, _write(t, "norm.weight", "Parameter", (4,), (1,))),
        ValueError,
        r"the model has no parameter 'norm\.weight' to adapt",
        id="load-parameter-inside-saved-module",
    ),
    # layer names that are the model itself, or have an empty part
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"": _delta((4, 6))}),
        ValueError,
        r"layer name '' must be a dotted module name with non-empty parts",
        id="attach-layer-name-empty",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"fc.": _delta((4, 6))}),
        ValueError,
        r"layer name 'fc\.' must be a dotted module name",
        id="attach-layer-name-trailing-dot",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(m, "c", {"..fc": _delta((4, 6))}),
        ValueError,
        r"layer name '\.\.fc' must be a dotted module name",
        id="attach-layer-name-empty-parts",
    ),
    pytest.param(
        lambda m, t: flora.attach_adapter(
            m, "c", {"fc": _delta((4, 6))}, modules_to_save={"": m.state_dict()}
        ),
        ValueError,
        r"saved module name '' must be a dotted module name",
        id="attach-saved-module-name-empty",
    ),
    # weights whose combination overflows
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a", "b"], [1e39, 1e39], "mix"),
        ValueError,
        r"layer '\w+': weights \[1e\+39, 1e\+39\] make the combined update overflow",
        id="weighted-overflow",
    ),
    pytest.param(
        lambda m, t: flora.add_weighted_adapter(m, ["a", "b"], [3e38, 3e38], "mix"),
        ValueError,
        r"make the combined update overflow to NaN or infinite values in torch\.float32",
        id="weighted-sum-overflows",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), CALLS)
def test_bad_call_is_refused_and_the_model_is_unchanged(
    model, tmp_path, call, error, match
) -> None:
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        call(model, tmp_path)
    _assert_unchanged(model, before)


def test_load_adapter_into_a_model_with_the_same_name_changes_nothing(model, saved) -> None:
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"already has an adapter 'a'"):
        flora.load_adapter(model, saved)
    _assert_unchanged(model, before)


def test_load_adapter_with_a_saved_module_of_another_shape_changes_nothing(saved) -> None:
    other = Net()
    other.norm = nn.BatchNorm1d(5)
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"saved module 'norm': tensors \[.*'bias'.*\] do not"):
        flora.load_adapter(other, saved)
    _assert_unchanged(other, before)


VALUES = [
    # FLoRAConfig: one row per field
    pytest.param(lambda: flora.FLoRAConfig(ranks=True), TypeError, r"ranks must be an int",
                 id="config-ranks-bool"),
    pytest.param(lambda: flora.FLoRAConfig(ranks="8"), TypeError, r"ranks must be an int",
                 id="config-ranks-string"),
    pytest.param(lambda: flora.FLoRAConfig(ranks=0), ValueError, r"ranks must be >= 1, got 0",
                 id="config-ranks-zero"),
    pytest.param(lambda: flora.FLoRAConfig(ranks=2.5), TypeError, r"ranks must be an int",
                 id="config-ranks-float"),
    pytest.param(lambda: flora.FLoRAConfig(ranks=(4, -1)), ValueError,
                 r"ranks\[1\] must be a positive int or None, got -1", id="config-ranks-negative"),
    pytest.param(lambda: flora.FLoRAConfig(ranks={"Lnear": 2}), ValueError,
                 r"ranks names unknown layer kinds \['Lnear'\]", id="config-ranks-unknown-kind"),
    pytest.param(lambda: flora.FLoRAConfig(ranks={"Linear": "x"}), TypeError,
                 r"ranks\['Linear'\] must be an int", id="config-ranks-kind-string"),
    pytest.param(lambda: flora.FLoRAConfig(scale=0), ValueError,
                 r"scale must be finite and non-zero", id="config-scale-zero"),
    pytest.param(lambda: flora.FLoRAConfig(scale=NAN), ValueError,
                 r"scale must be finite and non-zero", id="config-scale-nan"),
    pytest.param(lambda: flora.FLoRAConfig(scale="1"), TypeError,
                 r"scale must be a real number, got '1'", id="config-scale-string"),
    pytest.param(lambda: flora.FLoRAConfig(scale=True), TypeError,
                 r"scale must be a real number, got True", id="config-scale-bool"),
    pytest.param(lambda: flora.FLoRAConfig(scale=np.True_), TypeError,
                 r"scale must be a real number", id="config-scale-numpy-bool"),
    pytest.param(lambda: flora.FLoRAConfig(dropout=1.0), ValueError,
                 r"dropout must lie in \[0, 1\), got 1\.0", id="config-dropout-one"),
    pytest.param(lambda: flora.FLoRAConfig(dropout="0"), TypeError,
                 r"dropout must be a real number", id="config-dropout-string"),
    pytest.param(lambda: flora.FLoRAConfig(target_modules=3), TypeError,
                 r"target_modules must be None, a regex string or a list", id="config-targets-int"),
    pytest.param(lambda: flora.FLoRAConfig(target_modules="("), ValueError,
                 r"target_modules is not a valid regular expression",
                 id="config-targets-bad-regex"),
    pytest.param(lambda: flora.FLoRAConfig(target_modules=["fc", ""]), TypeError,
                 r"target_modules must be None, a regex string or a list of non-empty names",
                 id="config-targets-empty-name"),
    pytest.param(lambda: flora.FLoRAConfig(exclude_modules=[1]), TypeError,
                 r"exclude_modules must be None", id="config-exclude-int"),
    pytest.param(lambda: flora.FLoRAConfig(modules_to_save=[None]), TypeError,
                 r"modules_to_save must be None", id="config-saved-none-entry"),
    pytest.param(lambda: flora.FLoRAConfig(rank_pattern=[("fc", 2)]), TypeError,
                 r"rank_pattern must be a dict", id="config-pattern-list"),
    pytest.param(lambda: flora.FLoRAConfig(rank_pattern={"(": 2}), ValueError,
                 r"rank_pattern key is not a valid regular expression",
                 id="config-pattern-bad-regex"),
    pytest.param(lambda: flora.FLoRAConfig(rank_pattern={"fc": 0}), ValueError,
                 r"rank_pattern\['fc'\] must be >= 1", id="config-pattern-rank-zero"),
    pytest.param(lambda: flora.FLoRAConfig(init="svd"), ValueError,
                 r"init must be one of \('auto', 'balanced', 'zero_core', 'hosvd', "
                 r"'gaussian'\), got 'svd'",
                 id="config-init-unknown"),
    pytest.param(lambda: flora.FLoRAConfig(forward="fast"), ValueError,
                 r"forward must be one of", id="config-forward-unknown"),
    pytest.param(lambda: flora.FLoRAConfig(bias="yes"), TypeError,
                 r"bias must be True or False, got 'yes'", id="config-bias-string"),
    pytest.param(lambda: flora.FLoRAConfig.from_dict({"rnks": 2}), ValueError,
                 r"config has unknown fields \['rnks'\]", id="config-from-dict-unknown-field"),
    pytest.param(lambda: flora.FLoRAConfig.from_dict([("ranks", 2)]), TypeError,
                 r"config must be a JSON object, got list", id="config-from-dict-list"),
    # LayerSpec
    pytest.param(lambda: flora.LayerSpec("Dense", (3, 4), (1, 1)), ValueError,
                 r"kind must be one of", id="spec-kind-unknown"),
    pytest.param(lambda: flora.LayerSpec("Linear", (3, 4), (4, 1)), ValueError,
                 r"ranks \(4, 1\) do not fit shape \(3, 4\)", id="spec-ranks-too-large"),
    pytest.param(lambda: flora.LayerSpec("Linear", (3, 0), (1, 1)), ValueError,
                 r"shape must hold positive ints", id="spec-shape-zero"),
    pytest.param(lambda: flora.LayerSpec("Linear", (3, 4), (True, 1)), TypeError,
                 r"ranks\[0\] must be an int, got True", id="spec-rank-bool"),
    pytest.param(lambda: flora.LayerSpec("Linear", (3, 4.0), (1, 1)), TypeError,
                 r"shape entries must be an int, got 4\.0", id="spec-shape-float"),
    pytest.param(lambda: flora.LayerSpec("Embedding", (3, 4), (1, 1), bias=True), ValueError,
                 r"bias updates exist for .*Linear.* layers only, not for a Embedding",
                 id="spec-bias-on-embedding"),
    pytest.param(lambda: flora.LayerSpec("Parameter", (3, 4), (1, 1), bias=True), ValueError,
                 r"not for a Parameter", id="spec-bias-on-parameter"),
    pytest.param(lambda: flora.LayerSpec("Linear", (3, 4), (1, 1), bias=1), TypeError,
                 r"bias must be True or False, got 1", id="spec-bias-int"),
    pytest.param(
        lambda: flora.LayerSpec.from_record({"kind": "Linear", "shape": [3, 4], "ranks": [1, 1],
                                             "scale": 1.0, "init": "zero_core", "rank": 2}),
        ValueError, r"a layer record must have keys", id="spec-record-unknown-key"),
    pytest.param(
        lambda: flora.LayerSpec.from_record({"kind": "Linear", "shape": [3, 4], "ranks": "11",
                                             "scale": 1.0, "init": "zero_core"}),
        ValueError, r"ranks must be a list of ints, got '11'", id="spec-record-ranks-string"),
    pytest.param(
        lambda: flora.LayerSpec.from_record({"kind": "Linear", "shape": [3, 4], "ranks": [1, 1],
                                             "scale": "2", "init": "zero_core"}),
        ValueError, r"scale must be a real number, got '2'", id="spec-record-scale-string"),
    # TuckerDelta
    pytest.param(
        lambda: flora.TuckerDelta.from_tucker("Linear", torch.ones(1, 1),
                                              [torch.ones(3, 1), torch.ones(4, 1)],
                                              bias=torch.ones(4)),
        ValueError, r"the bias update must be a floating tensor of shape \(3,\)",
        id="delta-bias-wrong-shape"),
    pytest.param(
        lambda: flora.TuckerDelta.from_tucker("Embedding", torch.ones(1, 1),
                                              [torch.ones(3, 1), torch.ones(4, 1)],
                                              bias=torch.ones(3)),
        ValueError, r"not for a Embedding", id="delta-bias-on-embedding"),
    # write_adapter
    pytest.param(
        lambda: flora.write_adapter("x", {"ranks": 2}, {}, {}), TypeError,
        r"config must be a FLoRAConfig, got dict", id="write-config-dict"),
    pytest.param(
        lambda: flora.write_adapter("x", flora.FLoRAConfig(), {"fc": 3}, {}), ValueError,
        r"layer 'fc': a layer record must be a JSON object, got int", id="write-record-int"),
    pytest.param(
        lambda: flora.write_adapter("x", flora.FLoRAConfig(), [], {}), TypeError,
        r"layers must be a dict keyed by name, got list", id="write-layers-list"),
    pytest.param(
        lambda: flora.write_adapter("x", flora.FLoRAConfig(),
                                    {"fc": flora.LayerSpec("Linear", (3, 4), (1, 1))},
                                    {"fc.core": np.ones((1, 1))}),
        TypeError, r"adapter tensor 'fc\.core' must be a torch\.Tensor, got ndarray",
        id="write-numpy-tensor"),
    pytest.param(
        lambda: flora.write_adapter("x", flora.FLoRAConfig(), {}, {}), ValueError,
        r"an adapter needs at least one layer", id="write-no-layers"),
    pytest.param(
        lambda: flora.write_adapter(3, flora.FLoRAConfig(), {}, {}), TypeError,
        r"directory must be a str or os\.PathLike, got int", id="write-directory-int"),
    pytest.param(
        lambda: flora.read_adapter(None), TypeError, r"directory must be a str or os\.PathLike",
        id="read-directory-none"),
    pytest.param(
        lambda: flora.write_adapter("x", flora.FLoRAConfig(),
                                    {"": flora.LayerSpec("Linear", (3, 4), (1, 1))},
                                    {".core": torch.ones(1, 1), ".factors.0": torch.ones(3, 1),
                                     ".factors.1": torch.ones(4, 1)}),
        ValueError, r"layer name '' must be a dotted module name", id="write-layer-name-empty"),
    pytest.param(
        lambda: flora.write_adapter("x", flora.FLoRAConfig(),
                                    {"a..b": flora.LayerSpec("Linear", (3, 4), (1, 1))}, {}),
        ValueError, r"layer name 'a\.\.b' must be", id="write-layer-name-empty-part"),
    pytest.param(lambda: flora.save_adapter(_adapted(), ".", adapter_name="a"), ValueError,
                 r"is the current directory \(or its parent\), which cannot be replaced",
                 id="save-into-dot"),
    pytest.param(lambda: flora.save_adapter(_adapted(), "sub/..", adapter_name="a"), ValueError,
                 r"which cannot be replaced", id="save-into-dot-dot"),
    pytest.param(lambda: flora.export_lora(_adapted(), ".", adapter_name="a"),
                 flora.LoraConversionError, r"is the current directory", id="export-into-dot"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), VALUES)
def test_bad_value_gets_a_clear_error(call, error, match, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        call()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: flora.FLoRAConfig(ranks=np.int64(3), scale=np.float32(0.5), dropout=np.float64(0)),
        lambda: flora.FLoRAConfig(ranks=(np.int32(4), None), rank_pattern={"fc": np.int8(2)}),
        lambda: flora.FLoRAConfig(ranks={"Linear": np.uint8(2)}, bias=np.True_),
        lambda: flora.LayerSpec("Linear", (np.int64(3), 4), (np.int64(2), 2), np.float32(2)),
    ],
    ids=["config-numpy-scalars", "config-numpy-template", "config-numpy-kind-ranks", "spec"],
)
def test_integral_numpy_scalars_are_accepted_as_tuckerlib_accepts_them(make) -> None:
    value = make()
    plain = json.loads(
        json.dumps(value.to_dict() if hasattr(value, "to_dict") else value.to_record())
    )
    assert plain  # every NumPy scalar became a JSON number


# Adapter directories with one part broken. Each builder gets a copy of a good
# directory and returns the directory to load.
def _replace(name: str, content: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content(path.read_bytes()))
        return directory

    return build


def _config(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / CONFIG_NAME
        document = json.loads(path.read_text())
        change(document)
        path.write_text(json.dumps(document))
        return directory

    return build


def _layer(**fields: object) -> Callable[[Path], Path]:
    return _config(lambda d: d["layers"]["fc"].update(fields))


def _tensors(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / WEIGHTS_NAME
        tensors = flora.read_adapter(directory).tensors
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return directory

    return build


def _swap_for_directory(name: str) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        (directory / name).unlink()
        (directory / name).mkdir()
        return directory

    return build


def _remove(name: str) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        (directory / name).unlink()
        return directory

    return build


def _torch_zip(directory: Path) -> Path:
    torch.save({"fc.core": torch.ones(2, 2)}, directory / WEIGHTS_NAME)
    return directory


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


W, C = r"adapter_model\.safetensors: ", r"adapter_config\.json: "

FILES = [
    # the weights file
    pytest.param(_replace(WEIGHTS_NAME, lambda raw: raw[:-9]),
                 W + r"tensor '.*' extends past the end of the file", id="weights-truncated"),
    pytest.param(_replace(WEIGHTS_NAME, lambda raw: b""),
                 W + r"not a safetensors file \(only 0 bytes\)", id="weights-empty"),
    pytest.param(_replace(WEIGHTS_NAME, lambda raw: np.random.default_rng(0).bytes(300)),
                 W + r"not a safetensors file", id="weights-random-bytes"),
    pytest.param(_replace(WEIGHTS_NAME, lambda raw: pickle.dumps({"fc.core": _Exploit()})),
                 W + r"not a safetensors file", id="weights-pickle"),
    pytest.param(_torch_zip, W + r"not a safetensors file", id="weights-torch-zip"),
    pytest.param(_swap_for_directory(WEIGHTS_NAME), W + r"is a directory, not a file",
                 id="weights-directory"),
    pytest.param(_remove(WEIGHTS_NAME), W + r"no such file", id="weights-missing"),
    pytest.param(_tensors(lambda t: t.pop("fc.core")),
                 W + r"adapter tensors do not match the config: missing \['fc\.core'\]",
                 id="weights-missing-key"),
    pytest.param(_tensors(lambda t: t.update(extra=torch.ones(1))),
                 W + r"adapter tensors do not match the config: missing \[\], "
                 r"unexpected \['extra'\]",
                 id="weights-extra-key"),
    pytest.param(_tensors(lambda t: t.update({"fc.core": torch.ones(3, 2)})),
                 W + r"tensor 'fc\.core' must be a floating tensor of shape \(2, 2\), got "
                 r"torch\.float32 \(3, 2\)", id="weights-wrong-shape"),
    pytest.param(_tensors(lambda t: t.update({"fc.core": torch.ones(2, 2, dtype=torch.int64)})),
                 W + r"tensor 'fc\.core' must be a floating tensor .* got torch\.int64",
                 id="weights-integer-dtype"),
    pytest.param(_tensors(lambda t: t.update({"fc.core": torch.ones(2, 2, dtype=torch.bool)})),
                 W + r"tensor 'fc\.core' must be a floating tensor .* got torch\.bool",
                 id="weights-bool-dtype"),
    pytest.param(_tensors(lambda t: t["conv.factors.2"].fill_(NAN)),
                 W + r"adapter tensors \['conv\.factors\.2'\] hold NaN or infinite values",
                 id="weights-nan"),
    pytest.param(_tensors(lambda t: t["modules_to_save.norm.running_var"].fill_(math.inf)),
                 W + r"adapter tensors \['modules_to_save\.norm\.running_var'\] hold NaN or inf",
                 id="weights-saved-module-inf"),
    pytest.param(_tensors(lambda t: [t.pop(k) for k in list(t) if k.startswith("modules_")]),
                 W + r"adapter tensors do not match .* saved modules without tensors \['norm'\]",
                 id="weights-saved-module-missing"),
    # the config file
    pytest.param(_replace(CONFIG_NAME, lambda raw: b""), C + r"not valid JSON",
                 id="config-empty"),
    pytest.param(_replace(CONFIG_NAME, lambda raw: raw[:-20]), C + r"not valid JSON",
                 id="config-truncated"),
    pytest.param(_replace(CONFIG_NAME, lambda raw: b"\xff\xfe{}"),
                 C + r"not valid JSON \('utf-8' codec", id="config-binary"),
    pytest.param(_replace(CONFIG_NAME, lambda raw: b'{"format": 0,' + raw[1:]),
                 C + r"not valid JSON \(key 'format' appears twice\)", id="config-repeated-key"),
    pytest.param(_swap_for_directory(CONFIG_NAME), C + r"is a directory, not a file",
                 id="config-directory"),
    pytest.param(_remove(CONFIG_NAME), C + r"no such file", id="config-missing"),
    pytest.param(_replace(CONFIG_NAME, lambda raw: b"[" * 100_000 + b"]" * 100_000),
                 C + r"not valid JSON \(nested too deeply\)", id="config-nested-deeply"),
    pytest.param(_config(lambda d: d["layers"].update({"": d["layers"].pop("fc")})),
                 C + r"layer name '' must be a dotted module name", id="config-layer-name-empty"),
    pytest.param(_config(lambda d: d["layers"].update({"fc.": d["layers"].pop("fc")})),
                 C + r"layer name 'fc\.' must be", id="config-layer-name-trailing-dot"),
    pytest.param(_replace(CONFIG_NAME, lambda raw: b"[" + raw + b"]"),
                 C + r'not a flora adapter config \(no "format": "flora"\)', id="config-list"),
    pytest.param(_config(lambda d: d.update(format="peft")), C + r"not a flora adapter config",
                 id="config-other-format"),
    pytest.param(_config(lambda d: d.update(format_version=3)),
                 C + r"unsupported format_version 3; this flora reads 1 and 2",
                 id="config-version-3"),
    pytest.param(_config(lambda d: d.update(format_version="2")),
                 C + r"unsupported format_version '2'", id="config-version-string"),
    pytest.param(_config(lambda d: d.update(format_version=True)),
                 C + r"unsupported format_version True", id="config-version-bool"),
    pytest.param(_config(lambda d: d.pop("layers")),
                 C + r"the config must have keys .*missing \['layers'\]",
                 id="config-missing-layers"),
    pytest.param(_config(lambda d: d.pop("adapter_name")),
                 C + r"the config must have keys .*missing \['adapter_name'\]",
                 id="config-missing-name"),
    pytest.param(_config(lambda d: d.update(notes="x")),
                 C + r"the config must have keys .*; missing \[\], unknown \['notes'\]",
                 id="config-unknown-key"),
    pytest.param(_config(lambda d: d.update(layers={})),
                 C + r"layers must be a non-empty JSON object", id="config-no-layers"),
    pytest.param(_config(lambda d: d.update(adapter_name=3)),
                 C + r"adapter_name must be a str, got int", id="config-name-int"),
    pytest.param(_config(lambda d: d.update(adapter_name="a.b")),
                 C + r"adapter_name must be a non-empty string without '\.'",
                 id="config-name-dotted"),
    pytest.param(_config(lambda d: d["config"].update(scale="x")),
                 C + r"config: scale must be a real number, got 'x'", id="config-field-wrong-type"),
    pytest.param(_config(lambda d: d["config"].update(rnks=2)),
                 C + r"config: config has unknown fields \['rnks'\]", id="config-field-unknown"),
    pytest.param(_config(lambda d: d.update(config=[])),
                 C + r"config: config must be a JSON object, got list", id="config-field-list"),
    pytest.param(_config(lambda d: d.update(modules_to_save="norm")),
                 C + r"modules_to_save must be a list of module names", id="config-saved-string"),
    pytest.param(_config(lambda d: d.update(modules_to_save=["norm", "norm"])),
                 C + r"modules_to_save lists a module twice", id="config-saved-twice"),
    # one layer record
    pytest.param(_layer(ranks=[-1, 2]), C + r"layer 'fc': ranks\[0\] must be a positive int",
                 id="layer-negative-rank"),
    pytest.param(_layer(ranks=[3, 2]), C + r"layer 'fc': ranks \(3, 2\) do not fit shape \(4, 6\)",
                 id="layer-unusable-ranks"),
    pytest.param(_layer(ranks=[2.0, 2]), C + r"layer 'fc': ranks\[0\] must be an int, got 2\.0",
                 id="layer-float-rank"),
    pytest.param(_layer(shape=[4, "6"]), C + r"layer 'fc': shape entries must be an int",
                 id="layer-string-size"),
    pytest.param(_layer(kind="Dense"), C + r"layer 'fc': kind must be one of", id="layer-kind"),
    pytest.param(_layer(bias=True), W + r"adapter tensors do not match the config: missing "
                 r"\['fc\.bias'\]", id="layer-bias-without-tensor"),
    pytest.param(_layer(extra=1), C + r"layer 'fc': a layer record must have keys",
                 id="layer-unknown-key"),
    pytest.param(_config(lambda d: d["layers"]["fc"].pop("scale")),
                 C + r"layer 'fc': a layer record must have keys", id="layer-missing-key"),
    pytest.param(_layer(shape=[4, 5]),
                 W + r"tensor 'fc\.factors\.1' must be a floating tensor of shape \(5, 2\)",
                 id="layer-shape-disagrees-with-tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "match"), FILES)
def test_corrupt_adapter_file_is_one_error_naming_it(saved, tmp_path, build, match) -> None:
    directory = build(Path(shutil.copytree(saved, tmp_path / "adapter")))
    model = Net()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=match) as info:
        flora.load_adapter(model, directory)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(str(directory)), info.value
    assert len(str(info.value).splitlines()) == 1
    _assert_unchanged(model, before)


def test_the_reader_alone_reports_the_same_errors(saved, tmp_path) -> None:
    directory = _replace(WEIGHTS_NAME, lambda raw: b"")(shutil.copytree(saved, tmp_path / "a"))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: not a safetensors"):
        flora.read_adapter(directory)


def test_a_directory_path_that_is_a_file_is_named(saved) -> None:
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: not a directory"):
        flora.read_adapter(saved / CONFIG_NAME)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        pytest.param(
            ("flora.io.save_file", SafetensorError("File too large (os error 27)")),
            r"cannot write \(File too large .*adapter_model\.safetensors'$",
            id="file-too-large",
        ),
        pytest.param(
            ("pathlib.Path.write_text", OSError(errno.ENOSPC, "No space left on device")),
            r"cannot write \(No space left on device\): .*adapter_config\.json'$",
            id="disk-full",
        ),
    ],
)
def test_a_failed_save_names_the_file_and_keeps_the_previous_adapter(
    model, saved, tmp_path, monkeypatch, patch, match
) -> None:
    target = Path(shutil.copytree(saved, tmp_path / "adapter"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    name, error = patch

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(name, fail)
    with pytest.raises(OSError, match=match) as info:
        flora.save_adapter(model, target, adapter_name="b")
    assert info.value.filename.startswith(str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# Meta tensors: a shape without values.
def test_meta_model_hosvd_init_is_refused_and_zero_core_builds_the_structure() -> None:
    meta = Net(device="meta")
    types = {n: type(m) for n, m in meta.named_modules()}
    with pytest.raises(ValueError, match=r"layer 'fc': init='hosvd' .* meta tensor: meta tensors"):
        flora.inject(meta, flora.FLoRAConfig(ranks=2, init="hosvd", target_modules=["fc"]))
    assert {n: type(m) for n, m in meta.named_modules()} == types
    # zero_core needs no values: the structure is built, the values come with the weights.
    flora.inject(meta, flora.FLoRAConfig(ranks=2, target_modules=["fc"]))
    assert meta.fc.core.is_meta
    with pytest.raises(ValueError, match=r"meta tensor \(a shape without values\)"):
        flora.merge(meta)
    with pytest.raises(ValueError, match=r"layer 'fc': the weight is a meta tensor"):
        flora.unload(meta, merge=True)
    assert not meta.fc.merged
    real = Net()
    flora.inject(real, flora.FLoRAConfig(ranks=2, target_modules=["fc"]))
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    x = torch.randn(3, 6)
    assert torch.equal(meta.eval()(x), real.eval()(x))


def test_loading_an_adapter_into_a_meta_model_is_refused(saved) -> None:
    meta = Net(device="meta")
    with pytest.raises(ValueError, match=r"layer 'fc': the model's weight is a meta tensor"):
        flora.load_adapter(meta, saved)
    assert not flora.adapted_layers(meta)


# flora.extract and flora extract
@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """Checkpoints of every kind, and an old adapter, in the working directory."""
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    tuned = {k: v + 0.1 * torch.randn(v.shape) if v.is_floating_point() else v
             for k, v in base.items()}  # fmt: skip
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    weight = base["fc.weight"]
    save_file({"blk.proj": weight, "blk.proj.weight": weight.clone()},
              tmp_path / "twice-base.safetensors")  # fmt: skip
    save_file({"blk.proj": 2 * weight, "blk.proj.weight": 3 * weight},
              tmp_path / "twice-tuned.safetensors")  # fmt: skip
    torch.save({"fc.weight": torch.ones(4, 6, device="meta")}, tmp_path / "meta.pt")
    torch.save({"fc.weight": torch.ones(4, 6).to_sparse()}, tmp_path / "sparse.pt")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    assert (
        main(["extract", "base.safetensors", "tuned.safetensors", "--out", "old", "--quiet"]) == 0
    )
    return tmp_path


def _files(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


BT = ["base.safetensors", "tuned.safetensors"]

EXTRACT = [
    pytest.param(dict(rank={"budget_like_lora": True}), TypeError,
                 r"budget_like_lora must be an int >= 1, got True", id="budget-bool"),
    pytest.param(dict(rank={"budget_like_lora": 0}), ValueError,
                 r"budget_like_lora must be >= 1, got 0",
                 id="budget-zero"),
    pytest.param(dict(rank={"energy": "0.9"}), TypeError,
                 r"energy must be a number in \(0, 1\], got '0\.9'",
                 id="energy-string"),
    pytest.param(dict(rank={"energy": 1.5}), ValueError, r"energy must lie in \(0, 1\], got 1\.5",
                 id="energy-above-one"),
    pytest.param(dict(rank={"energy": NAN}), ValueError, r"energy must lie in \(0, 1\], got nan",
                 id="energy-nan"),
    pytest.param(dict(rank={"ranks": "2"}), TypeError,
                 r"ranks must be an int or a sequence of ints", id="ranks-string"),
    pytest.param(dict(rank={"ranks": 0}), ValueError, r"ranks must be >= 1, got 0",
                 id="ranks-zero"),
    pytest.param(dict(rank="2"), TypeError, r"rank must be an int or a sequence of ints",
                 id="rank-string"),
    pytest.param(dict(rank=0), ValueError, r"rank must be >= 1, got 0", id="rank-zero"),
    pytest.param(dict(rank={"energie": 0.9}), ValueError,
                 r"rank's keys must be among \['ranks', 'energy', 'budget_like_lora', "
                 r"'fixed_kernel_rank'\], got \['energie'\]", id="rank-unknown-key"),
    pytest.param(dict(rank=2, energy=0.9), flora.ExtractionError,
                 r"give the rank rule once, as rank=\.\.\.; got rank=2 and \['energy'\]",
                 id="rank-and-deprecated-keyword"),
    pytest.param(dict(rank=2, rnak=2), TypeError,
                 r"extract\(\) got unexpected keyword arguments \['rnak'\]",
                 id="unknown-keyword"),
    pytest.param(dict(rank={"ranks": 2, "energy": 0.9}), flora.ExtractionError,
                 r"give at most one of \['ranks', 'energy', 'budget_like_lora'\]",
                 id="two-rules"),
    pytest.param(dict(rank={"ranks": (2, 2), "fixed_kernel_rank": 1}), flora.ExtractionError,
                 r"fixed_kernel_rank=1 conflicts with per-mode ranks \(2, 2\)",
                 id="kernel-rank-with-per-mode-ranks"),
    pytest.param(dict(rank={"fixed_kernel_rank": 1.0}), TypeError,
                 r"fixed_kernel_rank must be an int",
                 id="kernel-rank-float"),
    pytest.param(dict(rank=(2, 2)), flora.ExtractionError,
                 r"ranks \(2, 2\) give 2 modes but tensor 'conv\.weight' has 3",
                 id="per-mode-ranks-of-another-length"),
    pytest.param(dict(include="("), ValueError,
                 r"include is not a valid regular expression '\('", id="include-bad-regex"),
    pytest.param(dict(exclude=3), TypeError, r"exclude must be a regular expression",
                 id="exclude-int"),
    pytest.param(dict(progress=42), TypeError, r"progress must be a callable", id="progress-int"),
    pytest.param(dict(refine="no"), TypeError, r"refine must be True or False", id="refine-string"),
    pytest.param(dict(carry_1d=1), TypeError, r"carry_1d must be True or False", id="carry-int"),
    pytest.param(dict(as_parameters=None), TypeError, r"as_parameters must be True or False",
                 id="as-parameters-none"),
    pytest.param(dict(directory="base.safetensors"), flora.ExtractionError,
                 r"base\.safetensors exists and is not a directory", id="out-is-a-file"),
    pytest.param(dict(directory="figures"), flora.ExtractionError,
                 r"figures holds other files \['notes\.txt'\]", id="out-holds-other-files"),
    pytest.param(dict(directory=None), TypeError, r"directory must be a str or os\.PathLike",
                 id="out-none"),
    pytest.param(dict(base=None), TypeError, r"base must be a path or a Checkpoint, got NoneType",
                 id="base-none"),
    pytest.param(dict(tuned="absent.safetensors"), CheckpointError,
                 r"absent\.safetensors: no such file or directory", id="tuned-missing"),
    pytest.param(dict(tuned="base.safetensors"), flora.ExtractionError,
                 r"nothing to extract: no changed tensor", id="nothing-changed"),
    pytest.param(dict(base="twice-base.safetensors", tuned="twice-tuned.safetensors"),
                 flora.ExtractionError,
                 r"tensors 'blk\.proj' and 'blk\.proj\.weight' would both be adapter layer "
                 r"'blk\.proj'", id="two-tensors-one-layer"),
    pytest.param(dict(base="meta.pt"), CheckpointError,
                 r"meta\.pt: tensor 'fc\.weight' is a meta tensor", id="meta-checkpoint"),
    pytest.param(dict(base="sparse.pt"), CheckpointError,
                 r"sparse\.pt: tensor 'fc\.weight' is a sparse tensor", id="sparse-checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize(("arguments", "error", "match"), EXTRACT)
def test_bad_extract_input_is_refused_before_anything_is_written(
    workdir, arguments, error, match
) -> None:
    before = _files(workdir)
    paths = {"base": "base.safetensors", "tuned": "tuned.safetensors", "directory": "old"}
    options = {k: v for k, v in arguments.items() if k not in paths}
    paths |= {k: v for k, v in arguments.items() if k in paths}
    with pytest.raises(error, match=match):
        flora.extract(paths["base"], paths["tuned"], paths["directory"], **options)
    assert _files(workdir) == before


def test_extract_applies_the_kernel_rank_with_every_rule(workdir) -> None:
    for rule in (dict(ranks=3), dict(energy=1.0), dict(budget_like_lora=4)):
        result = flora.extract(*BT, "pinned", rank={**rule, "fixed_kernel_rank": 1}, include="conv")
        (layer,) = result.layers
        assert layer.ranks[2:] == (1,), rule
    assert flora.extract(*BT, "pinned", rank=3, include="conv").layers[0].ranks[2] == 3


def test_extract_pairs_checkpoints_of_other_dtypes_and_skips_other_shapes(tmp_path) -> None:
    torch.manual_seed(0)
    weight, head = torch.randn(6, 5), torch.randn(3, 4)
    save_file({"fc.weight": weight, "head.weight": head}, tmp_path / "base.safetensors")
    tuned = {"fc.weight": (2 * weight).bfloat16(), "head.weight": torch.randn(3, 5)}
    save_file(tuned, tmp_path / "tuned.safetensors")
    result = flora.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                           tmp_path / "adapter", rank=10)  # fmt: skip
    assert [layer.name for layer in result.layers] == ["fc"]
    assert result.layers[0].relative_error < 1e-5
    assert result.skipped == [("head.weight", "shape differs (base 3x4, tuned 3x5)")]


CLI = [
    pytest.param(["--out", "base.safetensors"],
                 r"base\.safetensors exists and is not a directory", id="out-is-an-input-file"),
    pytest.param(["--out", "figures"], r"figures holds other files", id="out-holds-other-files"),
    pytest.param(["--out", "base.safetensors/adapter"],
                 r"base\.safetensors/adapter: cannot write there: base\.safetensors is not a "
                 r"directory", id="out-under-a-file"),
    pytest.param(["--out", "x", "--ranks", "2,2"],
                 r"ranks \(2, 2\) give 2 modes but tensor 'conv\.weight' has 3",
                 id="per-mode-ranks-of-another-length"),
    pytest.param(["--out", "x", "--ranks", "2,2", "--fixed-kernel-rank", "1"],
                 r"conflicts with per-mode ranks", id="kernel-rank-with-per-mode-ranks"),
    pytest.param(["--out", "x", "--ranks", "2", "--energy", "0.9"],
                 r"argument --energy: not allowed with argument --ranks", id="two-rules"),
    pytest.param(["--out", "x", "--energy", "0"], r"energy 0 is outside \(0, 1\]",
                 id="energy-zero"),
    pytest.param(["--out", "x", "--budget-like-lora", "0"],
                 r"--budget-like-lora: expected an integer >= 1, got 0", id="budget-zero"),
    pytest.param(["--out", "x", "--include", "("],
                 r"argument --include: invalid regular expression", id="include-bad-regex"),
    pytest.param(["--out", "x", "--carry-1d=yes"],
                 r"argument --carry-1d: ignored explicit argument 'yes'", id="flag-with-value"),
    pytest.param(["--quiet"], r"the following arguments are required: --out", id="no-out"),
]  # fmt: skip

CLI_INPUTS = [
    pytest.param(["absent.safetensors", "tuned.safetensors", "--out", "x"],
                 r"absent\.safetensors: no such file or directory", id="missing-checkpoint"),
    pytest.param(["meta.pt", "tuned.safetensors", "--out", "x"],
                 r"meta\.pt: tensor 'fc\.weight' is a meta tensor: it has a shape but holds no "
                 r"values", id="meta-tensors"),
    pytest.param(["sparse.pt", "tuned.safetensors", "--out", "x"],
                 r"sparse\.pt: tensor 'fc\.weight' is a sparse tensor", id="sparse-tensors"),
    pytest.param(["base.safetensors", "base.safetensors", "--out", "x"],
                 r"nothing to extract", id="nothing-to-extract"),
    pytest.param(["twice-base.safetensors", "twice-tuned.safetensors", "--out", "x"],
                 r"tensors 'blk\.proj' and 'blk\.proj\.weight' would both be adapter layer",
                 id="two-tensors-one-layer"),
    pytest.param(["figures", "tuned.safetensors", "--out", "x"], r"figures: no checkpoint here",
                 id="directory-without-checkpoint"),
]  # fmt: skip


def _exit_status(args: list[str]) -> int:
    try:
        return main(["extract", "--quiet", *args])
    except SystemExit as exit_info:  # argparse's own usage errors
        return int(exit_info.code)


@pytest.mark.parametrize(("args", "match"), [*[p for p in CLI], *CLI_INPUTS])
def test_bad_command_line_exits_2_with_one_line_and_writes_nothing(
    workdir, capsys, args, match
) -> None:
    if args[0].startswith("-"):
        args = [*BT, *args]
    before = _files(workdir)
    assert _exit_status(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("flora"), err
    assert re.search(match, err), err
    assert _files(workdir) == before


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        pytest.param(
            ("flora.io.save_file", SafetensorError("File too large (os error 27)")),
            r"^flora extract: error: old/adapter_model\.safetensors: cannot write \(File too large",
            id="file-too-large",
        ),
        pytest.param(
            ("pathlib.Path.write_text", OSError(errno.ENOSPC, "No space left on device")),
            r"^flora extract: error: old/adapter_config\.json: cannot write \(No space left on",
            id="disk-full",
        ),
        pytest.param(
            ("flora._atomic.exchange", OSError(errno.EXDEV, "Invalid cross-device link")),
            r"^flora extract: error: old: cannot write \(Invalid cross-device link\)",
            id="exchange-fails",
        ),
        pytest.param(
            ("flora._atomic._rename", OSError(errno.EXDEV, "Invalid cross-device link")),
            r"^flora extract: error: old: cannot write \(Invalid cross-device link\)",
            id="rename-fails-without-exchange",
        ),
    ],
)
def test_write_failures_exit_2_naming_the_file_and_keep_the_old_adapter(
    workdir, capsys, monkeypatch, patch, match
) -> None:
    name, error = patch

    def fail(*args, **kwargs):
        raise error

    before = _files(workdir)
    if name == "flora._atomic._rename":
        monkeypatch.setattr("flora._atomic.exchange", lambda a, b: False)
    monkeypatch.setattr(name, fail)
    assert _exit_status([*BT, "--out", "old", "--ranks", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert _files(workdir) == before


def test_a_bug_inside_extract_keeps_its_traceback(workdir, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("a bug, not an input error")

    monkeypatch.setattr("flora.extraction.sthosvd", broken)
    with pytest.raises(ValueError, match="a bug, not an input error"):
        main(["extract", *BT, "--out", "new", "--quiet"])


# Non-finite and absurd values at the export, import and compression boundaries: each
# row builds its input under ``tmp/in`` and must raise before ``tmp/out`` exists.
def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    flora.inject(model, flora.FLoRAConfig(ranks=2, init="gaussian", target_modules=["0", "1"]))
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            layer.core.normal_()
    return model


def _with_nan_core(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model[1].core[0, 0] = NAN
    return model


def _flora_dir_with_nan(tmp: Path) -> Path:
    directory = flora.save_adapter(_linear_model(), tmp / "in")
    tensors = flora.read_adapter(directory).tensors
    tensors["1.core"][0, 0] = NAN
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


def _peft_dir(tmp: Path, tensors=None, config=None) -> Path:
    directory = flora.export_lora(_linear_model(), tmp / "in")
    path = directory / WEIGHTS_NAME
    state = flora._files.read_tensors(path)[0]
    (tensors or (lambda t: None))(state)
    save_file(state, str(path), metadata={"format": "pt"})
    document = json.loads((directory / CONFIG_NAME).read_text())
    document.update(config or {})
    (directory / CONFIG_NAME).write_text(json.dumps(document))
    return directory


def _set(key: str, value: float) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        name = next(k for k in state if k.endswith(key))
        state[name][0, 0] = value

    return change


def _import(tmp: Path, **changes: object) -> nn.Module:
    directory = _peft_dir(tmp, **changes)
    torch.manual_seed(0)
    return flora.import_lora(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)), directory)


def _meta_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 4, device="meta"))
    return flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]))


BOUNDARIES = [
    pytest.param(lambda t: flora.export_lora(_flora_dir_with_nan(t), t / "out"),
                 flora.LoraConversionError, r"in: \['1'\] hold NaN or infinite values",
                 id="export-directory-nan-core"),
    pytest.param(lambda t: flora.export_lora(_with_nan_core(_linear_model()), t / "out"),
                 flora.LoraConversionError, r"the model: \['1'\] hold NaN or infinite values",
                 id="export-model-nan-core"),
    pytest.param(lambda t: flora.export_lora(_meta_model(), t / "out"),
                 flora.LoraConversionError,
                 r"the model: adapter tensors \['0\.core', .*\] are meta tensors",
                 id="export-meta-model"),
    pytest.param(lambda t: _import(t, tensors=_set("lora_A.weight", NAN)),
                 flora.LoraConversionError,
                 r"no exact FLoRA form for .*lora_A, lora_B or the bias holds NaN or infinite",
                 id="import-nan-lora-a"),
    pytest.param(lambda t: _import(t, tensors=_set("lora_B.weight", math.inf)),
                 flora.LoraConversionError, r"lora_A, lora_B or the bias holds NaN or infinite",
                 id="import-inf-lora-b"),
    pytest.param(lambda t: _import(t, config={"lora_alpha": 1e308}), flora.LoraConversionError,
                 r"scaling .* \(lora_alpha / r\) times lora_B @ lora_A can reach .* beyond "
                 r"float32's range", id="import-alpha-1e308"),
    pytest.param(lambda t: _import(t, config={"alpha_pattern": {"1": 1e308}}),
                 flora.LoraConversionError, r"no exact FLoRA form for layer '1' \(scaling 5e\+307",
                 id="import-alpha-pattern-1e308"),
    pytest.param(lambda t: flora.compress(_with_nan_core(_linear_model()), ranks=1), ValueError,
                 r"layer '1': adapter 'default' holds NaN or infinite values",
                 id="compress-nan-core"),
    pytest.param(lambda t: flora.compress(_with_nan_core(_linear_model()), energy=0.9),
                 ValueError, r"layer '1': adapter 'default' holds NaN", id="compress-nan-energy"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), BOUNDARIES)
def test_non_finite_values_are_refused_at_every_boundary(tmp_path, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("changed", ["in place", "load_state_dict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unmerge_after_the_adapter_changed_restores_the_base(changed, dtype) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6)).to(dtype)
        config = flora.FLoRAConfig(ranks=2, init="gaussian", bias=True, target_modules=["0"])
        flora.inject(model, config)
        with torch.no_grad():
            model[0].core.normal_()
            model[0].adapters["default"].bias.normal_()
        return model

    model, reference = build(), build()
    base = model[0].base_layer
    weight, bias = base.weight.clone(), base.bias.clone()
    flora.unmerge(flora.merge(reference))
    flora.merge(model)
    if changed == "in place":
        with torch.no_grad():
            model[0].core.add_(1.0)
            model[0].adapters["default"].bias.add_(1.0)
    else:
        state = {k: v + 1 if k.endswith(("core", ".bias")) and "adapters" in k else v
                 for k, v in model.state_dict().items()}  # fmt: skip
        model.load_state_dict(state)
    flora.unmerge(model)
    # Bitwise what unmerging the unchanged adapter gives; the base to the dtype's rounding.
    assert torch.equal(base.weight, reference[0].base_layer.weight)
    assert torch.equal(base.bias, reference[0].base_layer.bias)
    tolerance = 0 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    assert torch.allclose(base.weight.float(), weight.float(), atol=tolerance + 1e-6)
    assert torch.allclose(base.bias.float(), bias.float(), atol=tolerance + 1e-6)


# Outputs that are, or hold, an input: refused before anything is written.
@pytest.fixture
def links(workdir: Path) -> Path:
    """Adapter-named links to the checkpoints inside directories an output could be."""
    (workdir / "hard").mkdir()
    os.link(workdir / "tuned.safetensors", workdir / "hard" / WEIGHTS_NAME)
    (workdir / "soft").mkdir()
    os.symlink(workdir / "base.safetensors", workdir / "soft" / WEIGHTS_NAME)
    os.symlink(workdir / "old" / WEIGHTS_NAME, workdir / "into-old.safetensors")
    return workdir


INPUTS = [
    pytest.param(["base.safetensors", "old/adapter_model.safetensors", "--out", "old"],
                 r"old holds the tuned checkpoint old/adapter_model\.safetensors",
                 id="tuned-inside-out"),
    pytest.param(["old/adapter_model.safetensors", "tuned.safetensors", "--out", "old"],
                 r"old holds the base checkpoint old/adapter_model\.safetensors",
                 id="base-inside-out"),
    pytest.param(["base.safetensors", "./old/../old/adapter_model.safetensors", "--out", "old/"],
                 r"holds the tuned checkpoint", id="tuned-inside-out-unnormalized"),
    pytest.param(["base.safetensors", "tuned.safetensors", "--out", "hard"],
                 r"hard holds the tuned checkpoint tuned\.safetensors", id="hard-link-in-out"),
    pytest.param(["base.safetensors", "tuned.safetensors", "--out", "soft"],
                 r"soft holds the base checkpoint base\.safetensors", id="symlink-in-out"),
    pytest.param(["base.safetensors", "into-old.safetensors", "--out", "old"],
                 r"old holds the tuned checkpoint into-old\.safetensors",
                 id="input-symlink-into-out"),
    pytest.param(["base.safetensors", "tuned.safetensors", "--out", "."],
                 r"is the current directory", id="out-is-the-current-directory"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "match"), INPUTS)
def test_an_output_holding_an_input_exits_2_and_changes_nothing(links, capsys, args, match) -> None:
    before = _files(links)
    assert _exit_status(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert _files(links) == before


def test_extract_from_python_refuses_an_output_holding_an_input(links) -> None:
    before = _files(links)
    with pytest.raises(flora.ExtractionError, match=r"old holds the tuned checkpoint"):
        flora.extract("base.safetensors", Path("old") / WEIGHTS_NAME, "old")
    assert _files(links) == before


# flora export-lora
@pytest.fixture
def exported(tmp_path: Path, monkeypatch) -> Path:
    """A flora adapter ``fl``, a NaN one ``nan``, a previous export ``lora``; in the cwd."""
    monkeypatch.chdir(tmp_path)
    flora.save_adapter(_linear_model(), tmp_path / "fl")
    _flora_dir_with_nan(tmp_path).rename(tmp_path / "nan")
    flora.export_lora(tmp_path / "fl", tmp_path / "lora")
    os.symlink("fl", tmp_path / "fl-link")
    return tmp_path


EXPORT_CLI = [
    pytest.param(["fl", "fl"], r"fl is the source adapter", id="out-is-the-source"),
    pytest.param(["fl", "fl-link"], r"fl-link is the source adapter", id="out-links-to-source"),
    pytest.param(["fl-link", "fl"], r"fl is the source adapter", id="source-links-to-out"),
    pytest.param(["nan", "out"], r"nan: \['1'\] hold NaN or infinite values", id="nan-core"),
    pytest.param(["fl", "."], r"^flora export-lora: error: .* is the current directory",
                 id="out-is-the-current-directory"),
    pytest.param(["fl", "lora/.."], r"is the current directory \(or its parent\)",
                 id="out-is-the-parent"),
    pytest.param(["fl", "fl/sub/.."], r"fl/sub/\.\. is the source adapter",
                 id="out-is-the-source-unnormalized"),
]  # fmt: skip


def _export_status(args: list[str]) -> int:
    try:
        return main(["export-lora", *args])
    except SystemExit as exit_info:
        return int(exit_info.code)


@pytest.mark.parametrize(("args", "match"), EXPORT_CLI)
def test_bad_export_exits_2_with_one_line_and_writes_nothing(exported, capsys, args, match) -> None:
    before = _files(exported)
    assert _export_status(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("flora export-lora: error: "), err
    assert re.search(match, err), err
    assert _files(exported) == before


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(SafetensorError("No space left on device (os error 28)"), id="safetensors"),
        pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="oserror"),
    ],
)
def test_export_on_a_full_disk_exits_2_naming_the_file(exported, capsys, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    before = _files(exported)
    monkeypatch.setattr("flora.lora.save_file", fail)
    with pytest.raises(OSError, match=r"No space left on device") as info:
        flora.export_lora("fl", "lora")
    assert info.value.filename == str(Path("lora") / WEIGHTS_NAME)
    assert _export_status(["fl", "lora"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(r"^flora export-lora: error: lora/adapter_model\.safetensors: ", err), err
    assert "No space left on device" in err
    assert _files(exported) == before
