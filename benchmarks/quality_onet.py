"""Pretrained vision: MTCNN's O-Net adapted from faces to digits, every method at equal budgets.

The pretrained O-Net from the ``facenet-pytorch`` wheel (see
``_quality_onet.py``) gets a new 10-class head and learns scikit-learn's
digits at 48x48. Compared at five budgets (PEFT LoRA at rank 1, 2, 4, 8 and
16 on the four convolutions and ``dense5``): LoRA, DoRA, LoHa and LoKr
(PEFT, the last two with ``use_effective_conv2d=True``) and FLoRA with its
default init (``"auto"``), energy-chosen ranks (kernel modes full); full
fine-tuning and the head alone are the two ends. ``--candidates`` adds FLoRA
with ``init="balanced"`` (the N-D init candidate). Every method trains the
new head in full. Five seeds; a learning rate per method and budget chosen
on a validation split (``_quality_study.py``).

Run (two worker processes of one thread each; writes the docs' figure and
tables)::

    .venv/bin/python benchmarks/quality_onet.py --out docs/_static

``--timing-only`` measures step time and training memory of every method
(a few minutes); ``--quick`` runs the same pipeline at smoke size.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers make a 2-thread run 10-20x slower when the cores are
# shared with other processes; waiting passively costs nothing on a quiet
# machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _quality_methods import (
    FLORA_LABELS,
    FLORA_VARIANTS,
    Adapted,
    flora_layer_ranks,
    flora_model,
    lora_model,
    train_head,
    with_new_head,
)
from _quality_onet import ONET_TARGETS, load_digits48, onet_state_dict, pretrained_onet
from _quality_peft import PEFT_ANCHORS, anchor_model, anchor_spec
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
from _quality_train import Splits, TrainSettings
from torch import nn

#: Display names, in table order.
METHODS = {
    "full": "Full fine-tuning",
    "head": "Head only",
    "lora": "LoRA (PEFT)",
    **PEFT_ANCHORS,
    **{m: FLORA_LABELS[m] for m in ("flora", "flora_balanced")},
}

_ADAPTER_LRS = (3e-3, 1e-2, 3e-2)


@dataclass(frozen=True)
class Experiment:
    """Sizes of one run of the benchmark; :data:`FULL` is the published one."""

    #: Keys of :data:`METHODS` that run, in table order.
    methods: tuple[str, ...] = tuple(m for m in METHODS if m != "flora_balanced")
    budget_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 80
    batch_size: int = 32
    #: Training images (of 1,197): few enough that the methods do not all reach the ceiling.
    n_train: int = 300
    #: Validation and test images kept (``None``: all 200 and 400).
    n_eval: int | None = None
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "full": (3e-4, 1e-3, 3e-3),
            "head": (1e-2, 3e-2, 1e-1),
            **{m: _ADAPTER_LRS for m in METHODS if m not in ("full", "head")},
        }
    )
    sweep_seeds: tuple[int, ...] = (0,)
    timing_budget_rank: int = 4
    timing_steps: int = 20

    @property
    def names(self) -> dict[str, str]:
        """Display names of the methods that run, in table order."""
        return {m: METHODS[m] for m in self.methods}


FULL = Experiment()
#: :data:`FULL` with FLoRA's N-D init candidate (``--candidates``).
CANDIDATES = Experiment(methods=tuple(METHODS))
QUICK = Experiment(
    methods=tuple(METHODS),
    budget_ranks=(1,),
    seeds=(0, 1),
    steps=2,
    batch_size=8,
    lr_grid={m: (1e-3, 3e-3) for m in METHODS},
    sweep_seeds=(0,),
    timing_budget_rank=1,
    timing_steps=2,
    n_train=40,
    n_eval=40,
)


def builder(base: nn.Module) -> Builder:
    """Builds every method of :data:`METHODS` on a copy of ``base`` (ranks computed once)."""
    ranks: dict[tuple[str, int], object] = {}

    def layer_ranks(method: str, budget: int):
        if (method, budget) not in ranks:
            if method in FLORA_VARIANTS:
                found = flora_layer_ranks(base, budget, FLORA_VARIANTS[method], ONET_TARGETS)
            else:
                found = anchor_spec(base, method, budget, ONET_TARGETS)
            ranks[method, budget] = found
        return ranks[method, budget]

    def build(method: str, budget: int | None, seed: int, variant: Hashable) -> Adapted:
        # Ranks first: finding an anchor's ranks builds PEFT models, which
        # draws from the global generator that the seed below must own.
        chosen = layer_ranks(method, budget) if method not in ("full", "head", "lora") else None
        model = with_new_head(base, seed)
        if method == "full":
            return Adapted(model, list(model.parameters()), {})
        if method == "head":
            model.requires_grad_(False)
            return train_head(Adapted(model, [], {}))
        if method == "lora":
            adapted = lora_model(model, budget, 1.0, ONET_TARGETS)
        elif method in PEFT_ANCHORS:
            adapted = anchor_model(model, method, chosen)
        else:
            adapted = flora_model(model, chosen, FLORA_VARIANTS[method])
        return train_head(adapted)

    return build


def _plan(experiment: Experiment) -> Plan:
    return Plan(
        methods=experiment.names,
        budgets=experiment.budget_ranks,
        seeds=experiment.seeds,
        lr_grid=experiment.lr_grid,
        sweep_seeds=experiment.sweep_seeds,
    )


def _study(
    experiment: Experiment,
    base: nn.Module,
    data: Splits,
    jobs: int = 1,
    device: str = "cpu",
    out: Path | None = None,
) -> Study:
    return Study(
        _plan(experiment),
        builder(base),
        data,
        TrainSettings(steps=experiment.steps, batch_size=experiment.batch_size),
        "onet",
        jobs,
        progress_log(out, "flora_vs_lora_onet"),
        key=repr(experiment),
        device=device,
        recipe=functools.partial(worker_study, experiment, base, data, device),
    )


def worker_study(experiment: Experiment, base: nn.Module, data: Splits, device: str) -> Study:
    """The study as a spawned worker rebuilds it, on the parent's O-Net and data."""
    return _study(experiment, base, data, device=device)


def run_experiment(
    experiment: Experiment,
    out: Path | None = None,
    state: dict | None = None,
    jobs: int = 1,
    device: str = "cpu",
) -> dict:
    """Run the whole benchmark; write figure, tables and raw runs to ``out`` if given.

    ``state`` is O-Net's state dict (default: the installed ``facenet-pytorch``'s).
    Returns the summaries (``"main"``, ``"sweep"``), the paired differences,
    the chosen learning rates, the raw rows, the model size and the run time.
    """
    start = time.perf_counter()
    base = pretrained_onet(onet_state_dict() if state is None else state)
    data = load_digits48(experiment.n_train, experiment.n_eval)
    study = _study(experiment, base, data, jobs, device, out)
    with study:
        lrs, rows = study.main()
    n_model = sum(p.numel() for p in base.parameters())
    result = study_result(
        rows,
        lrs,
        n_model,
        experiment.names,
        studies=("main", "sweep"),
        started=start,
        device=device,
    )
    if out is not None:
        write_study(out, "flora_vs_lora_onet", result, experiment.names, "digits, O-Net")
    return result


def run_timing(experiment: Experiment, out: Path | None = None, state: dict | None = None):
    """Median step time and training memory of every method at the sweep budget."""
    base = pretrained_onet(onet_state_dict() if state is None else state)
    data = load_digits48(experiment.n_train, experiment.n_eval)
    build = builder(base)
    rows = time_methods(
        _plan(experiment),
        build,
        data.train,
        budget=experiment.timing_budget_rank,
        batch_size=experiment.batch_size,
        steps=experiment.timing_steps,
    )
    write_timing(out, "flora_vs_lora_onet", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = study_arguments(argv, __doc__.splitlines()[0], timing="minutes", candidates=True)
    torch.set_num_threads(args.threads)
    experiment = QUICK if args.quick else CANDIDATES if args.candidates else FULL
    try:
        state = onet_state_dict()
    except FileNotFoundError as error:
        print(f"quality_onet: {error}", file=sys.stderr)
        return 2
    if args.timing_only:
        rows = run_timing(experiment, args.out, state)
        print(timing_table(rows))
        print(f"\n{machine()}")
        return 0
    result = run_experiment(experiment, args.out, state, args.jobs, args.device)
    print(f"O-Net: {result['n_model']:,} parameters; chosen learning rates: {result['lrs']}")
    for study in ("main", "sweep"):
        print(f"\n{study}\n" + markdown(result["summaries"][study]))
    print("\npaired differences\n" + paired_markdown(result["paired"], experiment.names))
    print(
        f"\ntotal time: {result['seconds']:.0f} s, {args.jobs} jobs x {args.threads} threads; "
        f"{machine(args.device)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
