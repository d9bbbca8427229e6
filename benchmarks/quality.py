"""Does FLoRA beat LoRA? Adapters at equal trainable-parameter budgets on real data.

A small CNN pretrained on scikit-learn's upright 8x8 digits is adapted to the
same digits rotated by 90 degrees. Compared at four budgets (PEFT LoRA at
rank 1, 2, 4 and 8 on every convolution and the head): FLoRA with its
default init (``"auto"``) and with the ``"balanced"`` and ``"hosvd"`` inits,
energy-chosen ranks (kernel modes full); PEFT's LoRA, DoRA, LoHa and LoKr;
full fine-tuning and the head alone as the two ends. Five seeds; a learning
rate per method and budget chosen on a validation split
(``_quality_study.py``); an ablation of FLoRA's kernel ranks and scale
(three seeds).

Run (two worker processes of one thread each; writes the docs' figure and
tables)::

    .venv/bin/python benchmarks/quality.py --out docs/_static

``--timing-only`` measures step time and training memory of every method
(about a minute); ``--quick`` runs the same pipeline at smoke size (seconds).
"""

from __future__ import annotations

import os

# Spinning OpenMP workers make a 2-thread run 10-20x slower when the cores are
# shared with other processes; waiting passively costs nothing on a quiet
# machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import functools
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _quality_methods import FLORA_VARIANTS, METHODS, Adapted, adapt
from _quality_peft import PEFT_ANCHORS, AnchorSpec, anchor_model, anchor_spec
from _quality_report import (
    machine,
    markdown,
    paired_markdown,
    study_arguments,
    study_result,
    timing_table,
    write_study,
    write_timing,
)
from _quality_setup import TARGET_MODULES, DigitsCNN, TaskData, load_task, pretrain
from _quality_study import Builder, Plan, Study, progress_log, time_methods
from _quality_train import TrainSettings, accuracy

#: Display names, in table order: flora's methods, LoRA and PEFT's other anchors.
ALL_METHODS = {**METHODS, **PEFT_ANCHORS}

_ADAPTER_LRS = (1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class Experiment:
    """Sizes of one run of the benchmark; :data:`FULL` is the published one.

    Budgets stop at 8: at rank 16 a LoRA of ``conv1`` (9 inputs per output
    channel) would exceed the layer's own rank.
    """

    budget_ranks: tuple[int, ...] = (1, 2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 300
    pretrain_steps: int = 600
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "full": (1e-3, 3e-3, 1e-2),
            "head": (1e-2, 3e-2, 1e-1),
            **{m: _ADAPTER_LRS for m in ALL_METHODS if m not in ("full", "head")},
        }
    )
    sweep_seeds: tuple[int, ...] = (0,)
    ablation_budget_rank: int = 2
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    ablation_kernel_ranks: tuple[int | None, ...] = (1, 2, None)
    ablation_scales: tuple[float, ...] = (0.25, 1.0, 4.0)
    timing_budget_rank: int = 2
    timing_steps: int = 20


FULL = Experiment()
QUICK = Experiment(
    budget_ranks=(1,),
    seeds=(0, 1),
    steps=4,
    pretrain_steps=20,
    lr_grid={m: (3e-3, 1e-2) for m in ALL_METHODS},
    sweep_seeds=(0,),
    ablation_budget_rank=1,
    ablation_seeds=(0,),
    ablation_kernel_ranks=(1, None),
    ablation_scales=(1.0, 4.0),
    timing_budget_rank=1,
    timing_steps=2,
)


def _builder(base: DigitsCNN) -> Builder:
    specs: dict[tuple[str, int], AnchorSpec] = {}

    def build(method: str, budget: int | None, seed: int, variant: Hashable) -> Adapted:
        if method in PEFT_ANCHORS:
            if (method, budget) not in specs:
                specs[method, budget] = anchor_spec(base, method, budget, TARGET_MODULES)
            torch.manual_seed(seed)
            return anchor_model(base, method, specs[method, budget])
        chosen = variant if variant is not None else FLORA_VARIANTS.get(method)
        return adapt(base, method, budget_rank=budget or 1, seed=seed, variant=chosen)

    return build


def _plan(experiment: Experiment) -> Plan:
    return Plan(
        methods=ALL_METHODS,
        budgets=experiment.budget_ranks,
        seeds=experiment.seeds,
        lr_grid=experiment.lr_grid,
        sweep_seeds=experiment.sweep_seeds,
    )


def ablation(study: Study, experiment: Experiment, lrs: dict) -> list[dict]:
    """FLoRA's default (energy ranks) at one budget: kernel ranks, then the scale s."""
    base_variant = FLORA_VARIANTS["flora"]
    settings = [
        (
            f"kernel rank {'full' if k is None else k}",
            dataclasses.replace(base_variant, kernel_rank=k),
        )
        for k in experiment.ablation_kernel_ranks
    ]
    settings += [
        (f"scale s = {s:g}", dataclasses.replace(base_variant, scale=s))
        for s in experiment.ablation_scales
    ]
    budget = experiment.ablation_budget_rank
    lr = lrs["flora", budget]
    # The default variant is the main study's: share its cached runs.
    keys = [(label, None if v == base_variant else v) for label, v in settings]
    study.run_all(
        ("flora", budget, key, lr, s) for _, key in keys for s in experiment.ablation_seeds
    )
    return [
        {**study.run("flora", budget, lr, seed, key), "study": "ablation", "setting": label}
        for label, key in keys
        for seed in experiment.ablation_seeds
    ]


def _study(
    experiment: Experiment,
    base: DigitsCNN,
    data: TaskData,
    jobs: int = 1,
    device: str = "cpu",
    out: Path | None = None,
) -> Study:
    return Study(
        _plan(experiment),
        _builder(base),
        data,
        TrainSettings(steps=experiment.steps),
        "digits",
        jobs,
        progress_log(out, "flora_vs_lora"),
        key=repr(experiment),
        device=device,
        recipe=functools.partial(worker_study, experiment, base, data, device),
    )


def worker_study(experiment: Experiment, base: DigitsCNN, data: TaskData, device: str) -> Study:
    """The study as a spawned worker rebuilds it, on the parent's pretrained base and data."""
    return _study(experiment, base, data, device=device)


def run_experiment(
    experiment: Experiment, out: Path | None = None, jobs: int = 1, device: str = "cpu"
) -> dict:
    """Run the whole benchmark; write figure, tables and raw runs to ``out`` if given.

    Returns the summaries (``"main"``, ``"ablation"``, ``"sweep"``), the
    paired differences, the chosen learning rates, the raw rows, the base
    accuracies and the run time.
    """
    start = time.perf_counter()
    data = load_task()
    base = pretrain(data.source_train, steps=experiment.pretrain_steps)
    study = _study(experiment, base, data, jobs, device, out)
    n_model = sum(p.numel() for p in base.parameters())
    with study:
        lrs, rows = study.main()
        rows += ablation(study, experiment, lrs)
    result = study_result(
        rows,
        lrs,
        n_model,
        ALL_METHODS,
        studies=("main", "ablation", "sweep"),
        started=start,
        device=device,
        base_source_accuracy=accuracy(base, data.source_test),
        base_shifted_accuracy=accuracy(base, data.test),
    )
    if out is not None:
        write_study(out, "flora_vs_lora", result, ALL_METHODS, "rotated digits")
    return result


def run_timing(experiment: Experiment, out: Path | None = None) -> list[dict]:
    """Median step time and training memory of every method at the sweep budget."""
    data = load_task()
    base = pretrain(data.source_train, steps=experiment.pretrain_steps)
    settings = TrainSettings(steps=experiment.steps)
    rows = time_methods(
        _plan(experiment),
        _builder(base),
        data.train,
        budget=experiment.timing_budget_rank,
        batch_size=settings.batch_size,
        steps=experiment.timing_steps,
    )
    write_timing(out, "flora_vs_lora", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = study_arguments(argv, __doc__.splitlines()[0], timing="a minute")
    torch.set_num_threads(args.threads)
    experiment = QUICK if args.quick else FULL
    if args.timing_only:
        print(timing_table(run_timing(experiment, args.out)))
        print(f"\n{machine()}")
        return 0
    result = run_experiment(experiment, args.out, args.jobs, args.device)
    print(
        f"base network: {result['n_model']:,} parameters; accuracy upright "
        f"{result['base_source_accuracy']:.3f}, rotated {result['base_shifted_accuracy']:.3f}"
    )
    print(f"chosen learning rates: {result['lrs']}")
    for study in ("main", "ablation", "sweep"):
        print(f"\n{study}\n" + markdown(result["summaries"][study]))
    print("\npaired differences\n" + paired_markdown(result["paired"], ALL_METHODS))
    print(f"\ntotal time: {result['seconds']:.0f} s, {args.jobs} jobs x {args.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
