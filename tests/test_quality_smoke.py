"""Smoke run of benchmarks/quality.py: the whole pipeline, a few steps, one seed, one budget."""

from __future__ import annotations

import csv

import pytest
from benchmark_modules import benchmark_modules

pytest.importorskip("peft", reason="the quality benchmark compares against HF PEFT's LoRA")
pytest.importorskip("sklearn", reason="the quality benchmark uses scikit-learn's digits")

#: A method's trainable count may fall short of the budget (integer Tucker
#: ranks) by at most this fraction, and never exceed it.
BUDGET_SLACK = 0.2


@pytest.fixture(scope="module")
def quality():
    with benchmark_modules("quality") as modules:
        yield modules["quality"]


@pytest.fixture(scope="module")
def result(quality, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("quality")
    # One thread: spinning OpenMP workers make tiny steps 10x slower when
    # pytest-xdist workers share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quality.run_experiment(quality.QUICK, out), out
    finally:
        torch.set_num_threads(threads)


def test_writes_figure_tables_and_runs(result):
    _, out = result
    paired = (out / "flora_vs_lora_paired.csv").read_text(encoding="utf-8").splitlines()
    assert paired[0] == "Method,Budget (LoRA r),Against,Paired Δ,SE,Seeds,Verdict"
    assert len(paired) > 1
    for name in ("flora_vs_lora.png", "flora_vs_lora_runs.json"):
        assert (out / name).stat().st_size > 0
    for study in ("main", "ablation", "sweep"):
        lines = (out / f"flora_vs_lora_{study}.csv").read_text(encoding="utf-8").splitlines()
        assert len(lines) > 1
        assert lines[0].startswith("Method,")
        # One seed has no spread to show; a lone "-" cell would render as a bullet.
        assert all("±" not in "".join(row) for row in csv.reader(lines) if row[7] == "1")
        assert ",-," not in "\n".join(lines)


def test_every_method_runs_with_sane_numbers(quality, result):
    summary, _ = result
    main = summary["summaries"]["main"]
    assert {s.method for s in main} == set(quality.ALL_METHODS)
    for row in summary["rows"]:
        assert 0.0 <= row["val_accuracy"] <= 1.0
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["seconds_per_step"] > 0
        assert row["memory_bytes"] > 4 * summary["n_model"]
    assert summary["seconds"] > 0


def test_budgets_are_met(quality, result):
    from _quality_methods import lora_budget

    summary, _ = result
    budget_rank = quality.QUICK.budget_ranks[0]
    main = {s.method: s for s in summary["summaries"]["main"]}
    budget = sum(lora_budget(quality.DigitsCNN(), budget_rank).values())
    assert main["lora"].n_trainable == budget
    for method in quality.FLORA_VARIANTS:
        assert (1 - BUDGET_SLACK) * budget <= main[method].n_trainable <= budget, method
    # A PEFT anchor whose rank-1 adapter costs more than a layer's share overdraws it.
    for method in quality.PEFT_ANCHORS:
        assert main[method].n_trainable <= 1.5 * budget, method
    assert main["full"].n_trainable == summary["n_model"]
    assert main["head"].n_trainable < main["lora"].n_trainable


def test_flora_count_is_the_sum_of_tucker_params(quality):
    from _quality_methods import FLORA_VARIANTS, adapt, flora_layer_ranks

    import flora
    import tuckerlib

    base = quality.DigitsCNN()
    for variant in FLORA_VARIANTS.values():
        adapted = adapt(base, "flora", budget_rank=2, seed=0, variant=variant)
        ranks = flora_layer_ranks(base, 2, variant)
        expected = sum(
            tuckerlib.tucker_params(tuple(base.get_submodule(name).weight.shape), r)
            for name, r in ranks.items()
        )
        assert flora.trainable_parameters(adapted.model) == expected == adapted.n_trainable


def test_zero_core_adapters_start_at_the_base_model(quality):
    import torch
    from _quality_methods import FLORA_VARIANTS, adapt

    base = quality.DigitsCNN().eval()
    x = torch.rand(5, 1, 8, 8)
    tol = 100 * torch.finfo(torch.float32).eps
    for method in ("lora", *FLORA_VARIANTS):
        adapted = adapt(base, method, budget_rank=1, seed=0, variant=FLORA_VARIANTS.get(method))
        with torch.no_grad():
            torch.testing.assert_close(adapted.model(x), base(x), rtol=tol, atol=tol)


def test_timing_only_times_every_method(quality, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = quality.run_timing(quality.QUICK, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [r["setting"] for r in rows] == list(quality.ALL_METHODS.values())
    assert all(0 < r["min_seconds"] <= r["median_seconds"] <= r["max_seconds"] for r in rows)
    assert all(r["memory_bytes"] > 0 for r in rows)
    assert (tmp_path / "flora_vs_lora_timing.json").stat().st_size > 0


def test_worker_processes_reproduce_the_serial_run(quality, result):
    # A device other than "cpu" takes the spawned-worker path that CUDA runs
    # use: each worker rebuilds the study from its recipe (pretraining
    # included) and must train exactly what the serial run trained.
    import torch

    serial, _ = result
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spawned = quality.run_experiment(quality.QUICK, jobs=2, device="cpu:0")
    finally:
        torch.set_num_threads(threads)

    def runs(summary):
        keys = ("study", "method", "budget_rank", "lr", "seed", "val_accuracy", "test_accuracy")
        return sorted(tuple(str(row[k]) for k in keys) for row in summary["rows"])

    assert runs(spawned) == runs(serial)
    assert spawned["lrs"] == serial["lrs"]
