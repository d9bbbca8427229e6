"""
FLoRA on a convolutional network
================================

A CNN that reads handwritten digits (the network of the bundled
``tuckerlib analyze`` example, 99% right on upright digits) is adapted to
digits rotated by 90 degrees, which it reads about 10% right. Each adapted
convolution gets a FLoRA adapter whose update is a 4-way Tucker tensor
``(out, in, kh, kw)``: a small core and one factor per mode, the kernel's
spatial structure kept.
"""

from importlib.resources import files

import torch
from make_digits_example import DigitsCNN, load_data, rotate
from torch import nn

import flora
import tuckerlib as tl


def pretrained() -> DigitsCNN:
    """The bundled base network (trained on upright digits)."""
    model = DigitsCNN()
    with tl.open_checkpoint(files("tuckerlib") / "data" / "digits_cnn_base.safetensors") as ckpt:
        model.load_state_dict({name: torch.from_numpy(ckpt.read(name)) for name in ckpt})
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


torch.manual_seed(0)
x_train, x_test, y_train, y_test = load_data()
x_train, x_test = rotate(x_train), rotate(x_test)
model = pretrained()
print(f"base network on rotated digits: {accuracy(model, x_test, y_test):.1%} right")

# %%
# Inject
# ------
#
# The two wider convolutions and the first linear layer get adapters. A
# convolution's ranks are ``(out, in, kh, kw)`` ranks; ``rank_pattern`` gives
# a layer its own. The batch-norm layer is part of the frozen base.

config = flora.FLoRAConfig(
    target_modules=["conv2", "conv3", "fc1"],
    ranks={"Conv2d": (8, 8, 3, 3), "Linear": 8},
    rank_pattern={"conv3": (16, 8, 3, 3)},
)
model = flora.inject(model, config)
print(flora.summary(model))

# %%
# Train
# -----
#
# A plain loop over the trainable parameters (the adapters). ``model.eval()``
# keeps the frozen batch-norm statistics as they are.

optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for epoch in range(3):
    for batch in torch.randperm(len(x_train)).split(64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        optimizer.step()
    print(f"epoch {epoch}: {accuracy(model, x_test, y_test):.1%} of rotated test digits right")

# %%
# Merge
# -----
#
# :func:`flora.unload` with ``merge=True`` folds each update into its kernel
# and gives back plain ``nn.Conv2d`` and ``nn.Linear`` layers: the network
# is the original architecture again, adapted.

adapted = accuracy(model, x_test, y_test)
model = flora.unload(model, merge=True)
print(
    type(model.conv3).__name__,
    f"{accuracy(model, x_test, y_test):.1%} right after merging ({adapted:.1%} before)",
)
