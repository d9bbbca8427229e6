"""The scripts in examples/ run as the docs say, from a fresh interpreter."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the examples train torch models")
pytest.importorskip("sklearn", reason="the examples train on scikit-learn's digits")

import flora  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_quickstart_trains_saves_reloads_and_unloads(tmp_path: Path) -> None:
    out = _run([str(EXAMPLES / "flora_quickstart.py")], tmp_path).stdout
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert "reloaded adapter reproduces outputs: True" in out
    merged_difference = float(re.search(r"merged max difference: (\S+)", out).group(1))
    assert merged_difference < 1e-4
    assert "plain modules again: ['Conv2d', 'ReLU', 'Conv2d', 'ReLU', 'Flatten', 'Linear']" in out


@pytest.mark.slow
def test_trainer_example_resumes_exactly_and_saves_what_load_adapter_reads(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the example trains with transformers.Trainer")
    out = _run([str(EXAMPLES / "train_with_trainer.py"), "--out", str(tmp_path)], tmp_path).stdout
    assert "'adapter_model.safetensors', 'model.safetensors'" in out
    assert "largest parameter difference: 0.0" in out
    assert "loaded adapter reproduces the trained model: True" in out
    assert flora.read_adapter(tmp_path / "final").modules_to_save == ["classifier"]


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)
@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_distributed_example_under_torchrun(mode: list[str], tmp_path: Path) -> None:
    # The command of the docs: torchrun --standalone --nproc_per_node=2 ...
    out = tmp_path / "adapter"
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = [str(EXAMPLES / "distributed_flora.py"), "--epochs", "1", "--out", str(out), *mode]
    stdout = _run(command + script, tmp_path).stdout
    # The base network reads about 10% of rotated digits; one epoch of
    # adapter training on two processes reads most of them.
    accuracy = float(re.search(r"read correctly: ([\d.]+)%", stdout).group(1))
    assert accuracy > 40.0
    model = flora.load_adapter(_digits_cnn(), out)
    assert sorted(flora.adapted_layers(model)) == ["conv2", "conv3", "fc1", "fc2"]


def _digits_cnn() -> torch.nn.Module:
    """The example network, as examples/make_digits_example.py defines it."""
    spec = importlib.util.spec_from_file_location(
        "make_digits_example", EXAMPLES / "make_digits_example.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DigitsCNN()
