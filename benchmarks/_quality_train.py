"""One adaptation run: the shared optimizer, schedule, timing and memory accounting.

Every method (full fine-tuning, head only, LoRA, FLoRA, ...) goes through
:func:`train_and_evaluate` with the same Adam optimizer, cosine schedule,
batch size and number of steps; only the set of trainable tensors and the
learning rate differ. :func:`time_steps` times training steps alone, for
the short timing-only runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional

__all__ = [
    "RunResult",
    "Split",
    "Splits",
    "StepTiming",
    "TrainSettings",
    "accuracy",
    "time_steps",
    "train_and_evaluate",
]


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` and labels ``y`` of shape ``(n,)``.

    ``x`` is a tensor whose first axis indexes the items (images), or any
    object that a model accepts and that slices the same way (cached hidden
    states with their mask).
    """

    x: torch.Tensor
    y: torch.Tensor

    def to(self, device: torch.device | str) -> Split:
        """The same split on ``device`` (``x`` needs a ``to`` method of its own)."""
        return Split(self.x.to(device), self.y.to(device))


class Splits(Protocol):
    """The train, validation and test splits of a task."""

    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class TrainSettings:
    """Optimization settings shared by every method of one experiment."""

    steps: int
    batch_size: int = 64
    eval_batch_size: int | None = None


@dataclass(frozen=True)
class RunResult:
    """Accuracies in [0, 1], seconds per training step, and training memory in bytes."""

    val_accuracy: float
    test_accuracy: float
    seconds_per_step: float
    memory_bytes: int


@dataclass(frozen=True)
class StepTiming:
    """Median and spread of the wall time of training steps, and training memory."""

    median_seconds: float
    min_seconds: float
    max_seconds: float
    memory_bytes: int


def accuracy(model: nn.Module, split: Split, batch_size: int | None = None) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly (in chunks of ``batch_size``)."""
    n = split.y.numel()
    size = n if batch_size is None else batch_size
    correct = 0
    with torch.no_grad():
        for start in range(0, n, size):
            predicted = model(split.x[start : start + size]).argmax(dim=1)
            correct += int((predicted == split.y[start : start + size]).sum())
    return correct / n


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


@contextmanager
def _count_saved_tensors(seen: dict[tuple[int, int], int]) -> Iterator[None]:
    """Record, deduplicated by storage, every tensor autograd saves for backward."""

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        seen.setdefault(key, key[1])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _training_memory(model: nn.Module, trainable: list[nn.Parameter], saved: int) -> int:
    # Adam keeps two moments per trainable entry, and every trainable entry has a gradient.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return weights + 3 * trainable_bytes + saved


class _Stepper:
    """Adam steps on minibatches sampled with replacement; counts the first step's memory."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], train: Split, **options):
        self.model, self.trainable, self.train = model, trainable, train
        self.batch_size = options["batch_size"]
        self.optimizer = torch.optim.Adam(trainable, lr=options["lr"])
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=options["steps"]
        )
        self.generator = torch.Generator().manual_seed(options["seed"])
        self.saved: dict[tuple[int, int], int] = {}

    def step(self) -> None:
        # The order comes from a CPU generator on every device: same seed, same minibatches.
        index = torch.randint(self.train.y.numel(), (self.batch_size,), generator=self.generator)
        index = index.to(self.train.y.device)
        x, y = self.train.x[index], self.train.y[index]
        if not self.saved:
            with _count_saved_tensors(self.saved):
                loss = functional.cross_entropy(self.model(x), y)
        else:
            loss = functional.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()

    def memory_bytes(self) -> int:
        parameter_keys = {_storage_key(p) for p in self.model.parameters()}
        saved = sum(n for key, n in self.saved.items() if key not in parameter_keys)
        return _training_memory(self.model, self.trainable, saved)


def train_and_evaluate(
    model: nn.Module,
    trainable: list[nn.Parameter],
    data: Splits,
    settings: TrainSettings,
    *,
    lr: float,
    seed: int,
) -> RunResult:
    """Train ``trainable`` on ``data.train`` and score on ``data.val`` and ``data.test``.

    Adam with a cosine decay from ``lr`` to zero over ``settings.steps``
    minibatch steps, sampled with replacement from a generator seeded by
    ``seed``. Memory is the footprint of one training step: every parameter,
    plus a gradient and two Adam moments per trainable entry, plus the
    tensors autograd saves for backward (counted once per storage, frozen
    weights excluded since they are already counted).
    """
    stepper = _Stepper(
        model,
        trainable,
        data.train,
        lr=lr,
        seed=seed,
        steps=settings.steps,
        batch_size=settings.batch_size,
    )
    model.train()
    start = time.perf_counter()
    for _ in range(settings.steps):
        stepper.step()
    elapsed = time.perf_counter() - start
    model.eval()
    return RunResult(
        val_accuracy=accuracy(model, data.val, settings.eval_batch_size),
        test_accuracy=accuracy(model, data.test, settings.eval_batch_size),
        seconds_per_step=elapsed / settings.steps,
        memory_bytes=stepper.memory_bytes(),
    )


def time_steps(
    model: nn.Module,
    trainable: list[nn.Parameter],
    train: Split,
    *,
    batch_size: int,
    steps: int,
    warmup: int = 3,
) -> StepTiming:
    """Wall time of ``steps`` training steps after ``warmup`` untimed ones (learning rate 1e-4)."""
    stepper = _Stepper(
        model, trainable, train, lr=1e-4, seed=0, steps=warmup + steps, batch_size=batch_size
    )
    model.train()
    for _ in range(warmup):
        stepper.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        stepper.step()
        times.append(time.perf_counter() - start)
    model.eval()
    return StepTiming(
        median_seconds=statistics.median(times),
        min_seconds=min(times),
        max_seconds=max(times),
        memory_bytes=stepper.memory_bytes(),
    )
