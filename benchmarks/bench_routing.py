"""Cost of per-sample routing: a mixed batch against its groups run one adapter at a time.

A model with four named FLoRA adapters runs one batch in which each sample
names its adapter (``model(ids, adapter_names=names)``); the reference is
what a user without routing does: for each adapter, ``set_adapter`` and a
forward of that adapter's samples. A third variant, ``plain``, runs the whole
batch with one adapter and no routing: ``plain/sum`` is what batching alone
changes (attention, GELU and layer norms on one large batch instead of
several small ones), apart from routing. The goal (issue 20) is a mixed batch
costing at most the sum of those group forwards plus 10%.

Model: all-MiniLM-L6-v2's architecture (``_minilm.py``; random weights),
inference (``torch.no_grad()``, eval mode). Cases: the default targets
(``query``, ``value``) and ``"all-linear"``, equal groups, unequal groups,
and a batch with ``"__base__"`` samples.

Timing: one thread (``torch.set_num_threads(1)``), measured as the
process's CPU time (``time.process_time``), which other processes on a
shared machine do not inflate as they do wall-clock time (``--wall`` times
wall-clock instead); warm-up runs first, then the two variants of a case
alternate (each repeat runs both, in alternating order, so drifting machine
load hits both alike); the table shows medians over the repeats and the
median of the per-repeat ratios. The machine's load average is printed with
the table.

Usage::

    python benchmarks/bench_routing.py            # about five minutes
    python benchmarks/bench_routing.py --quick    # shorter sequences, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _minilm import load_text, minilm

import flora

ADAPTERS = ("a", "b", "c", "d")


def _model(targets: str | None) -> torch.nn.Module:
    model = minilm()
    generator = torch.Generator().manual_seed(1)
    for name in ADAPTERS:
        config = flora.FLoRAConfig(target_modules=targets)
        flora.inject(model, config, adapter_name=name)
    with torch.no_grad():  # every adapter changes its layers
        for layer in flora.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.core.copy_(0.01 * torch.randn(adapter.core.shape, generator=generator))
    return model


def _names(sizes: dict[str, int]) -> list[str]:
    """Samples of the groups interleaved (a, b, c, d, a, b, ...), as a real mixed batch comes."""
    remaining = dict(sizes)
    names = []
    while any(remaining.values()):
        for name in sizes:
            if remaining[name]:
                names.append(name)
                remaining[name] -= 1
    return names


def _seconds(run: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    run()
    return clock() - start


def _case(
    model: torch.nn.Module,
    sizes: dict[str, int],
    length: int,
    repeats: int,
    clock: Callable[[], float],
) -> dict:
    names = _names(sizes)
    ids = torch.randint(1, 30000, (len(names), length), generator=torch.Generator().manual_seed(2))
    rows = {name: [i for i, n in enumerate(names) if n == name] for name in sizes}

    def mixed() -> None:
        model(input_ids=ids, adapter_names=names)

    def plain() -> None:
        flora.set_adapter(model, "a")
        model(input_ids=ids)

    def groups() -> None:
        for name, index in rows.items():
            if name == "__base__":
                with flora.disable_adapter(model):
                    model(input_ids=ids[index])
            else:
                flora.set_adapter(model, name)
                model(input_ids=ids[index])

    with torch.no_grad():
        variants = {"mixed": mixed, "groups": groups, "plain": plain}
        for _ in range(2):
            for run in variants.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(repeats):
            order = list(variants)[repeat % 3 :] + list(variants)[: repeat % 3]
            for variant in order:
                times[variant].append(_seconds(variants[variant], clock))
    ratios = [m / g for m, g in zip(times["mixed"], times["groups"], strict=True)]
    plain_ratios = [p / g for p, g in zip(times["plain"], times["groups"], strict=True)]
    return {
        **{name: statistics.median(values) for name, values in times.items()},
        "ratio": statistics.median(ratios),
        "plain ratio": statistics.median(plain_ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="length 32, 5 repeats")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.process_time
    length, repeats = (32, 5) if args.quick else (128, 15)
    cases = [
        ("query, value", None, {n: 8 for n in ADAPTERS}),
        ("all-linear", "all-linear", {n: 8 for n in ADAPTERS}),
        ("all-linear", "all-linear", {"a": 2, "b": 6, "c": 8, "d": 16}),
        ("all-linear", "all-linear", {"a": 8, "b": 8, "c": 8, "__base__": 8}),
    ]
    print(
        f"bench_routing: MiniLM (6x384), batch 32 x {length} tokens, 1 thread, "
        f"{'wall-clock' if args.wall else 'CPU'} ms, {repeats} interleaved repeats; "
        f"{load_text()} at start"
    )
    header = (
        f"{'targets':<14} {'groups':<26} {'mixed ms':>9} {'sum ms':>9} {'ratio':>7} "
        f"{'plain ms':>9} {'plain/sum':>9}"
    )
    print(header)
    print("-" * len(header))
    models: dict[str | None, torch.nn.Module] = {}
    worst = 0.0
    for label, targets, sizes in cases:
        model = models.setdefault(targets, _model(targets))
        result = _case(model, sizes, length, repeats, clock)
        worst = max(worst, result["ratio"])
        groups = " ".join(f"{n}:{s}" for n, s in sizes.items())
        print(
            f"{label:<14} {groups:<26} {1e3 * result['mixed']:9.1f} "
            f"{1e3 * result['groups']:9.1f} {result['ratio']:7.3f} "
            f"{1e3 * result['plain']:9.1f} {result['plain ratio']:9.3f}"
        )
    print(f"worst ratio {worst:.3f} (goal <= 1.10); {load_text()} at end")


if __name__ == "__main__":
    main()
