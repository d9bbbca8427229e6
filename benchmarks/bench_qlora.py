"""QLoRA set-up: step time and peak memory of FLoRA against PEFT LoRA on a 4-bit base.

One training step (forward, then backward to the input and the adapter) of a
single bitsandbytes ``Linear4bit`` layer (nf4 by default, float32 compute
dtype), frozen and quantized, for two shapes: 1024×1024 and 2048×2048 on
512 tokens (128 with ``--quick``). Rows per shape: the quantized base alone;
FLoRA with ``forward="auto"`` at the default Linear ranks ``(8, 8)``
(:class:`flora.layers.bnb.QuantizedLinear`); PEFT LoRA (its
``lora.bnb.Linear4bit``) with the rank whose parameter count is closest to
FLoRA's, on a copy of the same quantized module.

Timing and memory follow ``bench_adapters.py``: variants interleaved in
rotated order, medians over repeats, paired ratios (each repeat compares two
variants timed moments apart); peak memory is what one warmed-up step adds,
measured in a fresh process per shape on the CPU (the allocator's counter on
CUDA). Threads: 1 by default (``--threads``).

Usage::

    python benchmarks/bench_qlora.py                    # both shapes, nf4
    python benchmarks/bench_qlora.py --quick --quant int8
    python benchmarks/bench_qlora.py --csv docs/_static/benchmarks/qlora.csv  # + qlora_paired.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from bench_adapters import (
    Holder,
    _describe,
    _fmt_mib,
    _inputs,
    _lora_rank,
    _paired,
    _peak_step_bytes,
    _trainable,
    peak_memory,
    time_case,
)
from torch import nn

import flora

VARIANTS = ("base", "flora-auto", "peft-lora")
QUANTS = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class Case:
    """One layer size: a square Linear of ``size`` features on ``tokens`` tokens."""

    name: str
    size: int
    tokens: int
    quick_tokens: int


CASES = (Case("1024x1024", 1024, 512, 128), Case("2048x2048", 2048, 512, 128))
RANKS = (8, 8)


def quantized_base(size: int, quant: str, device: torch.device) -> nn.Module:
    """A frozen bitsandbytes Linear of ``size`` features, quantized on ``device``."""
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(size, size)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(size, size, generator=generator) / size**0.5)
    if quant == "int8":
        base = bnb.nn.Linear8bitLt(size, size, has_fp16_weights=False)
    else:
        base = bnb.nn.Linear4bit(size, size, quant_type=quant, compute_dtype=torch.float32)
    base.load_state_dict(linear.state_dict())
    return base.to(device).requires_grad_(False)


def _peft_holder(base: nn.Module, rank: int, quant: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    holder = Holder(copy.deepcopy(base))
    # PEFT picks its bitsandbytes layers for models that say they were loaded quantized.
    setattr(holder, "is_loaded_in_8bit" if quant == "int8" else "is_loaded_in_4bit", True)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"])
    model = get_peft_model(holder, config)
    layer = model.get_base_model().layer
    if type(layer).__module__ != "peft.tuners.lora.bnb":
        raise RuntimeError(f"PEFT did not use its bitsandbytes layer: {type(layer)}")
    return model.get_base_model()


def build_variants(case: Case, quant: str, device: torch.device) -> tuple[dict, int]:
    """Every row's module for ``case`` and the PEFT LoRA rank used."""
    torch.manual_seed(0)
    base = quantized_base(case.size, quant, device)
    modules: dict[str, nn.Module] = {"base": Holder(base)}
    holder = Holder(copy.deepcopy(base))
    config = flora.FLoRAConfig(ranks=RANKS, target_modules=["layer"])
    modules["flora-auto"] = flora.inject(holder, config)
    rank = _lora_rank(nn.Linear(case.size, case.size, device="meta"), _trainable(holder))
    modules["peft-lora"] = _peft_holder(base, rank, quant)
    for module in modules.values():
        module.train()
    return modules, rank


def _tokens(case: Case, quick: bool) -> tuple[int, int]:
    return (case.quick_tokens if quick else case.tokens, case.size)


def memory_worker(job: str, quick: bool) -> None:
    """Subprocess entry: print ``{variant: peak bytes}`` for ``"shape:quant:threads"`` as JSON."""
    name, quant, threads = job.split(":")
    torch.set_num_threads(int(threads))
    case = next(c for c in CASES if c.name == name)
    modules, _ = build_variants(case, quant, torch.device("cpu"))
    x, grad_out = _inputs(modules["base"], _tokens(case, quick))
    print(json.dumps({n: _peak_step_bytes(m, x, grad_out) for n, m in modules.items()}))


def _rows(case, modules, samples, memory) -> list[dict[str, str]]:
    times = {name: statistics.median(values) for name, values in samples.items()}
    rows = []
    for name, module in modules.items():
        rows.append(
            {
                "shape": case.name,
                "variant": name,
                "trainable": f"{_trainable(module):,}",
                "ms / step": f"{times[name] * 1e3:.2f}",
                "× base": f"{_paired(samples, name, 'base'):.3f}",
                "peak MiB": "n/a" if memory is None else _fmt_mib(memory[name]).strip(),
            }
        )
    return rows


def _ratios(case, samples, memory) -> dict[str, str]:
    """FLoRA over PEFT: paired step time, and peak step memory."""
    time_ratio = _paired(samples, "flora-auto", "peft-lora")
    mem = "n/a"
    if memory is not None and memory["peft-lora"] > 0:
        mem = f"{memory['flora-auto'] / memory['peft-lora']:.2f}"
    return {
        "shape": case.name,
        "time FLoRA / PEFT": f"{time_ratio:.3f}",
        "memory FLoRA / PEFT": mem,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print one table per shape and the ratio table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--quant", choices=QUANTS, default="nf4", help="the base's type")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--memory-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats, inner, warmup = (3, 1, 1) if args.quick else (7, 2, 1)
    print(
        f"torch {torch.__version__}, {_describe(device)}, {args.quant} base, float32 compute; "
        f"median of {repeats} interleaved repeats x {inner} steps; step = forward + backward "
        "to the input and the adapter"
    )
    rows, ratios = [], []
    for case in CASES:
        modules, rank = build_variants(case, args.quant, device)
        shape = _tokens(case, args.quick)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes' dtype notes
            samples = time_case(modules, shape, repeats, inner, warmup, device)
        memory = None
        if not args.no_memory:
            job = f"{case.name}:{args.quant}:{args.threads}"
            memory = peak_memory(
                modules, shape, device, script=__file__, name=job, quick=args.quick
            )
        print(f"\n## {case.name}, input {shape}: FLoRA ranks {RANKS}, PEFT LoRA r={rank}")
        case_rows = _rows(case, modules, samples, memory)
        print(f"{'variant':<12}{'trainable':>11}{'ms/step':>10}{'x base':>8}{'peak MiB':>10}")
        for row in case_rows:
            print(
                f"{row['variant']:<12}{row['trainable']:>11}{row['ms / step']:>10}"
                f"{row['× base']:>8}{row['peak MiB']:>10}"
            )
        rows += case_rows
        ratios.append(_ratios(case, samples, memory))
    print("\n## FLoRA / PEFT LoRA (paired time; peak step memory)")
    for ratio in ratios:
        time_ratio, memory_ratio = ratio["time FLoRA / PEFT"], ratio["memory FLoRA / PEFT"]
        print(f"{ratio['shape']:<12}time {time_ratio:>7}  memory {memory_ratio}")
    if args.csv:
        _write_csv(args.csv, rows)
        _write_csv(args.csv.removesuffix(".csv") + "_paired.csv", ratios)
    return 0


def _write_csv(path: str, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
