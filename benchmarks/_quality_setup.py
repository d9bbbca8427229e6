"""Data and base network of the FLoRA-vs-LoRA quality benchmark.

The data is scikit-learn's bundled ``digits`` set (1,797 grey 8x8 images,
no download). The source task is the images as they are; the shifted task
is the same digits rotated by 90 degrees, which a frozen upright-digit
feature extractor cannot read off with its head alone, so the convolutions
must change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from _quality_train import Split
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional

__all__ = [
    "TARGET_MODULES",
    "DigitsCNN",
    "TaskData",
    "load_task",
    "pretrain",
]

#: The layers every adapter method adapts (all convolutions and the head).
TARGET_MODULES = ("conv1", "conv2", "conv3", "head")

_SPLIT_SEED = 0
_N_TEST = 400
_N_VAL = 200


@dataclass(frozen=True)
class TaskData:
    """Source-task (upright) splits and the shifted task's train/validation/test splits.

    Images have shape ``(n, 1, 8, 8)`` with values in [0, 1].

    The validation and test images are held out of pretraining and of
    adaptation; the learning rate is chosen on ``val``, never on ``test``.
    """

    source_train: Split
    source_test: Split
    train: Split
    val: Split
    test: Split


def _rotate(images: np.ndarray) -> np.ndarray:
    # np.rot90 is an exact permutation of pixels: no interpolation blur.
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.copy()))


def load_task() -> TaskData:
    """Load the digits and build the fixed source/shifted splits (seed 0)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(labels.size)
    test, val, train = np.split(order, [_N_TEST, _N_TEST + _N_VAL])
    return TaskData(
        source_train=_split(images[train], labels[train]),
        source_test=_split(images[test], labels[test]),
        train=_split(_rotate(images[train]), labels[train]),
        val=_split(_rotate(images[val]), labels[val]),
        test=_split(_rotate(images[test]), labels[test]),
    )


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and a linear head for 8x8 digits (about 56k parameters)."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), n_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.head = nn.Linear(c3, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of shape ``(batch, n_classes)`` for images ``(batch, 1, 8, 8)``."""
        x = functional.relu(self.conv1(x))
        x = functional.max_pool2d(functional.relu(self.conv2(x)), 2)
        x = functional.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


def pretrain(data: Split, *, steps: int, batch_size: int = 64, lr: float = 3e-3) -> DigitsCNN:
    """Train a :class:`DigitsCNN` on the source task (seed 0) and return it in eval mode."""
    torch.manual_seed(_SPLIT_SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    for _ in range(steps):
        index = torch.randint(data.y.numel(), (batch_size,), generator=generator)
        loss = functional.cross_entropy(model(data.x[index]), data.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
