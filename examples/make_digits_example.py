"""Make the example checkpoint pair that ``tuckerlib analyze`` runs on by default.

A small CNN (three convolutions, two linear layers) is trained on
scikit-learn's handwritten digits (bundled with scikit-learn; nothing is
downloaded), then fully fine-tuned on a shifted task: the same digits rotated
by 90 degrees. The weights before and after fine-tuning are written as
safetensors; ``tuckerlib analyze`` reports the rank structure of their
difference.

Run from the repository root (about ten seconds on one CPU core)::

    python examples/make_digits_example.py            # rewrites tuckerlib/data/
    python examples/make_digits_example.py --out /tmp/digits --epochs 2

Everything is seeded and runs on one thread, so a given PyTorch build on a
given machine reproduces every tensor bit for bit (only the order of the
metadata entries in the file header may differ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

DATA_DIR = Path(__file__).resolve().parent.parent / "tuckerlib" / "data"
SEED = 0


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two linear layers for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.norm2(self.conv2(x))))
        x = self.pool(torch.relu(self.conv3(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digit images scaled to [0, 1] with a fixed train/test split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_train),
        torch.from_numpy(y_test),
    )


def rotate(images: torch.Tensor) -> torch.Tensor:
    """The shifted task: every image rotated by 90 degrees."""
    return torch.rot90(images, 1, dims=(2, 3)).contiguous()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    """Full training with Adam, mini-batches in a seeded order."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correctly classified images."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for each phase")
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = load_data()

    model = DigitsCNN()
    train(model, x_train, y_train, args.epochs, lr=2e-3)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {
        "base_accuracy_upright": accuracy(model, x_test, y_test),
        "base_accuracy_rotated": accuracy(model, rotate(x_test), y_test),
    }

    train(model, rotate(x_train), y_train, args.epochs, lr=1e-3)
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    scores["tuned_accuracy_rotated"] = accuracy(model, rotate(x_test), y_test)

    description = (
        "DigitsCNN (examples/make_digits_example.py): base trained on scikit-learn digits, "
        "tuned = base fully fine-tuned on the digits rotated by 90 degrees"
    )
    metadata = {"description": description, "epochs": str(args.epochs)}
    metadata.update({k: f"{v:.4f}" for k, v in scores.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(base, args.out / "digits_cnn_base.safetensors", metadata=metadata)
    save_file(tuned, args.out / "digits_cnn_tuned.safetensors", metadata=metadata)
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
