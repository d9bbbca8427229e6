"""One adaptation run: the shared optimizer, schedule, timing and memory accounting.

Every method (full fine-tuning, head only, LoRA, FLoRA) goes through
:func:`train_and_evaluate` with the same Adam optimizer, cosine schedule,
batch size and number of steps; only the set of trainable tensors and the
learning rate differ.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from _quality_setup import Split, TaskData
from torch import nn
from torch.nn import functional

__all__ = ["RunResult", "TrainSettings", "accuracy", "train_and_evaluate"]


@dataclass(frozen=True)
class TrainSettings:
    """Optimization settings shared by every method."""

    steps: int
    batch_size: int = 64


@dataclass(frozen=True)
class RunResult:
    """Accuracies in [0, 1], seconds per epoch of training, and training memory in bytes."""

    val_accuracy: float
    test_accuracy: float
    seconds_per_epoch: float
    memory_bytes: int


def accuracy(model: nn.Module, split: Split) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly."""
    with torch.no_grad():
        predicted = model(split.x).argmax(dim=1)
    return float((predicted == split.y).float().mean())


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


def train_and_evaluate(
    model: nn.Module,
    trainable: list[nn.Parameter],
    data: TaskData,
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
    optimizer = torch.optim.Adam(trainable, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    generator = torch.Generator().manual_seed(seed)
    parameter_keys = {_storage_key(p) for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        index = torch.randint(data.train.y.numel(), (settings.batch_size,), generator=generator)
        if step == 0:
            with _count_saved_tensors(saved):
                loss = functional.cross_entropy(model(data.train.x[index]), data.train.y[index])
        else:
            loss = functional.cross_entropy(model(data.train.x[index]), data.train.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    elapsed = time.perf_counter() - start
    model.eval()
    epochs = settings.steps * settings.batch_size / data.train.y.numel()
    saved_bytes = sum(n for key, n in saved.items() if key not in parameter_keys)
    return RunResult(
        val_accuracy=accuracy(model, data.val),
        test_accuracy=accuracy(model, data.test),
        seconds_per_epoch=elapsed / epochs,
        memory_bytes=_training_memory(model, trainable, saved_bytes),
    )
