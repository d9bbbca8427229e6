"""``flora extract``: a full fine-tune turned into an adapter that loads and merges to TUNED."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="flora needs torch")

from safetensors.torch import save_file  # noqa: E402

import flora  # noqa: E402
from flora.cli import main  # noqa: E402
from flora.spec import usable_ranks  # noqa: E402
from tuckerlib import energy_ranks  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(12, 5)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    torch.manual_seed(0)
    base = _state(Net())
    gen = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    # A dominant low-rank part, as fine-tunes have, on top of the noise.
    tuned["fc.weight"] += torch.outer(torch.randn(5, generator=gen), torch.randn(12, generator=gen))
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def _merged(base: dict, adapter: Path) -> dict[str, torch.Tensor]:
    model = Net()
    model.load_state_dict(base)
    flora.load_adapter(model, adapter)
    return _state(flora.unload(model, merge=True))


def _relative(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(reference))


@pytest.mark.parametrize("refine", [False, True])
def test_merged_weights_match_tuned_within_the_reported_error(checkpoints, tmp_path, refine):
    base_path, tuned_path, base, tuned = checkpoints
    result = flora.extract(base_path, tuned_path, tmp_path / "adapter", refine=refine)
    assert {layer.name: layer.kind for layer in result.layers} == {
        "embed": "Embedding",
        "conv": "Conv2d",
        "fc": "Linear",
    }
    merged = _merged(base, result.directory)
    for layer in result.layers:
        delta = tuned[layer.tensor] - base[layer.tensor]
        error = _relative(merged[layer.tensor], tuned[layer.tensor], delta)
        assert error == pytest.approx(layer.relative_error, abs=1e-4)
        assert 0.0 < layer.relative_error < 1.0
    assert result.layers[2].relative_error < 0.2  # the planted low-rank part of fc
    # Biases are not part of the adapter: the merged model keeps the base ones.
    assert torch.equal(merged["fc.bias"], base["fc.bias"])
    assert ("fc.bias", "1-D tensor (bias, norm or scalar): no rank structure") in result.skipped


def test_hooi_refinement_never_loses(checkpoints, tmp_path) -> None:
    base_path, tuned_path, _, _ = checkpoints
    plain = flora.extract(base_path, tuned_path, tmp_path / "a", rank=2)
    refined = flora.extract(base_path, tuned_path, tmp_path / "b", rank=2, refine=True)
    for p, r in zip(plain.layers, refined.layers, strict=True):
        assert r.relative_error <= p.relative_error + 1e-6


def test_full_rank_extraction_reproduces_tuned_to_float32_rounding(checkpoints, tmp_path) -> None:
    base_path, tuned_path, base, tuned = checkpoints
    result = flora.extract(base_path, tuned_path, tmp_path / "adapter", rank=10_000)
    for layer in result.layers:
        # Full rank, clipped to what a Tucker tensor can use: (20, 6) -> (6, 6).
        assert layer.ranks == usable_ranks(layer.shape, layer.shape)
        assert layer.relative_error < 100 * EPS32
    merged = _merged(base, result.directory)
    for name, expected in tuned.items():
        if name.endswith("weight"):
            scale = float(expected.abs().max())
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=100 * EPS32 * scale)


def test_energy_rule_uses_energy_ranks(checkpoints, tmp_path) -> None:
    base_path, tuned_path, base, tuned = checkpoints
    result = flora.extract(base_path, tuned_path, tmp_path / "adapter", rank={"energy": 0.8})
    for layer in result.layers:
        delta = (tuned[layer.tensor] - base[layer.tensor]).numpy()
        assert layer.ranks == energy_ranks(delta, 0.8)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (dict(ranks=2), 2),
        (dict(energy=0.8), {"energy": 0.8}),
        (dict(budget_like_lora=4, fixed_kernel_rank=1), {"budget_like_lora": 4,
                                                         "fixed_kernel_rank": 1}),
    ],
)  # fmt: skip
def test_the_old_rank_keywords_still_work_with_a_warning_naming_rank(
    checkpoints, tmp_path, old, new
) -> None:
    base_path, tuned_path, _, _ = checkpoints
    with pytest.warns(DeprecationWarning, match=r"is deprecated .*; pass rank=") as record:
        result = flora.extract(base_path, tuned_path, tmp_path / "old", **old)
    assert f"pass rank={new!r}" in str(record[0].message)
    assert record[0].filename == __file__  # the warning points at the caller
    expected = flora.extract(base_path, tuned_path, tmp_path / "new", rank=new)
    assert [layer.ranks for layer in result.layers] == [layer.ranks for layer in expected.layers]


def test_as_parameters_loads_through_parametrizations(checkpoints, tmp_path) -> None:
    base_path, tuned_path, base, tuned = checkpoints
    result = flora.extract(
        base_path, tuned_path, tmp_path / "adapter", include="conv", as_parameters=True
    )
    assert [(layer.name, layer.kind) for layer in result.layers] == [("conv.weight", "Parameter")]
    merged = _merged(base, result.directory)
    delta = tuned["conv.weight"] - base["conv.weight"]
    error = _relative(merged["conv.weight"], tuned["conv.weight"], delta)
    assert error == pytest.approx(result.layers[0].relative_error, abs=1e-4)


def test_invalid_rules(checkpoints, tmp_path) -> None:
    base_path, tuned_path, _, _ = checkpoints
    with pytest.raises(ValueError, match="at most one"):
        flora.extract(base_path, tuned_path, tmp_path / "a", rank={"ranks": 2, "energy": 0.9})
    with pytest.raises(flora.ExtractionError, match=r"ranks \(2, 2\) give 2 modes but"):
        flora.extract(base_path, tuned_path, tmp_path / "a", rank=(2, 2), include="conv")
    with pytest.raises(ValueError, match="nothing to extract"):
        flora.extract(base_path, base_path, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_cli_prints_per_layer_errors(checkpoints, tmp_path, capsys) -> None:
    base_path, tuned_path, _, _ = checkpoints
    out = tmp_path / "adapter"
    args = ["extract", str(base_path), str(tuned_path), "--out", str(out), "--quiet"]
    assert main([*args, "--budget-like-lora", "2", "--fixed-kernel-rank", "1"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "kind", "shape", "ranks", "params", "rel.", "error"]
    conv = next(line for line in lines if line.startswith("conv "))
    assert conv.split()[:3] == ["conv", "Conv2d", "8x3x3x3"]
    assert conv.split()[3].endswith(",1,1")
    assert f"Wrote {out}: 3 layers" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ranks", "2", "--energy", "0.9"], "not allowed with argument"),
        (["--energy", "2"], "outside (0, 1]"),
        (["--ranks", "2,x"], "integer >= 1"),
    ],
)
def test_cli_usage_errors(checkpoints, tmp_path, capsys, args, message) -> None:
    base_path, tuned_path, _, _ = checkpoints
    with pytest.raises(SystemExit) as info:
        main(["extract", str(base_path), str(tuned_path), "--out", str(tmp_path / "x"), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert message in err


def test_cli_input_errors_exit_2_without_traceback(checkpoints, tmp_path, capsys) -> None:
    base_path, tuned_path, _, _ = checkpoints
    cases = [
        ([str(base_path), str(base_path)], "nothing to extract"),
        ([str(base_path), str(tuned_path), "--ranks", "2,2", "--include", "conv"], "give 2 modes"),
    ]
    for args, message in cases:
        assert main(["extract", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err
        assert len(err.strip().splitlines()) == 1, err
    # The module entry point, as a user runs it.
    result = subprocess.run(
        [sys.executable, "-m", "flora", "extract", str(tmp_path / "absent.pt"), str(tuned_path),
         "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("flora extract: error: ")
    assert "no such file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


class NormNet(torch.nn.Module):
    """Layers with biases, a BatchNorm with running statistics, a LayerNorm, a loose vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.norm = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 12)
        self.ln = torch.nn.LayerNorm(12)
        self.gate = torch.nn.Parameter(torch.ones(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))
        return self.ln(self.fc(h)) * self.gate


@pytest.fixture
def norm_checkpoints(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    torch.manual_seed(0)
    base = _state(NormNet())
    gen = torch.Generator().manual_seed(1)
    tuned = {}
    for key, value in base.items():
        if value.is_floating_point():
            # Fine-tunes move every tensor a little, relative to its size.
            step = 0.1 * torch.randn(value.shape, generator=gen) * (value.abs() + 0.1)
            tuned[key] = value + step
        else:
            tuned[key] = value + 7  # num_batches_tracked
    tuned["norm.running_var"] = tuned["norm.running_var"].abs()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", base, tuned


def _loaded(base: dict, adapter: Path) -> torch.nn.Module:
    model = NormNet().eval()
    model.load_state_dict(base)
    return flora.load_adapter(model, adapter)


def test_carried_1d_tensors_reproduce_the_tuned_ones_exactly(norm_checkpoints, tmp_path) -> None:
    base_path, tuned_path, base, tuned = norm_checkpoints
    result = flora.extract(base_path, tuned_path, tmp_path / "a", rank=10_000, carry_1d=True)
    carried = dict(result.carried)
    assert carried["conv.bias"] == carried["fc.bias"] == "bias update of its adapted layer"
    norm_keys = ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"]
    for name in [*norm_keys, "norm.num_batches_tracked", "ln.weight", "ln.bias"]:
        assert carried[name] == "saved with its module (modules_to_save)", name
    assert "gate" in dict(result.skipped)  # a vector outside any module has no home
    assert result.config.bias
    assert result.config.modules_to_save == ["norm", "ln"]
    model = _loaded(base, result.directory)
    merged = flora.merged_state_dict(model)
    for name in carried:
        assert torch.equal(merged[name], tuned[name]), name
    plain = flora.unload(model, merge=True).state_dict()
    for name in carried:
        assert torch.equal(plain[name], tuned[name]), name
    for name in ("conv.weight", "fc.weight"):
        scale = float(tuned[name].abs().max())
        torch.testing.assert_close(plain[name], tuned[name], rtol=0, atol=100 * EPS32 * scale)


def test_a_carried_bias_that_shrinks_to_zero_is_one_rounding_away(tmp_path) -> None:
    torch.manual_seed(0)
    base = {"fc.weight": torch.randn(8, 5), "fc.bias": torch.randn(8)}
    tuned = {"fc.weight": 2 * base["fc.weight"], "fc.bias": 1e-3 * torch.randn(8)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    adapter = flora.extract(
        tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "a",
        rank=1, carry_1d=True,
    ).directory  # fmt: skip
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(5, 8))
    model.load_state_dict(base)
    merged = flora.merged_state_dict(flora.load_adapter(model, adapter))["fc.bias"]
    ulp = torch.finfo(torch.float32).eps * base["fc.bias"].abs()
    assert torch.all((merged - tuned["fc.bias"]).abs() <= ulp)


def test_lifecycle_gives_back_the_base_model_exactly(norm_checkpoints, tmp_path) -> None:
    base_path, tuned_path, base, _ = norm_checkpoints
    adapter = flora.extract(base_path, tuned_path, tmp_path / "a", carry_1d=True).directory
    x = torch.randn(4, 3, 6, 6)
    reference = NormNet().eval()
    reference.load_state_dict(base)
    expected = reference(x)

    model = _loaded(base, adapter)
    assert not torch.equal(model(x), expected)
    with flora.disable_adapter(model):
        assert torch.equal(model(x), expected)
    for undo in (
        lambda m: flora.delete_adapter(m, "default"),
        lambda m: flora.unload(m, merge=False),
    ):
        model = undo(_loaded(base, adapter))
        assert {k: type(v) for k, v in model.named_modules()} == {
            k: type(v) for k, v in reference.named_modules()
        }
        state = model.state_dict()
        assert state.keys() == base.keys()
        for key, value in base.items():
            assert torch.equal(state[key], value), key
        assert torch.equal(model(x), expected)
    # A merge and unmerge round trip gives the weights and biases back to rounding.
    model = flora.unmerge(flora.merge(_loaded(base, adapter)))
    state = flora.merged_state_dict(flora.unload(model, merge=False))
    for key, value in base.items():
        scale = float(value.abs().max()) if value.is_floating_point() else 0.0
        torch.testing.assert_close(state[key], value, rtol=0, atol=10 * EPS32 * scale)


def test_cli_carry_1d_lists_the_carried_tensors(norm_checkpoints, tmp_path, capsys) -> None:
    base_path, tuned_path, _, _ = norm_checkpoints
    out = tmp_path / "adapter"
    assert main(["extract", str(base_path), str(tuned_path), "--out", str(out), "--quiet",
                 "--carry-1d"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "Carried (9 tensors):\n  bias update of its adapted layer: conv.bias, fc.bias\n" in text
    assert "  saved with its module (modules_to_save): norm." in text
    assert "Not in the adapter (1 tensors):" in text
    document = json.loads((out / flora.io.CONFIG_NAME).read_text())
    assert document["layers"]["fc"]["bias"] is True
    assert document["modules_to_save"] == ["norm", "ln"]
