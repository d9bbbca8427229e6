"""Does FLoRA beat LoRA? Adapters at equal trainable-parameter budgets on real data.

A small CNN pretrained on scikit-learn's upright 8x8 digits is adapted to the
same digits rotated by 90 degrees. Compared at three budgets (PEFT LoRA at
rank 1, 2 and 4 on every convolution and the head): FLoRA ``zero_core`` with
energy-chosen ranks (kernel modes full), FLoRA ``zero_core`` with the paper's
kernel rank 2, FLoRA ``hosvd``, LoRA (HF PEFT), and full fine-tuning and the
head alone as the two ends. Five seeds; learning rate per method chosen on a
validation split; an ablation of FLoRA's kernel ranks and scale (three seeds).

Run (on 2 CPU cores; writes the docs' figure and tables)::

    .venv/bin/python benchmarks/quality.py --out docs/_static

``--quick`` runs the same pipeline at smoke size (seconds).
"""

from __future__ import annotations

import os

# Spinning OpenMP workers make a 2-thread run 10-20x slower when the cores are
# shared with other processes; waiting passively costs nothing on a quiet
# machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _quality_methods import FLORA_VARIANTS, METHODS, FloraVariant, adapt
from _quality_report import markdown, summarize, write_csv, write_figure, write_json
from _quality_setup import DigitsCNN, TaskData, load_task, pretrain
from _quality_train import TrainSettings, accuracy, train_and_evaluate

_ADAPTER_LRS = (1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class Experiment:
    """Sizes of one run of the benchmark; :data:`FULL` is the published one."""

    budget_ranks: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 300
    pretrain_steps: int = 600
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "full": (1e-3, 3e-3, 1e-2),
            "head": (1e-2, 3e-2, 1e-1),
            **{m: _ADAPTER_LRS for m in METHODS if m not in ("full", "head")},
        }
    )
    sweep_budget_rank: int = 2
    sweep_seeds: tuple[int, ...] = (0,)
    ablation_budget_rank: int = 2
    ablation_seeds: tuple[int, ...] = (0, 1, 2)
    ablation_kernel_ranks: tuple[int | None, ...] = (1, 2, None)
    ablation_scales: tuple[float, ...] = (0.25, 1.0, 4.0)


FULL = Experiment()
QUICK = Experiment(
    budget_ranks=(1,),
    seeds=(0,),
    steps=4,
    pretrain_steps=20,
    lr_grid={m: (3e-3,) for m in METHODS},
    sweep_budget_rank=1,
    ablation_budget_rank=1,
    ablation_seeds=(0,),
    ablation_kernel_ranks=(1, None),
    ablation_scales=(1.0, 4.0),
)


@dataclass
class Context:
    """What every run shares: the data, the pretrained base and a result cache."""

    experiment: Experiment
    data: TaskData
    base: DigitsCNN
    cache: dict[tuple, dict] = field(default_factory=dict)

    @property
    def n_model(self) -> int:
        """Parameters of the base network."""
        return sum(p.numel() for p in self.base.parameters())


def _variant_for(method: str) -> FloraVariant | None:
    return FLORA_VARIANTS.get(method)


def _run(
    ctx: Context,
    method: str,
    budget_rank: int | None,
    variant: FloraVariant | None,
    lr: float,
    seed: int,
) -> dict:
    """Train one (method, budget, variant, lr, seed) once; identical requests hit the cache."""
    key = (method, budget_rank, variant, lr, seed)
    if key not in ctx.cache:
        adapted = adapt(ctx.base, method, budget_rank=budget_rank or 1, seed=seed, variant=variant)
        settings = TrainSettings(steps=ctx.experiment.steps)
        result = train_and_evaluate(
            adapted.model, adapted.trainable, ctx.data, settings, lr=lr, seed=seed
        )
        ctx.cache[key] = {
            "method": method,
            "budget_rank": budget_rank,
            "lr": lr,
            "seed": seed,
            "n_trainable": adapted.n_trainable,
            "ranks": "; ".join(f"{n} {r}" for n, r in adapted.ranks.items()),
            **dataclasses.asdict(result),
        }
        print(
            f"[{len(ctx.cache):3d}] {method} r={budget_rank} {variant} lr={lr:g} seed={seed}: "
            f"val {result.val_accuracy:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return dict(ctx.cache[key])


def _budgets(method: str, experiment: Experiment) -> tuple[int | None, ...]:
    return (None,) if method in ("full", "head") else experiment.budget_ranks


def sweep(ctx: Context) -> tuple[dict[str, float], list[dict]]:
    """Pick each method's learning rate by mean validation accuracy at the sweep budget."""
    chosen, rows = {}, []
    for method in METHODS:
        budget = None if method in ("full", "head") else ctx.experiment.sweep_budget_rank
        scores = {}
        for lr in ctx.experiment.lr_grid[method]:
            runs = [
                _run(ctx, method, budget, _variant_for(method), lr, seed)
                for seed in ctx.experiment.sweep_seeds
            ]
            rows += [
                {**r, "study": "sweep", "setting": f"{METHODS[method]}, lr {lr:g}"} for r in runs
            ]
            scores[lr] = sum(r["val_accuracy"] for r in runs) / len(runs)
        # Ties go to the smaller learning rate (the grids are ascending).
        chosen[method] = max(scores, key=lambda lr: (scores[lr], -lr))
    return chosen, rows


def main_study(ctx: Context, lrs: dict[str, float]) -> list[dict]:
    """Every method at every budget and seed, at its chosen learning rate."""
    rows = []
    for method, label in METHODS.items():
        for budget in _budgets(method, ctx.experiment):
            for seed in ctx.experiment.seeds:
                run = _run(ctx, method, budget, _variant_for(method), lrs[method], seed)
                rows.append({**run, "study": "main", "setting": label})
    return rows


def ablation(ctx: Context, lrs: dict[str, float]) -> list[dict]:
    """FLoRA zero_core (energy ranks) at one budget: kernel ranks, then the scale s."""
    base_variant = FLORA_VARIANTS["flora_energy"]
    settings = [
        (
            f"kernel rank {'full' if k is None else k}",
            dataclasses.replace(base_variant, kernel_rank=k),
        )
        for k in ctx.experiment.ablation_kernel_ranks
    ]
    settings += [
        (f"scale s = {s:g}", dataclasses.replace(base_variant, scale=s))
        for s in ctx.experiment.ablation_scales
    ]
    budget = ctx.experiment.ablation_budget_rank
    rows = []
    for label, variant in settings:
        for seed in ctx.experiment.ablation_seeds:
            run = _run(ctx, "flora_energy", budget, variant, lrs["flora_energy"], seed)
            rows.append({**run, "study": "ablation", "setting": label})
    return rows


def run_experiment(experiment: Experiment, out: Path | None = None) -> dict:
    """Run the whole benchmark; write figure, tables and raw runs to ``out`` if given.

    Returns the summaries (``"main"``, ``"ablation"``, ``"sweep"``), the
    chosen learning rates, the raw rows, the base accuracies and the run time.
    """
    start = time.perf_counter()
    data = load_task()
    base = pretrain(data.source_train, steps=experiment.pretrain_steps)
    ctx = Context(experiment, data, base)
    lrs, sweep_rows = sweep(ctx)
    rows = sweep_rows + main_study(ctx, lrs) + ablation(ctx, lrs)
    summaries = summarize(rows, ctx.n_model)
    result = {
        "summaries": {
            s: [x for x in summaries if x.study == s] for s in ("main", "ablation", "sweep")
        },
        "lrs": lrs,
        "rows": rows,
        "n_model": ctx.n_model,
        "base_source_accuracy": accuracy(base, data.source_test),
        "base_shifted_accuracy": accuracy(base, data.test),
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        _write(out, result)
    return result


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for study, summaries in result["summaries"].items():
        write_csv(out / f"flora_vs_lora_{study}.csv", summaries)
    write_figure(out / "flora_vs_lora.png", result["summaries"]["main"], METHODS)
    meta = {k: v for k, v in result.items() if k != "summaries"}
    meta["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(out / "flora_vs_lora_runs.json", meta)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-size run (seconds)")
    parser.add_argument("--out", type=Path, help="folder for the figure, tables and raw runs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    result = run_experiment(QUICK if args.quick else FULL, args.out)
    print(
        f"base network: {result['n_model']:,} parameters; accuracy upright "
        f"{result['base_source_accuracy']:.3f}, rotated {result['base_shifted_accuracy']:.3f}"
    )
    print(f"chosen learning rates: {result['lrs']}")
    for study in ("main", "ablation", "sweep"):
        print(f"\n{study}\n" + markdown(result["summaries"][study]))
    print(f"\ntotal time: {result['seconds']:.0f} s on {args.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
