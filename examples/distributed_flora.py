"""Train FLoRA adapters on several processes with DDP or FSDP2, then save the adapter.

The base network is the digits CNN whose weights ship with tuckerlib (trained
on upright digits); the adapters learn the digits rotated by 90 degrees. Each
process reads its own shard of every epoch. Run it on one machine with two
CPU processes (gloo backend):

    torchrun --standalone --nproc_per_node=2 examples/distributed_flora.py --out adapter/
    torchrun --standalone --nproc_per_node=2 examples/distributed_flora.py --fsdp --out adapter/

Needs torch, safetensors and scikit-learn; about ten seconds on two cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from make_digits_example import DigitsCNN, load_data, rotate
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import flora
from tuckerlib.cli.common import bundled_example
from tuckerlib.io import open_checkpoint

TARGETS = ["conv2", "conv3", "fc1", "fc2"]


def build_model() -> nn.Module:
    """The pretrained base network with FLoRA adapters on ``TARGETS``, the same on every rank."""
    model = DigitsCNN()
    with open_checkpoint(bundled_example()[0]) as checkpoint:
        model.load_state_dict({k: torch.from_numpy(checkpoint.read(k)) for k in checkpoint})
    torch.manual_seed(0)  # the same adapter initialization on every rank
    return flora.inject(model, flora.FLoRAConfig(target_modules=TARGETS))


def build_loader(batch_size: int) -> tuple[DataLoader, DistributedSampler]:
    """Rotated training digits; the sampler gives each rank its own shard."""
    x_train, _, y_train, _ = load_data()
    dataset = TensorDataset(rotate(x_train), y_train)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler), sampler


def train(model: nn.Module, loader: DataLoader, sampler: DistributedSampler, epochs: int) -> None:
    """Adam on the trainable parameters (the adapters) only."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # The base stays frozen, batch-norm statistics included: the saved adapter
    # then reproduces the trained model on any copy of the base.
    model.eval()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def rotated_accuracy(model: nn.Module) -> float:
    """Fraction of rotated test digits read correctly (every rank runs it: FSDP2 gathers)."""
    _, x_test, _, y_test = load_data()
    return float((model(rotate(x_test)).argmax(1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # "nccl" on GPUs, one device per process
    rank = dist.get_rank()
    model = build_model()
    loader, sampler = build_loader(args.batch_size)
    if args.fsdp:
        for layer in flora.adapted_layers(model).values():
            fully_shard(layer)
        fully_shard(model)
        train(model, loader, sampler, args.epochs)
        state = flora.adapter_state_dict(model)  # a collective: every rank gathers
        if rank == 0:
            flora.save_adapter(model, args.out, state_dict=state)
    else:
        train(DistributedDataParallel(model), loader, sampler, args.epochs)
        if rank == 0:
            flora.save_adapter(model, args.out)
    accuracy = rotated_accuracy(model)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(f"rotated test digits read correctly: {accuracy:.1%}; adapter saved to {args.out}")


if __name__ == "__main__":
    main()
