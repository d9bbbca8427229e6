"""FLoRA's initializations against PEFT LoRA at one budget, paired by seed (issue 19).

A small evidence check, not a study: every method trains with the study's
own protocol (data, steps, batch, Adam with cosine decay, evaluation) at a
learning rate given on the command line, so no sweep runs. Each method is
``NAME:LR``: ``lora`` (PEFT, ``lora_alpha = r``), or a FLoRA init name
(``balanced``, ``zero_core``, ``gaussian``, ``hosvd``) with ``s = 1``, or
one of the N-D variants of ``balanced`` of ``init_sensitivity.py``
(``balanced_orth``, ``balanced_orth3``).

Run (one thread; about 30 s per MiniLM run, a few seconds per digits run)::

    .venv/bin/python benchmarks/init_check.py --study minilm --budget 2 \\
        --seeds 0 1 2 3 4 --methods lora:0.01 balanced:0.01 --json runs.json

The table gives test accuracy mean ± sd over seeds and, for every FLoRA
method, the paired difference to LoRA (same seeds) with its standard error.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import sys
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
from _quality_methods import (
    Adapted,
    FloraVariant,
    adapt,
    flora_layer_ranks,
    flora_model,
    lora_model,
    train_head,
    with_new_head,
)
from _quality_study import Builder, Plan, Study
from _quality_train import TrainSettings
from init_sensitivity import ORTH_VARIANTS, orthonormalize


def _minilm(variants: dict[str, FloraVariant]) -> tuple[Builder, object, TrainSettings]:
    import quality_minilm as q

    experiment = q.FULL
    base, data, _, _ = q._setup(experiment, None)
    targets = q.text_targets(experiment.n_adapted)
    ranks: dict[tuple, dict] = {}

    def build(method: str, budget: int | None, seed: int, variant: Hashable) -> Adapted:
        model = with_new_head(base, seed)
        if method == "lora":
            return train_head(lora_model(model, budget, 1.0, targets))
        chosen = variant or variants[method]
        key = (budget, chosen.channel_rule, chosen.kernel_rank)
        if key not in ranks:
            ranks[key] = flora_layer_ranks(base, budget, chosen, targets)
        torch.manual_seed(seed)
        return train_head(flora_model(model, ranks[key], chosen))

    settings = TrainSettings(
        steps=experiment.steps, batch_size=experiment.batch_size, eval_batch_size=128
    )
    return build, data, settings


def _digits(variants: dict[str, FloraVariant]) -> tuple[Builder, object, TrainSettings]:
    import quality as q
    from _quality_setup import load_task, pretrain

    experiment = q.FULL
    data = load_task()
    base = pretrain(data.source_train, steps=experiment.pretrain_steps)

    def build(method: str, budget: int | None, seed: int, variant: Hashable) -> Adapted:
        chosen = None if method == "lora" else variant or variants[method]
        return adapt(base, method, budget_rank=budget or 1, seed=seed, variant=chosen)

    return build, data, TrainSettings(steps=experiment.steps)


def _table(rows: list[dict], methods: list[str]) -> str:
    by = {m: {r["seed"]: r["test_accuracy"] for r in rows if r["method"] == m} for m in methods}
    lines = ["| method | LR | seeds | test acc. | paired Δ vs LoRA (SE) |", "|---|---|---|---|---|"]
    for m in methods:
        accs = np.array(list(by[m].values()))
        lr = next(r["lr"] for r in rows if r["method"] == m)
        cell = f"{accs.mean():.3f} ± {accs.std(ddof=1) if len(accs) > 1 else 0:.3f}"
        delta = "–"
        if m != "lora" and "lora" in by:
            seeds = sorted(set(by[m]) & set(by["lora"]))
            d = np.array([by[m][s] - by["lora"][s] for s in seeds])
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            delta = f"{d.mean():+.3f} ({se:.3f})"
        lines.append(f"| {m} | {lr:g} | {len(accs)} | {cell} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("minilm", "digits"), required=True)
    parser.add_argument("--budget", type=int, default=2, help="LoRA rank naming the budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", required=True, help="NAME:LR pairs")
    parser.add_argument("--json", type=Path, help="write the run rows here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan_lrs = {}
    for item in args.methods:
        name, _, lr = item.partition(":")
        plan_lrs[name] = float(lr)
    rule = "equal" if args.study == "minilm" else "energy"
    variants = {
        m: FloraVariant(init=m.split("_orth")[0], channel_rule=rule)
        for m in plan_lrs
        if m != "lora"
    }
    # The digits builder names FLoRA methods "flora_*" (adapt() dispatches on it).
    setup = _minilm if args.study == "minilm" else _digits
    build, data, settings = setup(variants)
    names = {m: m if m == "lora" else f"flora_{m}" for m in plan_lrs}
    variants = {names[m]: v for m, v in variants.items()}

    def named_build(method, budget, seed, variant):
        adapted = build(method, budget, seed, variant or variants.get(method))
        orth = ORTH_VARIANTS.get(method.removeprefix("flora_"))
        if orth is not None:
            torch.manual_seed(seed)
            orthonormalize(adapted.model, orth)
        return adapted

    plan = Plan({names[m]: m for m in plan_lrs}, (args.budget,), tuple(args.seeds), {}, args.budget)
    study = Study(plan, named_build, data, settings, args.study)
    rows = []
    for seed in args.seeds:
        for m, lr in plan_lrs.items():
            rows.append({**study.run(names[m], args.budget, lr, seed), "method": m})
            if args.json is not None:
                args.json.write_text(json.dumps(rows, indent=1))
    print(_table(rows, list(plan_lrs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
