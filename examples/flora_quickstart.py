"""FLoRA quickstart: adapt a small CNN on scikit-learn's digits, then merge, save, load, unload.

Run with ``python examples/flora_quickstart.py``; it takes a few seconds on a CPU.
"""

from __future__ import annotations

import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn

import flora


def make_model() -> nn.Sequential:
    """A small CNN with a grouped (depthwise) convolution."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )


def main() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = make_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    config = flora.FLoRAConfig(ranks={"Linear": 4}, scale=1.0, target_modules=["0", "2", "5"])
    flora.inject(model, config)
    print("trainable parameters:", flora.trainable_parameters(model))

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    with tempfile.TemporaryDirectory() as directory:
        flora.save_adapter(model, directory)
        twin = make_model()
        twin.load_state_dict(base_state)
        flora.load_adapter(twin, directory)  # frozen, for inference
        # Equal to float32 rounding: a frozen adapter may take other kernels.
        reproduced = torch.allclose(twin(x), model(x), rtol=1e-5, atol=1e-6)
        print("reloaded adapter reproduces outputs:", reproduced)

    adapted = model(x)
    flora.merge(model)
    print("merged max difference:", (model(x) - adapted).abs().max().item())
    flora.unload(model)
    print("plain modules again:", [type(m).__name__ for m in model])


if __name__ == "__main__":
    main()
