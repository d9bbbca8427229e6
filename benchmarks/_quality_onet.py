"""Pretrained vision base: MTCNN's O-Net, adapted from faces to handwritten digits.

The weights are the ``onet.pt`` state dict that ships inside the
``facenet-pytorch`` wheel on PyPI (install it with ``--no-deps``: only the
file is read, the package is never imported, so its pins on an old torch do
not matter). They are read with ``torch.load(weights_only=True)``, which
loads tensors and never unpickles code. The network is rebuilt here from the
state dict's names and shapes; what the state dict does not record (the
pooling after the first three convolutions and the channel-last flatten
before ``dense5``, both from the MTCNN architecture, Zhang et al. 2016) is
checked against ``dense5``'s input size.

The task is scikit-learn's bundled ``digits`` (1,797 grey 8x8 images),
upsampled bilinearly to O-Net's 48x48 input, repeated over the three colour
channels and normalized as MTCNN normalizes its face crops. O-Net's three
output layers (face / box / landmarks) are dropped and a new 10-class head
on its 256-wide ``dense5`` features is trained by every method.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _quality_train import Split
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional

__all__ = [
    "ONET_SHAPES",
    "ONET_TARGETS",
    "DigitsTask",
    "ONetClassifier",
    "load_digits48",
    "onet_state_dict",
    "pretrained_onet",
    "standin_onet_state",
]

#: The layers every adapter method adapts (the new head is trained in full by all).
ONET_TARGETS = ("conv1", "conv2", "conv3", "conv4", "dense5")

#: Pooling (kernel, stride) after conv1, conv2 and conv3, with ceil_mode (MTCNN's O-Net).
_POOLS = ((3, 2), (3, 2), (2, 2))
_SIZE = 48
_SPLIT_SEED = 0
_N_TEST = 400
_N_VAL = 200


@dataclass(frozen=True)
class DigitsTask:
    """Train, validation and test splits: images ``(n, 3, 48, 48)``, labels ``(n,)``."""

    train: Split
    val: Split
    test: Split


def onet_state_dict() -> dict[str, torch.Tensor]:
    """O-Net's pretrained tensors from the installed ``facenet-pytorch`` distribution.

    Raises
    ------
    FileNotFoundError
        If the distribution (or its ``onet.pt``) is not installed.
    """
    try:
        dist = importlib.metadata.distribution("facenet-pytorch")
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            "facenet-pytorch is not installed: pip install --no-deps facenet-pytorch==2.6.0"
        ) from error
    path = Path(dist.locate_file("facenet_pytorch/data/onet.pt"))
    return dict(torch.load(path, map_location="cpu", weights_only=True))


class ONetClassifier(nn.Module):
    """O-Net's trunk (four convolutions with PReLU, ``dense5``) and a new linear head.

    Built from a state dict's names and shapes: ``conv{i}.weight`` of shape
    ``(out, in, kh, kw)`` for i = 1..4, ``prelu{i}.weight`` of shape
    ``(channels,)``, ``dense5.weight`` of shape ``(features, 1152)``.
    """

    def __init__(self, state: dict[str, torch.Tensor], n_classes: int = 10):
        super().__init__()
        n_convs = len([k for k in state if re.fullmatch(r"conv\d+\.weight", k)])
        for i in range(1, n_convs + 1):
            out, inp, kh, kw = state[f"conv{i}.weight"].shape
            self.add_module(f"conv{i}", nn.Conv2d(inp, out, (kh, kw)))
            self.add_module(f"prelu{i}", nn.PReLU(state[f"prelu{i}.weight"].numel()))
        features, flat = state["dense5.weight"].shape
        self.dense5 = nn.Linear(flat, features)
        self.prelu5 = nn.PReLU(state["prelu5.weight"].numel())
        self.head = nn.Linear(features, n_classes)
        self.n_convs = n_convs
        trunk = self._trunk(torch.zeros(1, state["conv1.weight"].shape[1], _SIZE, _SIZE))
        if trunk.shape[1] != flat:
            raise ValueError(
                f"dense5 expects {flat} inputs, the convolutions give {trunk.shape[1]}"
            )

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_convs + 1):
            x = self.get_submodule(f"prelu{i}")(self.get_submodule(f"conv{i}")(x))
            if i <= len(_POOLS):
                kernel, stride = _POOLS[i - 1]
                x = functional.max_pool2d(x, kernel, stride, ceil_mode=True)
        # The weights come from Caffe, whose flatten order is (width, height, channel).
        return x.permute(0, 3, 2, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(batch, n_classes)`` for normalized images ``(batch, 3, 48, 48)``."""
        return self.head(self.prelu5(self.dense5(self._trunk(x))))


def pretrained_onet(state: dict[str, torch.Tensor], seed: int = 0) -> ONetClassifier:
    """O-Net with the pretrained trunk of ``state`` and a new head initialized with ``seed``."""
    torch.manual_seed(seed)
    model = ONetClassifier(state)
    trunk = {k: v for k, v in state.items() if not k.startswith("dense6")}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise ValueError(f"O-Net state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _images48(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images[:, None].astype(np.float32) / 16.0)
    x = functional.interpolate(x, size=(_SIZE, _SIZE), mode="bilinear", align_corners=False)
    # MTCNN feeds (pixel - 127.5) / 128 for pixels in [0, 255].
    return ((x * 255.0 - 127.5) / 128.0).expand(-1, 3, -1, -1).contiguous()


def load_digits48(n_train: int | None = None, n_eval: int | None = None) -> DigitsTask:
    """The digits as 48x48 three-channel images, split once (seed 0).

    400 test and 200 validation images; the remaining 1,197 for training.
    ``n_train`` keeps the first training images only, ``n_eval`` the first
    validation and test images (smoke runs).
    """
    digits = load_digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(digits.target.size)
    test, val, train = np.split(order, [_N_TEST, _N_TEST + _N_VAL])
    train, val, test = train[:n_train], val[:n_eval], test[:n_eval]

    def split(index: np.ndarray) -> Split:
        return Split(_images48(digits.images[index]), torch.from_numpy(digits.target[index]))

    return DigitsTask(split(train), split(val), split(test))


#: Names and shapes of O-Net's tensors in ``onet.pt`` (for :func:`standin_onet_state`).
ONET_SHAPES = {
    "conv1.weight": (32, 3, 3, 3),
    "conv1.bias": (32,),
    "prelu1.weight": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "prelu2.weight": (64,),
    "conv3.weight": (64, 64, 3, 3),
    "conv3.bias": (64,),
    "prelu3.weight": (64,),
    "conv4.weight": (128, 64, 2, 2),
    "conv4.bias": (128,),
    "prelu4.weight": (128,),
    "dense5.weight": (256, 1152),
    "dense5.bias": (256,),
    "prelu5.weight": (256,),
    "dense6_1.weight": (2, 256),
    "dense6_1.bias": (2,),
}


def standin_onet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with O-Net's names and shapes: the smoke tests' stand-in for ``onet.pt``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        for name, shape in ONET_SHAPES.items()
    }
