"""One regression test per bug found while using flora the way PEFT users do."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flora
import flora.io


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
        and all(_bits(a["state"][k]) == _bits(b["state"][k]) for k in a["state"])
    )


def _bits(tensor: torch.Tensor) -> bytes:
    # Bitwise, NaN included (torch.equal says NaN != NaN).
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().tobytes()


def _two_linears() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


# Bug 1: inject and load_adapter attached layers one by one.


def test_bug1_hosvd_inject_failing_on_the_last_layer_changes_nothing() -> None:
    model = _two_linears()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '1'.*NaN"):
        flora.inject(model, flora.FLoRAConfig(init="hosvd", ranks=2, target_modules="all-linear"))
    assert _same(_snapshot(model), before)


def test_bug1_integer_target_parameter_changes_nothing() -> None:
    model = _two_linears()
    model[1].steps = nn.Parameter(torch.arange(6).reshape(2, 3), requires_grad=False)
    before = _snapshot(model)
    config = flora.FLoRAConfig(target_parameters=["0.weight", "1.steps"], init="hosvd")
    with pytest.raises(ValueError, match=r"'1\.steps'.*floating-point"):
        flora.inject(model, config)
    assert _same(_snapshot(model), before)


def test_bug1_load_failing_on_the_last_layer_changes_nothing(tmp_path: Path) -> None:
    adapted = flora.inject(
        _two_linears(), flora.FLoRAConfig(ranks=2, init="hosvd", target_modules="all-linear")
    )
    flora.save_adapter(adapted, tmp_path)
    tensors = load_file(str(tmp_path / flora.io.WEIGHTS_NAME))
    tensors["1.core"][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / flora.io.WEIGHTS_NAME))
    for model in (
        _two_linears(),
        flora.inject(_two_linears(), flora.FLoRAConfig(ranks=1, target_modules="all-linear")),
    ):
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"1\.core.*NaN or infinite"):
            flora.load_adapter(model, tmp_path, adapter_name="other")
        assert _same(_snapshot(model), before)


def test_bug1_merge_and_combine_failing_on_the_last_layer_change_nothing() -> None:
    model = flora.inject(_two_linears(), flora.FLoRAConfig(ranks=2, target_modules="all-linear"))
    with torch.no_grad():
        model[0].core.fill_(0.5)
        model[1].core.fill_(float("nan"))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="layer '1'"):
        flora.merge(model)
    with pytest.raises(ValueError, match="weights"):
        flora.add_weighted_adapter(model, ["default"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match=r"no adapter \['missing'\]"):
        flora.delete_adapter(model, "missing")
    assert _same(_snapshot(model), before)
    assert not model[0].merged


# Bug 2: the config was written before the weights.


def _trained(ranks: int, seed: int) -> nn.Sequential:
    model = flora.inject(
        _two_linears(), flora.FLoRAConfig(ranks=ranks, target_modules="all-linear")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            layer.core.copy_(torch.randn(layer.core.shape, generator=generator))
    return model


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_bug2_a_failed_weights_write_leaves_the_old_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "adapter"
    old = _trained(2, 0)
    flora.save_adapter(old, target)
    saved = _files(target)

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flora.io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        flora.save_adapter(_trained(3, 1), target)
    with pytest.raises(OSError, match="No space"):
        flora.save_adapter(_trained(3, 1), tmp_path / "new")
    monkeypatch.undo()
    assert _files(target) == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left
    x = torch.randn(3, 8)
    assert torch.equal(flora.load_adapter(_two_linears(), target)(x), old(x))
    flora.save_adapter(_trained(3, 1), target)  # a successful save replaces it whole
    assert json.loads((target / flora.io.CONFIG_NAME).read_text())["layers"]["0"]["ranks"] == [3, 3]


def test_bug2_refuses_to_replace_a_directory_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        flora.save_adapter(_trained(2, 0), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_bug2_file_size_limit_in_a_subprocess(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import torch
        import flora
        target = sys.argv[1]
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        flora.inject(model, flora.FLoRAConfig(ranks=1, target_modules=["0"]))
        flora.save_adapter(model, target)
        flora.delete_adapter(model, "default")
        flora.inject(model, flora.FLoRAConfig(ranks=32, target_modules=["0"]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            flora.save_adapter(model, target)
        except OSError as exc:  # one error naming the file, whatever safetensors raised
            print("refused:", exc.filename, exc.strerror)
        """
    )
    target = tmp_path / "adapter"
    result = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("refused:"), result.stderr
    assert f"{target / flora.io.WEIGHTS_NAME} cannot write (" in result.stdout
    document = json.loads((target / flora.io.CONFIG_NAME).read_text())
    assert document["layers"]["0"]["ranks"] == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    flora.load_adapter(nn.Sequential(nn.Linear(64, 64)), target)


# Bug 3: tied weights took both updates.


def test_bug3_tied_weights_are_refused_naming_both_modules() -> None:
    model = _two_linears()
    model[1].weight = model[0].weight
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'0' is shared with '1\.weight'"):
        flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules="all-linear"))
    embed = nn.Embedding(8, 8)
    model[1].weight = embed.weight
    model.embed = embed
    with pytest.raises(ValueError, match=r"'1' is shared with 'embed\.weight'.*tied"):
        flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["1"]))
    assert type(model[1]) is nn.Linear
    assert before["types"]["0"] is type(model[0])


# Bug 4: a non-finite adapter destroyed the base weights on merge.


def test_bug4_safe_merge_refuses_a_non_finite_update() -> None:
    model = flora.inject(_two_linears(), flora.FLoRAConfig(ranks=2, target_modules=["1"]))
    with torch.no_grad():
        model[1].core.fill_(float("inf"))
    weight = model[1].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or infinite"):
        flora.merge(model)
    assert torch.equal(model[1].base_layer.weight, weight)
    assert not model[1].merged
    with pytest.raises(ValueError, match="NaN or inf"):
        flora.unload(model)
    flora.merge(model, safe=False)
    assert not torch.isfinite(model[1].base_layer.weight).all()


# Bug 5: ranks were clipped to mode sizes, not to what a Tucker tensor can use.


def test_bug5_usable_ranks_in_layers_config_and_extract(tmp_path: Path) -> None:
    layer = flora.Linear(nn.Linear(256, 2), ranks=8)
    assert layer.ranks == (2, 2)
    assert layer.n_adapter_params == 520
    depthwise = flora.Conv2d(nn.Conv2d(32, 32, 3, groups=32))
    # (16, 16, 2, 2) -> sizes (16, 1, 2, 2) -> R_0 <= 1 * 2 * 2
    assert depthwise.ranks == (4, 1, 2, 2)
    model = flora.inject(
        nn.Sequential(nn.Linear(256, 2)), flora.FLoRAConfig(ranks=8, target_modules="all-linear")
    )
    flora.save_adapter(model, tmp_path / "saved")
    document = json.loads((tmp_path / "saved" / flora.io.CONFIG_NAME).read_text())
    assert document["layers"]["0"]["ranks"] == [2, 2]

    torch.manual_seed(0)
    base = {"fc.weight": torch.randn(16, 72)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(
        {"fc.weight": base["fc.weight"] + torch.randn(16, 72)}, tmp_path / "tuned.safetensors"
    )
    result = flora.extract(
        tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x", rank=100_000
    )
    (extracted,) = result.layers
    assert extracted.ranks == (16, 16)
    assert extracted.n_params == 16 * 16 + 16 * 16 + 72 * 16  # not 16*72 + 16*16 + 72*72
    assert extracted.relative_error < 1e-5


# Bug 6: rank_pattern keys were full-name regexes, silently ignored when unmatched.


def test_bug6_rank_pattern_suffixes_and_unmatched_keys() -> None:
    def block() -> nn.Module:
        module = nn.Module()
        module.block = nn.Module()
        module.block.query = nn.Linear(16, 16)
        module.block.key = nn.Linear(16, 16)
        return module

    model = flora.inject(
        block(), flora.FLoRAConfig(ranks=2, rank_pattern={"query": 4}, target_modules="all-linear")
    )
    assert model.block.query.ranks == (4, 4)
    assert model.block.key.ranks == (2, 2)
    fresh = block()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="rank_pattern key 'value' matches no adapted layer"):
        flora.inject(
            fresh, flora.FLoRAConfig(rank_pattern={"value": 4}, target_modules="all-linear")
        )
    assert _same(_snapshot(fresh), before)


# Bug 7: the padding row changed with init="hosvd".


@pytest.mark.parametrize("forward", ["dense", "factorized"])
def test_bug7_hosvd_embedding_keeps_the_padding_row(forward: str) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(12, 6, padding_idx=3)
    idx = torch.tensor([[3, 1, 3, 7]])
    expected = embedding(idx).detach()
    model = flora.inject(
        nn.Sequential(embedding),
        flora.FLoRAConfig(ranks=2, init="hosvd", forward=forward, target_modules=["0"]),
    )
    out = model(idx)
    assert torch.equal(out[0, [0, 2]], expected[0, [0, 2]])
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        model[0].core.mul_(2.0)
    flora.merge(model)
    assert torch.equal(model(idx)[0, [0, 2]], expected[0, [0, 2]])
    flora.unload(model, merge=False)
    torch.testing.assert_close(model[0].weight, embedding.weight)


# Bug 8: save_adapter recorded the first inject's name and config for everything.


def test_bug8_each_adapter_saves_its_own_name_and_config(tmp_path: Path) -> None:
    model = _two_linears()
    first = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    second = flora.FLoRAConfig(ranks=3, scale=0.5, target_modules=["1"])
    flora.inject(model, first, adapter_name="first")
    flora.inject(model, second, adapter_name="second")
    for name, config, layer in (("first", first, "0"), ("second", second, "1")):
        flora.save_adapter(model, tmp_path / name, adapter_name=name)
        document = json.loads((tmp_path / name / flora.io.CONFIG_NAME).read_text())
        assert document["adapter_name"] == name
        assert flora.FLoRAConfig.from_dict(document["config"]) == config
        assert list(document["layers"]) == [layer]
    with pytest.raises(ValueError, match="already has an adapter 'second'"):
        flora.inject(model, first, adapter_name="second")


# Bug 9: Hugging Face save_pretrained wrote the adapted layout silently.


class _Pretrained(nn.Module):
    """Stands for a Hugging Face model: has ``save_pretrained``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.saved: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def save_pretrained(self, directory: str, state_dict: dict | None = None) -> None:
        self.saved = self.state_dict() if state_dict is None else state_dict


def test_bug9_save_pretrained_refuses_the_adapted_layout(tmp_path) -> None:
    model = flora.inject(_Pretrained(), flora.FLoRAConfig(ranks=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"state_dict=flora\.merged_state_dict\(model\)"):
        model.save_pretrained("unused", state_dict=model.state_dict())
    model.save_pretrained("unused", state_dict=flora.merged_state_dict(model))
    assert set(model.saved) == {"fc.weight", "fc.bias"}
    # Without a state dict: the adapter folder, as PEFT's save_pretrained writes.
    twin = copy.deepcopy(model)
    twin.save_pretrained(tmp_path / "adapter")
    assert flora.read_adapter(tmp_path / "adapter").layers["fc"].shape == (4, 4)
    pickle.loads(pickle.dumps(model))
    flora.unload(model)
    model.save_pretrained("unused")
    assert set(model.saved) == {"fc.weight", "fc.bias"}
