"""
Export to LoRA, import from LoRA
================================

Serving stacks and model hubs load LoRA adapters in PEFT's format. Every
FLoRA update is a LoRA update of a known rank, and every LoRA update is a
Tucker tensor, so adapters cross over exactly both ways:
:func:`flora.export_lora` writes a FLoRA adapter as a PEFT LoRA directory,
:func:`flora.import_lora` reads a PEFT LoRA directory into FLoRA adapters.
The network is the bundled digits CNN; the adapters learn rotated digits.
"""

import tempfile
import warnings
from importlib.resources import files
from pathlib import Path

import peft
import torch
from make_digits_example import DigitsCNN, load_data, rotate
from torch import nn

import flora
import tuckerlib as tl

# peft 0.21 asks transformers 5 for an attribute that transformers has renamed.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)


def pretrained() -> DigitsCNN:
    """The bundled base network (trained on upright digits)."""
    model = DigitsCNN()
    with tl.open_checkpoint(files("tuckerlib") / "data" / "digits_cnn_base.safetensors") as ckpt:
        model.load_state_dict({name: torch.from_numpy(ckpt.read(name)) for name in ckpt})
    return model.eval()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """One epoch of Adam on the trainable parameters."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in torch.randperm(len(x)).split(64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model


torch.manual_seed(0)
x_train, x_test, y_train, _ = load_data()
x_train, x_test = rotate(x_train), rotate(x_test)
workdir = Path(tempfile.mkdtemp())

# %%
# FLoRA to LoRA
# -------------
#
# A FLoRA adapter on two convolutions and a linear layer, trained for one
# epoch, then written as a PEFT LoRA adapter. ``peft`` loads it onto the
# base network like any LoRA adapter, and gives the same outputs.

config = flora.FLoRAConfig(target_modules=["conv2", "conv3", "fc1"], ranks={"Conv2d": (8, 8, 3, 3)})
model = train(flora.inject(pretrained(), config), x_train, y_train)
lora = flora.export_lora(model, workdir / "lora")
print("PEFT adapter files:", sorted(p.name for p in lora.iterdir()))

served = peft.PeftModel.from_pretrained(pretrained(), lora).eval()
print(
    "LoRA ranks:",
    served.peft_config["default"].rank_pattern or served.peft_config["default"].r,
)
with torch.no_grad():
    difference = (served(x_test) - model(x_test)).abs().max().item()
print(f"largest difference of PEFT's outputs from FLoRA's: {difference:.1e}")

# %%
# LoRA to FLoRA
# -------------
#
# The other way round: a LoRA adapter trained with ``peft`` and saved with
# ``save_pretrained`` becomes a named FLoRA adapter, beside the one already
# there. Each LoRA pair becomes a Tucker tensor (for a convolution, LoRA's
# ``lora_A`` kernel is the core).

lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv2", "conv3", "fc1"])
peft_model = train(peft.get_peft_model(pretrained(), lora_config), x_train, y_train).eval()
peft_model.save_pretrained(workdir / "peft-trained")

model = flora.import_lora(model, workdir / "peft-trained", adapter_name="from_peft")
model = flora.set_adapter(model, "from_peft")
print("adapters:", flora.adapter_names(model))
for name, layer in flora.adapted_layers(model).items():
    print(f"  {name}: Tucker ranks {layer.adapters['from_peft'].spec.ranks}")
with torch.no_grad():
    difference = (model(x_test) - peft_model(x_test)).abs().max().item()
print(f"largest difference of FLoRA's outputs from PEFT's: {difference:.1e}")

# %%
# :doc:`/lora_adapters` derives both conversions and covers bias updates,
# grouped convolutions and embeddings.
