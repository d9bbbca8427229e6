"""Quantized bitsandbytes bases and the checks the bitsandbytes tests share, on any device.

bitsandbytes is imported inside the functions, so that test modules skip
cleanly (``pytest.importorskip``) where it is not installed.
"""

from __future__ import annotations

import torch
from torch import nn

import flora

__all__ = [
    "IN",
    "MODES",
    "OUT",
    "QUANTS",
    "quantized_base",
    "randomize",
    "run",
    "same_bytes",
    "snapshot",
    "step",
]

QUANTS = ["nf4", "fp4", "int8"]
MODES = ["train", "eval"]
IN, OUT = 128, 64


def quantized_base(
    quant: str, *, seed: int = 0, bias: bool = True, device: str = "cpu"
) -> nn.Module:
    """A quantized Linear holding the weights of a seeded ``nn.Linear(IN, OUT)``, on ``device``."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    if quant == "int8":
        base = bnb.nn.Linear8bitLt(IN, OUT, bias=bias, has_fp16_weights=False)
    else:
        base = bnb.nn.Linear4bit(IN, OUT, bias=bias, quant_type=quant, compute_dtype=torch.float32)
    base.load_state_dict(linear.state_dict())
    return base.to(device)  # quantizes


def randomize(layer: flora.AdaptedWeight, std: float = 0.05, seed: int = 1) -> None:
    """Seeded random core and factors, the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.core, *layer.factors):
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def run(model: nn.Module, mode: str, x: torch.Tensor) -> torch.Tensor:
    """A forward in ``mode`` without gradients (what lets bitsandbytes repack)."""
    model.train(mode == "train")
    with torch.no_grad():
        return model(x)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_bytes(module: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """Whether ``module``'s state dict has the keys, dtypes and values of ``saved``."""
    state = module.state_dict()
    return state.keys() == saved.keys() and all(
        state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in saved.items()
    )


def step(quant: str, weight: torch.Tensor) -> torch.Tensor:
    """Per entry, the largest rounding error quantizing ``weight`` can make: half a grid gap.

    4-bit: the widest gap between the codes of the type, times each block's
    absolute maximum (blocks of 64 along the flattened weight); int8: each
    row's absolute maximum over 127. 10% more for the nested (8-bit) block
    scales and the float16 cast of int8 quantization.
    """
    import bitsandbytes as bnb

    if quant == "int8":
        return 1.1 * 0.5 * weight.abs().amax(dim=1, keepdim=True) / 127 + 0 * weight
    codes = bnb.functional.get_4bit_type(quant, device="cpu").sort().values
    gap = float((codes[1:] - codes[:-1]).max())
    blocks = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    return (1.1 * 0.5 * gap * blocks).expand(-1, 64).reshape(weight.shape)
