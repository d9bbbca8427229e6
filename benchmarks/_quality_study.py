"""The protocol every accuracy experiment shares: a learning rate per method and budget, then seeds.

For each (method, budget) cell a :class:`Study`

1. trains every rate of the method's grid on the sweep seeds and scores each
   rate by its mean validation accuracy;
2. extends the grid by one rung of the 1-3-10 ladder past whichever end
   scored best, until the best rate is inside the grid: the grid ends where
   accuracy degrades on both sides (at most ``max_extensions`` steps per
   side);
3. breaks ties (rates within one validation item of the best) by the mean
   validation accuracy over *all* seeds, then by the larger rate;
4. trains every seed at the chosen rate.

Learning rates are never chosen on test accuracy. Every run is cached by its
full description, so the sweep's runs are reused by the main table. The runs
of one round (every cell's next requests) go to a pool of ``jobs`` worker
processes, each on the parent's torch thread count; results do not depend
on ``jobs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import multiprocessing.pool
import sys
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from _quality_methods import Adapted
from _quality_train import Split, Splits, TrainSettings, time_steps, train_and_evaluate

__all__ = ["Builder", "Cell", "Plan", "Study", "progress_log", "time_methods"]

#: ``build(method, budget_rank, seed, variant)`` returns a fresh model ready to train.
Builder = Callable[[str, "int | None", int, Hashable], Adapted]

#: One training run: (method, budget, variant, learning rate, seed).
Job = tuple[str, "int | None", Hashable, float, int]


@dataclass(frozen=True)
class Plan:
    """What one experiment runs: methods, budgets, seeds and starting learning-rate grids.

    ``methods`` maps a method key to its display name, in table order;
    ``unbudgeted`` methods (full fine-tuning, head only) run once per seed
    instead of once per budget. ``lr_grid`` gives each method's starting grid,
    evenly spaced on a log scale; the sweep extends it (see the module notes).
    """

    methods: dict[str, str]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    lr_grid: dict[str, tuple[float, ...]]
    sweep_seeds: tuple[int, ...] = (0,)
    max_extensions: int = 3
    unbudgeted: frozenset[str] = frozenset({"full", "head"})

    def budgets_of(self, method: str) -> tuple[int | None, ...]:
        """The budgets ``method`` runs at (``(None,)`` for an unbudgeted method)."""
        return (None,) if method in self.unbudgeted else self.budgets


@dataclass
class Cell:
    """The learning-rate search of one (method, budget, variant)."""

    method: str
    budget: int | None
    variant: Hashable
    grid: list[float]
    extended: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    chosen: float | None = None

    def job(self, lr: float, seed: int) -> Job:
        """The run of this cell at ``lr`` and ``seed``."""
        return (self.method, self.budget, self.variant, lr, seed)


def ladder_step(lr: float, *, up: bool) -> float:
    """The next rate of the 1-3-10 ladder above (``up``) or below ``lr``.

    >>> ladder_step(1e-2, up=True), ladder_step(3e-2, up=True), ladder_step(1e-3, up=False)
    (0.03, 0.1, 0.0003)
    """
    exponent = math.floor(math.log10(lr) + 1e-9)
    rungs = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    if up:
        return round(min(r for r in rungs if r > lr * (1 + 1e-9)), 12)
    return round(max(r for r in rungs if r < lr * (1 - 1e-9)), 12)


def _mean_val(cache: dict[Job, dict], jobs: Iterable[Job]) -> float:
    runs = [cache[j]["val_accuracy"] for j in jobs]
    return sum(runs) / len(runs)


def next_requests(cell: Cell, plan: Plan, cache: dict[Job, dict], tie: float) -> set[Job]:
    """The runs ``cell`` needs before its next decision; empty once its seeds are all trained.

    Decides (extends the grid, picks the rate) whenever the runs it needs are
    in ``cache``; ``tie`` is the validation-accuracy margin of a tie.
    """
    while cell.chosen is None:
        missing = {cell.job(lr, s) for lr in cell.grid for s in plan.sweep_seeds} - cache.keys()
        if missing:
            return missing
        scores = {
            lr: _mean_val(cache, (cell.job(lr, s) for s in plan.sweep_seeds)) for lr in cell.grid
        }
        best = max(scores.values())
        if scores[cell.grid[-1]] == best and cell.extended["up"] < plan.max_extensions:
            cell.extended["up"] += 1
            cell.grid.append(ladder_step(cell.grid[-1], up=True))
            continue
        if scores[cell.grid[0]] == best and cell.extended["down"] < plan.max_extensions:
            cell.extended["down"] += 1
            cell.grid.insert(0, ladder_step(cell.grid[0], up=False))
            continue
        tied = [lr for lr in cell.grid if scores[lr] >= best - tie]
        everyone = {cell.job(lr, s) for lr in tied for s in plan.seeds} if len(tied) > 1 else set()
        if everyone - cache.keys():
            return everyone - cache.keys()
        if len(tied) == 1:
            cell.chosen = tied[0]
        else:
            means = {lr: _mean_val(cache, (cell.job(lr, s) for s in plan.seeds)) for lr in tied}
            cell.chosen = max(tied, key=lambda lr: (means[lr], lr))
    return {cell.job(cell.chosen, s) for s in plan.seeds} - cache.keys()


def _install(study: Study | Callable[[], Study]) -> None:
    # Runs once in each worker: a forked worker gets its own copy of the
    # study, a spawned one rebuilds it from its recipe.
    torch.set_num_threads(1)
    globals()["_worker_study"] = study if isinstance(study, Study) else study()


def _run_in_worker(job: Job) -> tuple[Job, dict]:
    return job, globals()["_worker_study"].train(job)


@dataclass
class Study:
    """Runs of one experiment on one task, cached by their full description."""

    plan: Plan
    build: Builder
    data: Splits
    settings: TrainSettings
    name: str = ""
    jobs: int = 1
    #: An append-only record of finished runs (JSON lines): runs found there
    #: are not trained again, so a killed study resumes where it stopped.
    log: Path | None = None
    #: What a run's result depends on beyond its job (the experiment's sizes
    #: and settings, as a string): a logged run recorded under another key
    #: is trained again, so a resumed study never mixes two experiments.
    key: str = ""
    #: Where runs train: ``"cpu"`` or an accelerator such as ``"cuda"``.
    device: str = "cpu"
    #: How a fresh process rebuilds this study (a picklable callable), for
    #: workers on an accelerator: those are spawned, not forked, since a
    #: parent that touched CUDA (a library's availability check is enough)
    #: cannot fork workers that use it.
    recipe: Callable[[], Study] | None = None
    cache: dict[Job, dict] = field(default_factory=dict)
    _logged: dict[str, dict] = field(default_factory=dict)
    _moved: dict[str, Split] = field(default_factory=dict)
    _pool: multiprocessing.pool.Pool | None = None

    def __enter__(self) -> Study:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def _workers(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            if self.device == "cpu":
                # Forked workers inherit the pretrained base and the data.
                context, study = multiprocessing.get_context("fork"), self
            elif self.recipe is None:
                raise ValueError(f"workers on {self.device!r} need the study's recipe")
            else:
                context, study = multiprocessing.get_context("spawn"), self.recipe
            self._pool = context.Pool(self.jobs, initializer=_install, initargs=(study,))
        return self._pool

    def __post_init__(self) -> None:
        if self.log is None or not self.log.exists():
            return
        text = self.log.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            # A study killed mid-write leaves a partial last line: drop it (that
            # run trains again) before anything is appended after it.
            text = text[: text.rfind("\n") + 1]
            self.log.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            entry = json.loads(line)
            if entry.get("key") == self.key:
                self._logged[entry["job"]] = entry["row"]

    def _data(self) -> Splits:
        if self.device == "cpu":
            return self.data
        if not self._moved:
            # Accelerator runs keep float32 arithmetic (no TF32) and deterministic kernels.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = False
            for name in ("train", "val", "test"):
                self._moved[name] = getattr(self.data, name).to(self.device)
        return SimpleNamespace(**self._moved)

    def train(self, job: Job) -> dict:
        """Train one configuration (no cache) on ``self.device`` and return its row.

        The model is built on the CPU (so its initialization is the CPU's)
        and then moved.
        """
        method, budget, variant, lr, seed = job
        adapted = self.build(method, budget, seed, variant)
        adapted.model.to(self.device)
        result = train_and_evaluate(
            adapted.model, adapted.trainable, self._data(), self.settings, lr=lr, seed=seed
        )
        return {
            "method": method,
            "budget_rank": budget,
            "lr": lr,
            "seed": seed,
            "n_trainable": adapted.n_trainable,
            "ranks": "; ".join(f"{n} {r}" for n, r in adapted.ranks.items()),
            **dataclasses.asdict(result),
        }

    def _record(self, job: Job, row: dict) -> None:
        self.cache[job] = row
        if self.log is not None and repr(job) not in self._logged:
            with self.log.open("a", encoding="utf-8") as handle:
                entry = {"key": self.key, "job": repr(job), "row": row}
                handle.write(json.dumps(entry) + "\n")
        method, budget, variant, lr, seed = job
        print(
            f"[{self.name} {len(self.cache):3d}] {method} r={budget} {variant or ''} "
            f"lr={lr:g} seed={seed}: val {row['val_accuracy']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    def run_all(self, jobs: Iterable[Job]) -> None:
        """Train every job not yet cached, on ``self.jobs`` worker processes."""
        todo = sorted(set(jobs) - self.cache.keys(), key=repr)
        for job in [j for j in todo if repr(j) in self._logged]:
            self._record(job, self._logged[repr(job)])
        todo = [j for j in todo if j not in self.cache]
        if not todo:
            return
        if self.jobs <= 1:
            for job in todo:
                self._record(job, self.train(job))
            return
        # Each run seeds itself: its result does not depend on which worker ran it.
        for job, row in self._workers().imap_unordered(_run_in_worker, todo):
            self._record(job, row)

    def run(
        self, method: str, budget: int | None, lr: float, seed: int, variant: Hashable = None
    ) -> dict:
        """Train one configuration once; identical requests return the cached row."""
        job = (method, budget, variant, lr, seed)
        self.run_all([job])
        return dict(self.cache[job])

    def choose(self, cells: list[Cell]) -> None:
        """Pick every cell's learning rate and train its seeds, all cells' runs in rounds."""
        tie = 1.0 / self.data.val.y.numel()
        while True:
            requests = set().union(*(next_requests(c, self.plan, self.cache, tie) for c in cells))
            if not requests:
                return
            self.run_all(requests)

    def cells(self, variant: Hashable = None) -> list[Cell]:
        """One cell per method and budget of the plan."""
        return [
            Cell(method, budget, variant, sorted(self.plan.lr_grid[method]))
            for method in self.plan.methods
            for budget in self.plan.budgets_of(method)
        ]

    def main(self) -> tuple[dict[tuple[str, int | None], float], list[dict]]:
        """Every method at every budget and seed, at the rate chosen for that budget.

        Returns the chosen rates by (method, budget) and the rows: the sweep's
        (study ``"sweep"``, every rate tried) and the main table's.
        """
        cells = self.cells()
        self.choose(cells)
        sweep, main = [], []
        for cell in cells:
            label = self.plan.methods[cell.method]
            for lr in cell.grid:
                for seed in self.plan.seeds:
                    job = cell.job(lr, seed)
                    if job in self.cache:
                        setting = f"{label}, lr {lr:g}"
                        sweep.append({**self.cache[job], "study": "sweep", "setting": setting})
            for seed in self.plan.seeds:
                run = self.cache[cell.job(cell.chosen, seed)]
                main.append({**run, "study": "main", "setting": label})
        chosen = {(c.method, c.budget): c.chosen for c in cells}
        return chosen, sweep + main


def progress_log(out: Path | None, prefix: str) -> Path | None:
    """Where a study writing to ``out`` records its finished runs (``None`` without ``out``).

    ``write_study`` removes it once the study's tables are written, so only
    an interrupted study leaves one behind, and its next run resumes from it.
    """
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{prefix}_progress.jsonl"


def time_methods(
    plan: Plan, build: Builder, train: Split, *, budget: int, batch_size: int, steps: int
) -> list[dict]:
    """Step time and training memory of every method of ``plan`` at ``budget`` (seed 0)."""
    rows = []
    for method, label in plan.methods.items():
        at = None if method in plan.unbudgeted else budget
        adapted = build(method, at, 0, None)
        timing = time_steps(
            adapted.model, adapted.trainable, train, batch_size=batch_size, steps=steps
        )
        row = {"setting": label, "budget_rank": at, "n_trainable": adapted.n_trainable}
        rows.append({**row, **dataclasses.asdict(timing)})
    return rows
