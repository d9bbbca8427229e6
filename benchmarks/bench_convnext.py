"""Training-step time and memory of adapters on a ConvNeXt stage, against PEFT.

The reference FLoRA example adapts ConvNeXt, whose blocks are a 7×7
depthwise convolution, a LayerNorm, a pointwise 4× expansion (a Linear on
channels-last activations), GELU and a pointwise projection back. This script
builds the first stage of ConvNeXt-T (3 blocks, 96 channels, 56×56 inputs,
random weights: speed does not depend on them) and times one training step
(forward, then backward to the input and to the trainable parameters, the
input requiring a gradient as it does inside a network) for:

* the frozen base;
* FLoRA with the reference example's ranks: 16 on Linear modes,
  ``(16, 16, 2, 2)`` on convolutions (clipped to ``(4, 1, 2, 2)`` on a
  depthwise kernel, which has one input channel per group);
* PEFT LoRA, LoHa and LoKr, each at the rank whose trainable-parameter count
  is closest to FLoRA's.

Two settings: the pointwise Linears adapted, then the depthwise kernels too
(PEFT LoRA needs a rank divisible by ``groups`` on a grouped convolution, so
its smallest depthwise adapter is r = 96 with a dense 96→96 7×7 ``lora_A``:
that row is shown, marked as not at equal parameters).

Timing and memory follow ``bench_adapters.py``: variants interleaved in
rotated order, median over repeats; on the CPU peak memory is measured in a
fresh subprocess with ``MALLOC_MMAP_THRESHOLD_`` pinned, on CUDA with the
allocator's peak counter.

Usage::

    python benchmarks/bench_convnext.py                  # 2 threads, a few minutes
    python benchmarks/bench_convnext.py --device cuda    # absolute times on a GPU
    python benchmarks/bench_convnext.py --quick          # batch 2, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence

import torch
from bench_adapters import (
    _THREADS,
    _describe,
    _overhead,
    _peak_step_bytes,
    _trainable,
    peak_memory,
    time_case,
)
from torch import nn

import flora

DIM, DEPTH, SIZE = 96, 3, 56
FLORA_RANKS = {"Linear": 16, "Conv2d": (16, 16, 2, 2)}
SETTINGS = {
    "pointwise": ["pwconv1", "pwconv2"],
    "pointwise+depthwise": ["pwconv1", "pwconv2", "dwconv"],
}
_RANK_SEARCH = range(1, 97)
_LOKR_FACTORS = (-1, 2, 4, 8)


class Block(nn.Module):
    """A ConvNeXt block: depthwise 7×7, LayerNorm, 4× pointwise MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def stage() -> nn.Module:
    """The frozen first stage of ConvNeXt-T, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(*(Block(DIM) for _ in range(DEPTH))).requires_grad_(False)


def _flora(base: nn.Module, targets: Sequence[str]) -> nn.Module:
    model = copy.deepcopy(base)
    config = flora.FLoRAConfig(ranks=FLORA_RANKS, target_modules=list(targets))
    flora.inject(model, config)
    return model


def _peft(
    base: nn.Module, method: str, targets: Sequence[str], rank: int, factor: int = -1
) -> nn.Module:
    import peft

    options = {"r": rank, "target_modules": list(targets)}
    if method == "lora":
        config = peft.LoraConfig(lora_alpha=rank, **options)
    elif method == "loha":
        config = peft.LoHaConfig(alpha=rank, **options)
    else:
        # LoKr's size depends on how each dimension is split into Kronecker factors
        # (decompose_factor) as much as on its rank: the search tries both.
        config = peft.LoKrConfig(alpha=rank, decompose_factor=factor, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = peft.get_peft_model(copy.deepcopy(base), config)
    return model.get_base_model()


def _lora_depthwise(base: nn.Module, targets: Sequence[str], rank: int) -> nn.Module:
    """PEFT LoRA at ``rank`` on the Linears and its smallest rank, ``groups``, on depthwise."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(targets),
        rank_pattern={"dwconv": DIM},
        alpha_pattern={"dwconv": DIM},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return peft.get_peft_model(copy.deepcopy(base), config).get_base_model()


def closest_rank(make: Callable[[int], nn.Module], budget: int) -> tuple[int, nn.Module]:
    """The rank whose model has the trainable-parameter count closest to ``budget``."""
    best = None
    for rank in _RANK_SEARCH:
        try:
            model = make(rank)
        except ValueError:
            continue
        gap = abs(_trainable(model) - budget)
        if best is None or gap < best[0]:
            best = (gap, rank, model)
        if _trainable(model) > budget:
            break
    assert best is not None
    return best[1], best[2]


def build_variants(setting: str) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """Every row's model for ``setting`` and the PEFT ranks chosen."""
    base = stage()
    targets = SETTINGS[setting]
    modules: dict[str, nn.Module] = {"base": base, "flora": _flora(base, targets)}
    budget = _trainable(modules["flora"])
    ranks = {}
    for method in ("lora", "loha", "lokr"):
        if method == "lora" and "dwconv" in targets:
            linear_rank, _ = closest_rank(
                lambda r: _peft(base, "lora", SETTINGS["pointwise"], r),
                _trainable(_flora(base, SETTINGS["pointwise"])),
            )
            modules["peft-lora (dw r=96)"] = _lora_depthwise(base, targets, linear_rank)
            ranks["lora"] = linear_rank
            continue
        factors = _LOKR_FACTORS if method == "lokr" else (-1,)
        found = [
            (*closest_rank(lambda r, m=method, f=f: _peft(base, m, targets, r, f), budget), f)
            for f in factors
        ]
        rank, model, factor = min(found, key=lambda item: abs(_trainable(item[1]) - budget))
        modules[f"peft-{method}"] = model
        ranks[method] = rank
        if method == "lokr":
            ranks["lokr decompose_factor"] = factor
    return modules, ranks


def _shape(quick: bool) -> tuple[int, ...]:
    return (2 if quick else 8, DIM, SIZE, SIZE)


def memory_worker(setting: str, quick: bool) -> None:
    """Subprocess entry: print ``{variant: peak bytes}`` for one setting as JSON."""
    torch.set_num_threads(_THREADS)
    modules, _ = build_variants(setting)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(_shape(quick), generator=generator, requires_grad=True)
    grad_out = torch.randn(_shape(quick), generator=generator)
    print(json.dumps({name: _peak_step_bytes(m, x, grad_out) for name, m in modules.items()}))


def report(
    setting: str,
    modules: dict[str, nn.Module],
    ranks: dict[str, int],
    samples: dict[str, list[float]],
    memory: dict[str, int] | None,
) -> list[tuple[str, bool, str]]:
    """Print one setting's table; return the target (FLoRA adds less than every PEFT row)."""
    print(f"\n## {setting}: adapted {', '.join(SETTINGS[setting])}")
    print("PEFT ranks (closest parameter count to FLoRA's): " + json.dumps(ranks))
    base = statistics.median(samples["base"])
    print(f"{'variant':<22}{'trainable':>11}{'ms/step':>10}{'x base':>8}{'+ms':>9}{'peak MiB':>10}")
    for name, module in modules.items():
        median = statistics.median(samples[name])
        peak = "n/a" if memory is None else f"{memory[name] / 2**20:8.1f}"
        print(
            f"{name:<22}{_trainable(module):>11}{median * 1e3:>10.2f}{median / base:>8.3f}"
            f"{(median - base) * 1e3:>9.2f}{peak:>10}"
        )
    flora_added = _overhead(samples, "flora")
    verdicts = []
    for name in modules:
        if not name.startswith("peft-") or "dw r=96" in name:
            continue
        peft_added = _overhead(samples, name)
        verdicts.append(
            (
                f"{setting}: FLoRA adds less time than {name}",
                flora_added < peft_added,
                f"FLoRA {flora_added * 1e3:+.2f} ms vs {peft_added * 1e3:+.2f} ms",
            )
        )
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    """Time both settings and print their tables and targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, fewer repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--memory-worker", metavar="SETTING", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick)
        return 0
    torch.set_num_threads(_THREADS)
    device = torch.device(args.device)
    repeats, inner, warmup = (3, 1, 1) if args.quick else (5, 2, 1)
    print(
        f"torch {torch.__version__}, {_describe(device)}, float32; ConvNeXt-T stage 1 "
        f"({DEPTH} blocks, {DIM} channels), input {_shape(args.quick)} requiring a gradient; "
        f"median of {repeats} interleaved repeats x {inner} steps"
    )
    verdicts = []
    for setting in SETTINGS:
        modules, ranks = build_variants(setting)
        modules = {name: module.to(device) for name, module in modules.items()}
        samples = time_case(modules, _shape(args.quick), repeats, inner, warmup, device)
        memory = None
        if not args.no_memory:
            memory = peak_memory(
                modules,
                _shape(args.quick),
                device,
                script=__file__,
                name=setting,
                quick=args.quick,
            )
        verdicts += report(setting, modules, ranks, samples, memory)
    print("\n## targets")
    for label, passed, evidence in verdicts:
        print(f"{'PASS' if passed else 'FAIL'}  {label}: {evidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
