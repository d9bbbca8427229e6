"""The bundled example checkpoints: real weights, reproducible by the example script."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tuckerlib.cli.common import bundled_example
from tuckerlib.io import open_checkpoint

torch = pytest.importorskip("torch", reason="the example network is a torch module")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "make_digits_example.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("make_digits_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(example, path: Path) -> torch.nn.Module:
    model = example.DigitsCNN()
    with open_checkpoint(path) as ckpt:
        model.load_state_dict({name: torch.from_numpy(ckpt.read(name)) for name in ckpt})
    return model


def test_bundled_checkpoints_are_the_trained_and_fine_tuned_network(example) -> None:
    base_path, tuned_path = bundled_example()
    assert base_path.stat().st_size + tuned_path.stat().st_size < 2 * 2**20
    base, tuned = _model(example, base_path), _model(example, tuned_path)
    _, x_test, _, y_test = example.load_data()
    rotated = example.rotate(x_test)
    # The base model reads upright digits, the fine-tune rotated ones: the
    # pair is a real shift of task, not noise added to weights.
    assert example.accuracy(base, x_test, y_test) > 0.95
    assert example.accuracy(base, rotated, y_test) < 0.3
    assert example.accuracy(tuned, rotated, y_test) > 0.95
    with open_checkpoint(tuned_path) as ckpt:
        assert "rotated by 90 degrees" in ckpt.metadata["description"]


@pytest.mark.slow
def test_example_script_is_deterministic_and_writes_the_bundled_layout(tmp_path: Path) -> None:
    # A fresh interpreter: the script sets process-wide torch options.
    code = textwrap.dedent(
        f"""
        import runpy
        main = runpy.run_path({str(SCRIPT)!r})["main"]
        main(["--out", {str(tmp_path / "a")!r}, "--epochs", "1"])
        main(["--out", {str(tmp_path / "b")!r}, "--epochs", "1"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for role, bundled in zip(("base", "tuned"), bundled_example(), strict=True):
        name = f"digits_cnn_{role}.safetensors"
        with (
            open_checkpoint(tmp_path / "a" / name) as first,
            open_checkpoint(tmp_path / "b" / name) as second,
            open_checkpoint(bundled) as shipped,
        ):
            assert list(first) == list(shipped)
            for tensor in first:
                assert first.info(tensor) == shipped.info(tensor)
                np.testing.assert_array_equal(first.read(tensor), second.read(tensor))
