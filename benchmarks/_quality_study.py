"""The protocol every accuracy experiment shares: a learning-rate sweep, then seeds.

A :class:`Study` trains each (method, budget, learning rate, seed, variant)
once and caches the result, so the sweep's runs are reused by the main
table. Learning rates are chosen on validation accuracy, never on test
accuracy; ties go to the smaller rate.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from _quality_methods import Adapted
from _quality_train import Split, Splits, TrainSettings, time_steps, train_and_evaluate

__all__ = ["Builder", "Plan", "Study", "time_methods"]

#: ``build(method, budget_rank, seed, variant)`` returns a fresh model ready to train.
Builder = Callable[[str, "int | None", int, Hashable], Adapted]


@dataclass(frozen=True)
class Plan:
    """What one experiment runs: methods, budgets, seeds and learning-rate grids.

    ``methods`` maps a method key to its display name, in table order;
    ``unbudgeted`` methods (full fine-tuning, head only) run once per seed
    instead of once per budget.
    """

    methods: dict[str, str]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    lr_grid: dict[str, tuple[float, ...]]
    sweep_budget: int
    sweep_seeds: tuple[int, ...] = (0,)
    unbudgeted: frozenset[str] = frozenset({"full", "head"})

    def budgets_of(self, method: str) -> tuple[int | None, ...]:
        """The budgets ``method`` runs at (``(None,)`` for an unbudgeted method)."""
        return (None,) if method in self.unbudgeted else self.budgets


@dataclass
class Study:
    """Runs of one experiment on one task, cached by their full description."""

    plan: Plan
    build: Builder
    data: Splits
    settings: TrainSettings
    name: str = ""
    cache: dict[tuple, dict] = field(default_factory=dict)

    def run(
        self, method: str, budget: int | None, lr: float, seed: int, variant: Hashable = None
    ) -> dict:
        """Train one configuration once; identical requests return the cached row."""
        key = (method, budget, variant, lr, seed)
        if key not in self.cache:
            adapted = self.build(method, budget, seed, variant)
            result = train_and_evaluate(
                adapted.model, adapted.trainable, self.data, self.settings, lr=lr, seed=seed
            )
            self.cache[key] = {
                "method": method,
                "budget_rank": budget,
                "lr": lr,
                "seed": seed,
                "n_trainable": adapted.n_trainable,
                "ranks": "; ".join(f"{n} {r}" for n, r in adapted.ranks.items()),
                **dataclasses.asdict(result),
            }
            print(
                f"[{self.name} {len(self.cache):3d}] {method} r={budget} {variant or ''} "
                f"lr={lr:g} seed={seed}: val {result.val_accuracy:.3f}",
                file=sys.stderr,
                flush=True,
            )
        return dict(self.cache[key])

    def sweep(self) -> tuple[dict[str, float], list[dict]]:
        """Pick each method's learning rate by mean validation accuracy at the sweep budget."""
        chosen, rows = {}, []
        for method, label in self.plan.methods.items():
            budget = None if method in self.plan.unbudgeted else self.plan.sweep_budget
            scores = {}
            for lr in self.plan.lr_grid[method]:
                runs = [self.run(method, budget, lr, seed) for seed in self.plan.sweep_seeds]
                rows += [{**r, "study": "sweep", "setting": f"{label}, lr {lr:g}"} for r in runs]
                scores[lr] = sum(r["val_accuracy"] for r in runs) / len(runs)
            chosen[method] = max(scores, key=lambda lr: (scores[lr], -lr))
        return chosen, rows

    def main(self, lrs: dict[str, float]) -> list[dict]:
        """Every method at every budget and seed, at its chosen learning rate."""
        rows = []
        for method, label in self.plan.methods.items():
            for budget in self.plan.budgets_of(method):
                for seed in self.plan.seeds:
                    run = self.run(method, budget, lrs[method], seed)
                    rows.append({**run, "study": "main", "setting": label})
        return rows


def time_methods(
    plan: Plan, build: Builder, train: Split, *, batch_size: int, steps: int
) -> list[dict]:
    """Step time and training memory of every method of ``plan`` at its sweep budget (seed 0)."""
    rows = []
    for method, label in plan.methods.items():
        budget = None if method in plan.unbudgeted else plan.sweep_budget
        adapted = build(method, budget, 0, None)
        timing = time_steps(
            adapted.model, adapted.trainable, train, batch_size=batch_size, steps=steps
        )
        row = {"setting": label, "budget_rank": budget, "n_trainable": adapted.n_trainable}
        rows.append({**row, **dataclasses.asdict(timing)})
    return rows
