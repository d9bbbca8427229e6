"""The evidence protocol's learning-rate search (benchmarks/_quality_study.py) on made-up scores.

The search must extend a grid past whichever end scores best, stop once the
best rate is inside, break validation ties by the mean over every seed (then
by the larger rate, never by the smaller), and train every seed at the
chosen rate.
"""

from __future__ import annotations

import pytest
from benchmark_modules import benchmark_modules

pytest.importorskip("peft", reason="the benchmark modules import HF PEFT")


@pytest.fixture(scope="module")
def study():
    with benchmark_modules("_quality_study") as modules:
        yield modules["_quality_study"]


def _search(study, score, grid, *, seeds=(0, 1, 2, 3, 4), sweep_seeds=(0, 1), tie=0.01):
    """Run the search with ``score(lr, seed)`` as validation accuracy; return cell and runs."""
    plan = study.Plan(
        methods={"m": "M"}, budgets=(1,), seeds=seeds, lr_grid={"m": grid}, sweep_seeds=sweep_seeds
    )
    cell = study.Cell("m", 1, None, sorted(grid))
    cache = {}
    while requests := study.next_requests(cell, plan, cache, tie):
        for job in requests:
            cache[job] = {"val_accuracy": score(job[3], job[4])}
    return cell, cache


def test_the_grid_grows_until_the_top_degrades(study):
    # Accuracy peaks at 0.3: the starting grid's top (0.03) is best, so it grows twice.
    cell, cache = _search(study, lambda lr, seed: -abs(lr - 0.3), (3e-3, 1e-2, 3e-2))
    assert cell.grid == [3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    assert cell.chosen == 0.3
    assert {job[4] for job in cache if job[3] == 0.3} == {0, 1, 2, 3, 4}
    # The other rates ran on the sweep seeds only.
    assert {job[4] for job in cache if job[3] == 0.1} == {0, 1}


def test_the_grid_grows_downwards_too(study):
    cell, _ = _search(study, lambda lr, seed: -abs(lr - 1e-4), (1e-3, 3e-3, 1e-2))
    assert cell.grid[:3] == [3e-5, 1e-4, 3e-4]
    assert cell.chosen == 1e-4


def test_extension_stops_after_max_extensions(study):
    cell, _ = _search(study, lambda lr, seed: lr, (1e-3, 3e-3))
    assert len(cell.grid) == 2 + 3
    assert cell.chosen == max(cell.grid)


def test_a_tie_goes_to_the_higher_mean_over_all_seeds(study):
    # 1e-3 and 3e-3 tie on the sweep seeds; over all five, the smaller rate is better.
    def score(lr, seed):
        if lr == 1e-2:
            return 0.0
        if seed in (0, 1):
            return 0.5
        return 0.6 if lr == 1e-3 else 0.4

    cell, cache = _search(study, score, (3e-4, 1e-3, 3e-3, 1e-2))
    assert cell.chosen == 1e-3
    assert {job[4] for job in cache if job[3] == 3e-3} == {0, 1, 2, 3, 4}


def test_an_exact_tie_goes_to_the_larger_rate(study):
    cell, _ = _search(
        study, lambda lr, seed: 0.0 if lr in (1e-4, 1e-2) else 0.5, (1e-4, 1e-3, 3e-3, 1e-2)
    )
    assert cell.chosen == 3e-3


def test_ladder_steps(study):
    assert study.ladder_step(1e-2, up=True) == 0.03
    assert study.ladder_step(3e-2, up=True) == 0.1
    assert study.ladder_step(1e-3, up=False) == 3e-4
    assert study.ladder_step(3e-4, up=False) == 1e-4


def test_one_sweep_seed_sweeps_on_seed_zero_alone(study):
    score = lambda lr, seed: -abs(lr - 0.01)  # noqa: E731
    cell, cache = _search(study, score, (3e-3, 1e-2, 3e-2), sweep_seeds=(0,), tie=1e-3)
    assert cell.chosen == 0.01
    assert {job[4] for job in cache if job[3] == 0.01} == {0, 1, 2, 3, 4}
    assert {job[4] for job in cache if job[3] != 0.01} == {0}


def _logged_study(study, log, key, trained):
    plan = study.Plan(methods={"m": "M"}, budgets=(1,), seeds=(0, 1), lr_grid={"m": (0.1,)})
    runs = study.Study(plan, None, None, None, log=log, key=key)

    def train(job):
        trained.append(job)
        return {"val_accuracy": 0.5, "seed": job[4]}

    runs.train = train
    return runs


def test_a_killed_study_resumes_only_runs_of_the_same_experiment(study, tmp_path):
    log, trained = tmp_path / "progress.jsonl", []
    jobs = [("m", 1, None, 0.1, 0), ("m", 1, None, 0.1, 1)]
    _logged_study(study, log, "steps=100", trained).run_all(jobs[:1])
    # A kill mid-write leaves a partial line, which is trained again.
    with log.open("a", encoding="utf-8") as handle:
        handle.write('{"key": "steps=100", "job": "' + repr(jobs[1]))
    resumed = _logged_study(study, log, "steps=100", trained)
    resumed.run_all(jobs)
    assert trained == jobs
    assert resumed.cache[jobs[0]]["seed"] == 0
    # The same log under other settings trains everything again.
    _logged_study(study, log, "steps=200", trained).run_all(jobs)
    assert trained == jobs + jobs
