"""
Two adapters: switch, route per sample, combine
===============================================

One base network, two tasks: the bundled digits CNN reads upright digits;
one adapter teaches it digits rotated by 90 degrees, another digits flipped
left to right. The adapters live side by side in one model: activate one
(:func:`flora.set_adapter`), send each sample of a batch to its own
(``adapter_names=``), or combine them into a third
(:func:`flora.add_weighted_adapter`).
"""

from importlib.resources import files

import torch
from make_digits_example import DigitsCNN, load_data, rotate
from torch import nn

import flora
import tuckerlib as tl

TASKS = {"rotated": rotate, "flipped": lambda x: torch.flip(x, dims=(3,))}


def pretrained() -> DigitsCNN:
    """The bundled base network (trained on upright digits)."""
    model = DigitsCNN()
    with tl.open_checkpoint(files("tuckerlib") / "data" / "digits_cnn_base.safetensors") as ckpt:
        model.load_state_dict({name: torch.from_numpy(ckpt.read(name)) for name in ckpt})
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    return (model(x, **kwargs).argmax(dim=1) == y).float().mean().item()


def row(label: str, model: nn.Module) -> str:
    """``label``, then the share of each task's test digits ``model`` reads right."""
    return f"{label:10}" + "".join(
        f"{accuracy(model, task(x_test), y_test):10.1%}" for task in TASKS.values()
    )


torch.manual_seed(0)
x_train, x_test, y_train, y_test = load_data()
model = pretrained()

# %%
# One adapter per task
# --------------------
#
# :func:`flora.inject` with a new ``adapter_name`` adds an adapter, inactive;
# :func:`flora.set_adapter` activates it for training.

config = flora.FLoRAConfig(target_modules=["conv2", "conv3", "fc1"], ranks={"Conv2d": (8, 8, 3, 3)})
for name, transform in TASKS.items():
    model = flora.inject(model, config, adapter_name=name)
    model = flora.set_adapter(model, name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = transform(x_train)
    for _ in range(2):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y_train[batch]).backward()
            optimizer.step()
print("adapters:", flora.adapter_names(model))

# %%
# Switch
# ------
#
# Each task's test digits, read by the base network (every adapter
# disabled) and with each adapter active:

print(f"{'active':10}" + "".join(f"{task:>10}" for task in TASKS))
with flora.disable_adapter(model):
    print(row("base", model))
for name in TASKS:
    model = flora.set_adapter(model, name)
    print(row(name, model))

# %%
# Route per sample
# ----------------
#
# A batch that mixes both tasks: ``adapter_names`` names each sample's
# adapter (``"__base__"`` for the base network), as in PEFT. Every sample
# gets the output its own adapter gives.

half = len(x_test) // 2
mixed = torch.cat([rotate(x_test[:half]), torch.flip(x_test[half:], dims=(3,))])
names = ["rotated"] * half + ["flipped"] * (len(x_test) - half)
routed = accuracy(model, mixed, y_test, adapter_names=names)
print(f"mixed batch, each sample routed to its adapter: {routed:.1%} right")

# %%
# Combine
# -------
#
# :func:`flora.add_weighted_adapter` adds an adapter whose update is, on every layer, exactly
# :math:`0.5\, \Delta W_\text{rotated} + 0.5\, \Delta W_\text{flipped}` (a Tucker tensor with both
# cores on its block diagonal). One adapter for both tasks, at some cost on each:

model = flora.add_weighted_adapter(model, ["rotated", "flipped"], [0.5, 0.5], "both")
model = flora.set_adapter(model, "both")
print(
    "ranks of conv3's combined adapter:",
    model.conv3.adapters["both"].spec.ranks,
)
print(row("both", model))
