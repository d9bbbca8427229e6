"""Does ``forward="auto"`` pick the faster of the dense and factorized branch?

For a grid of Linear, Conv1d, Conv2d and Embedding shapes (tokens, batch,
channels, ranks, kernel sizes, strides; training steps and a few inference
calls) the script times the same FLoRA layer with ``forward="dense"`` and
``forward="factorized"`` in alternating pairs (the order flips every pair, so
drifting machine load hits both alike) and reports per case the median over
pairs of ``factorized / dense`` with its quartiles, the path ``auto`` picks,
and what that choice loses against the faster path. A case whose quartiles
straddle 1 is a tie within the noise.

A step is one forward plus, for training cases, the backward pass to the
input and the adapter (as in ``bench_adapters.py``); inference cases run the
forward under ``torch.no_grad()``.

The last table replays the measurements against other values of
:data:`flora._cost.MACHINE_BALANCE` (the choice is recomputed, nothing is
re-timed); a balance of 0 is the plain multiply-add count the rule used
before the roofline model.

Usage::

    python benchmarks/bench_auto_rule.py            # every case, ~3 minutes on 2 threads
    python benchmarks/bench_auto_rule.py --quick    # a handful of cases
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import flora
import flora._cost

_THREADS = 2
_TARGET_SECONDS = 0.03  # per timed sample; several steps when one step is shorter
_BALANCES = (0, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Case:
    """One layer, its adapter ranks and input, and whether it trains."""

    name: str
    make_base: Callable[[], nn.Module]
    ranks: tuple[int, ...]
    input_shape: tuple[int, ...]
    training: bool = True


def _linear(i: int, o: int, tokens: int, rank: int, training: bool = True) -> Case:
    mode = "" if training else " (inference)"
    return Case(
        f"Linear {i}→{o}, {tokens} tok, r{rank}{mode}",
        lambda: nn.Linear(i, o),
        (rank, rank),
        (tokens, i),
        training,
    )


def _conv2d(
    c: int, o: int, k: int, size: int, batch: int, ranks: tuple[int, ...], stride: int = 1
) -> Case:
    step = f" s{stride}" if stride > 1 else ""
    return Case(
        f"Conv2d {c}→{o} {k}×{k}{step}, {batch}×{size}², r{ranks}",
        lambda: nn.Conv2d(c, o, k, stride=stride, padding=k // 2),
        ranks,
        (batch, c, size, size),
    )


def _conv1d(c: int, o: int, k: int, length: int, batch: int, ranks: tuple[int, ...]) -> Case:
    return Case(
        f"Conv1d {c}→{o} k{k}, {batch}×{length}, r{ranks}",
        lambda: nn.Conv1d(c, o, k, padding=k // 2),
        ranks,
        (batch, c, length),
    )


def _embedding(rows: int, dim: int, tokens: int, rank: int) -> Case:
    return Case(
        f"Embedding {rows}×{dim}, {tokens} tok, r{rank}",
        lambda: nn.Embedding(rows, dim),
        (rank, rank),
        (tokens,),
    )


CASES = (
    _linear(1024, 1024, 2048, 8),
    _linear(1024, 1024, 256, 8),
    _linear(1024, 1024, 32, 8),
    _linear(2048, 2048, 16, 8),
    _linear(256, 256, 4096, 8),
    _linear(512, 512, 1024, 32),
    _linear(64, 64, 4096, 2),
    _linear(1024, 4096, 512, 16),
    _linear(768, 768, 1024, 4),
    _conv2d(64, 64, 3, 56, 8, (16, 16, 2, 2)),
    _conv2d(64, 64, 3, 56, 2, (16, 16, 2, 2)),
    _conv2d(128, 128, 3, 28, 4, (16, 16, 2, 2)),
    _conv2d(256, 256, 3, 14, 4, (16, 16, 2, 2)),
    _conv2d(256, 256, 3, 14, 4, (4, 4, 1, 1)),
    _conv2d(512, 512, 3, 7, 8, (16, 16, 2, 2)),
    _conv2d(32, 32, 3, 64, 4, (8, 8, 2, 2)),
    _conv2d(64, 64, 1, 56, 4, (16, 16, 1, 1)),
    _conv2d(128, 128, 5, 16, 4, (16, 16, 3, 3)),
    _conv2d(64, 128, 3, 32, 4, (16, 16, 2, 2), stride=2),
    _conv1d(256, 256, 3, 1024, 8, (16, 16, 2)),
    _conv1d(256, 256, 3, 1024, 2, (16, 16, 2)),
    _conv1d(512, 512, 3, 256, 4, (16, 16, 2)),
    _conv1d(64, 64, 5, 2048, 4, (8, 8, 3)),
    _conv1d(1024, 1024, 1, 128, 2, (16, 16, 1)),
    _embedding(30000, 256, 512, 8),
    _embedding(1000, 64, 4096, 8),
    _linear(1024, 1024, 2048, 8, training=False),
    _linear(1024, 1024, 1, 8, training=False),
    _linear(4096, 4096, 4, 8, training=False),
    _linear(256, 256, 64, 8, training=False),
)
QUICK = (0, 2, 9, 19, 24, 27)


def _layer(case: Case) -> tuple[flora.layers.FLoRALayer, torch.Tensor]:
    torch.manual_seed(0)
    base = case.make_base()
    config = flora.FLoRAConfig(ranks=case.ranks, target_modules=["layer"], init="gaussian")
    layer = flora.inject(nn.ModuleDict({"layer": base}), config)["layer"]
    with torch.no_grad():
        layer.core.normal_()
    generator = torch.Generator().manual_seed(1)
    if isinstance(base, nn.Embedding):
        x = torch.randint(0, base.num_embeddings, case.input_shape, generator=generator)
    else:
        x = torch.randn(case.input_shape, generator=generator, requires_grad=case.training)
    return layer, x


def _runner(layer: nn.Module, x: torch.Tensor, training: bool) -> Callable[[], None]:
    def train_step() -> None:
        out = layer(x)
        out.backward(torch.ones_like(out))
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    def infer() -> None:
        with torch.no_grad():
            layer(x)

    return train_step if training else infer


def _time(run: Callable[[], None], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        run()
    return (time.perf_counter() - start) / inner


def _auto_choice(layer: flora.layers.FLoRALayer, x: torch.Tensor, training: bool) -> str:
    layer.forward_mode = "auto"
    if training:
        return layer.choose_forward(x)
    with torch.no_grad():
        return layer.choose_forward(x)


@dataclass(frozen=True)
class Result:
    """Timings of one case and the ``auto`` choice at the current balance."""

    case: Case
    ratios: list[float]  # factorized / dense, one per pair
    dense: float  # median seconds
    factorized: float
    choice: str


def measure(case: Case, pairs: int) -> Result:
    """Time ``case`` in ``pairs`` alternating dense/factorized pairs."""
    layer, x = _layer(case)
    choice = _auto_choice(layer, x, case.training)
    run = _runner(layer, x, case.training)
    seconds: dict[str, list[float]] = {"dense": [], "factorized": []}
    inner = 1
    for mode in ("dense", "factorized"):
        layer.forward_mode = mode
        run()
        inner = max(inner, int(_TARGET_SECONDS / max(_time(run, 1), 1e-6)))
    for pair in range(pairs):
        order = ("dense", "factorized") if pair % 2 == 0 else ("factorized", "dense")
        for mode in order:
            layer.forward_mode = mode
            seconds[mode].append(_time(run, inner))
    ratios = [f / d for f, d in zip(seconds["factorized"], seconds["dense"], strict=True)]
    return Result(
        case,
        ratios,
        statistics.median(seconds["dense"]),
        statistics.median(seconds["factorized"]),
        choice,
    )


def save(path: str, results: Sequence[Result]) -> None:
    """Write every case's per-pair ratios and median times as JSON."""
    data = {
        r.case.name: {"ratios": r.ratios, "dense": r.dense, "factorized": r.factorized}
        for r in results
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def replay(path: str, cases: Sequence[Case]) -> list[Result]:
    """Results from saved timings, with ``auto``'s choice recomputed by today's rule."""
    with open(path) as f:
        data = json.load(f)
    results = []
    for case in cases:
        saved = data[case.name]
        layer, x = _layer(case)
        choice = _auto_choice(layer, x, case.training)
        results.append(Result(case, saved["ratios"], saved["dense"], saved["factorized"], choice))
    return results


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _tie(result: Result) -> bool:
    """Whether the quartiles of ``factorized / dense`` straddle 1: either path is fine."""
    q1, q3 = _quartiles(result.ratios)
    return q1 <= 1.0 <= q3


def _loss(result: Result, choice: str) -> float:
    """Relative time lost by ``choice`` against the faster path (median pair ratio)."""
    ratio = statistics.median(result.ratios)
    if choice == "factorized":
        return max(ratio - 1.0, 0.0)
    return max(1.0 / ratio - 1.0, 0.0)


def report(results: Sequence[Result]) -> None:
    """The per-case table, then the summary at the model's balance."""
    print(
        f"{'case':<46}{'dense ms':>9}{'fact ms':>9}{'f/d':>7}{'q1–q3':>13}"
        f"{'faster':>11}{'auto':>11}{'loss':>7}"
    )
    for r in results:
        ratio = statistics.median(r.ratios)
        q1, q3 = _quartiles(r.ratios)
        faster = "tie" if _tie(r) else ("factorized" if ratio < 1 else "dense")
        print(
            f"{r.case.name:<46}{r.dense * 1e3:>9.2f}{r.factorized * 1e3:>9.2f}{ratio:>7.2f}"
            f"{f'{q1:.2f}–{q3:.2f}':>13}{faster:>11}{r.choice:>11}{_loss(r, r.choice):>7.1%}"
        )


def sweep(results: Sequence[Result]) -> None:
    """Agreement and worst loss when ``auto`` used another machine balance."""
    print(
        "\nreplay at other balances (choices recomputed from the shapes, timings reused):\n"
        f"{'balance':>8}{'right':>8}{'of':>4}{'median loss':>13}{'worst loss':>12}  worst case\n"
        "(right: picks the faster path, or either one where the quartiles straddle 1)"
    )
    saved = flora._cost.MACHINE_BALANCE
    try:
        for balance in sorted({*_BALANCES, saved}):
            flora._cost.MACHINE_BALANCE = balance
            # flora caches each decision per shape: recompute them at this balance.
            flora.layers.base._cached_choice.cache_clear()
            losses = []
            for r in results:
                layer, x = _layer(r.case)
                losses.append((_loss(r, _auto_choice(layer, x, r.case.training)), r.case.name))
            right = sum(
                loss == 0.0 or _tie(r) for (loss, _), r in zip(losses, results, strict=True)
            )
            worst = max(losses)
            worst_name = worst[1] if worst[0] > 0 else "-"
            marker = " <- flora" if balance == saved else ""
            print(
                f"{balance:>8}{right:>8}{len(losses):>4}"
                f"{statistics.median(loss for loss, _ in losses):>13.1%}"
                f"{worst[0]:>12.1%}  {worst_name}{marker}"
            )
    finally:
        flora._cost.MACHINE_BALANCE = saved
        flora.layers.base._cached_choice.cache_clear()


@dataclass(frozen=True)
class LayoutCase:
    """A grouped convolution whose adapter's weight gradient can run in either layout."""

    name: str
    make_base: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


LAYOUT_CASES = (
    LayoutCase(
        "depthwise 96 7×7, 8×56²",
        lambda: nn.Conv2d(96, 96, 7, padding=3, groups=96),
        (8, 96, 56, 56),
    ),
    LayoutCase(
        "depthwise 96 5×5, 8×56²",
        lambda: nn.Conv2d(96, 96, 5, padding=2, groups=96),
        (8, 96, 56, 56),
    ),
    LayoutCase(
        "depthwise 96 3×3, 8×56²",
        lambda: nn.Conv2d(96, 96, 3, padding=1, groups=96),
        (8, 96, 56, 56),
    ),
    LayoutCase(
        "depthwise 96 7×7 s2, 8×56²",
        lambda: nn.Conv2d(96, 96, 7, stride=2, padding=3, groups=96),
        (8, 96, 56, 56),
    ),
    LayoutCase(
        "depthwise 384 7×7, 8×14²",
        lambda: nn.Conv2d(384, 384, 7, padding=3, groups=384),
        (8, 384, 14, 14),
    ),
    LayoutCase(
        "depthwise 768 7×7, 8×7²",
        lambda: nn.Conv2d(768, 768, 7, padding=3, groups=768),
        (8, 768, 7, 7),
    ),
    LayoutCase(
        "grouped 128, 32 groups, 3×3, 8×28²",
        lambda: nn.Conv2d(128, 128, 3, padding=1, groups=32),
        (8, 128, 28, 28),
    ),
    LayoutCase(
        "grouped 64, 4 groups, 3×3, 8×56²",
        lambda: nn.Conv2d(64, 64, 3, padding=1, groups=4),
        (8, 64, 56, 56),
    ),
    LayoutCase(
        "depthwise Conv1d 256 k7, 8×1024",
        lambda: nn.Conv1d(256, 256, 7, padding=3, groups=256),
        (8, 256, 1024),
    ),
    LayoutCase(
        "depthwise 96 3×3 dilation 2, 8×56²",
        lambda: nn.Conv2d(96, 96, 3, padding=2, dilation=2, groups=96),
        (8, 96, 56, 56),
    ),
    LayoutCase(
        "depthwise Conv1d 256 k3, 8×1024",
        lambda: nn.Conv1d(256, 256, 3, padding=1, groups=256),
        (8, 256, 1024),
    ),
    LayoutCase(
        "depthwise Conv3d 64 5×5×5, 2×16³",
        lambda: nn.Conv3d(64, 64, 5, padding=2, groups=64),
        (2, 64, 16, 16, 16),
    ),
    LayoutCase(
        "depthwise Conv3d 32 3×3×3, 2×16³",
        lambda: nn.Conv3d(32, 32, 3, padding=1, groups=32),
        (2, 32, 16, 16, 16),
    ),
)


_METHODS = ("native", "channels_last", "swapped")


def measure_layout(case: LayoutCase, pairs: int) -> tuple[dict[str, list[float]], str]:
    """Step-time ratios ``method / native`` per repeat for each method, and the rule's choice."""
    import flora.layers._grouped as grouped

    torch.manual_seed(0)
    layer = getattr(flora, type(base := case.make_base()).__name__)(base, init="gaussian")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.input_shape, generator=generator, requires_grad=True)
    run = _runner(layer, x, training=True)
    rule = grouped.grouped_weight_grad
    choices = []

    def spy(*args: object) -> str:
        choices.append(rule(*args))
        return choices[-1]

    depthwise = base.in_channels == base.groups
    methods = [m for m in _METHODS if m != "swapped" or depthwise]
    times: dict[str, list[float]] = {m: [] for m in methods}
    grouped.grouped_weight_grad = spy
    try:
        run()
        for repeat in range(pairs):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                grouped.grouped_weight_grad = lambda *args, m=method: m
                run()
                times[method].append(_time(run, 2))
    finally:
        grouped.grouped_weight_grad = rule
    ratios = {m: [t / n for t, n in zip(times[m], times["native"], strict=True)] for m in methods}
    return ratios, choices[0]


def report_layout(pairs: int) -> None:
    """Time every weight-gradient method of grouped convolutions against the rule's choice."""
    print(
        "\ngrouped convolutions: weight gradient native, on channels-last copies, or swapped "
        "(depthwise only); training step of the adapted layer, time ÷ native\n"
        f"{'case':<38}{'channels_last':>14}{'swapped':>9}{'fastest':>15}{'rule':>15}{'loss':>7}"
    )
    right = 0
    for case in LAYOUT_CASES:
        ratios, choice = measure_layout(case, pairs)
        medians = {m: statistics.median(r) for m, r in ratios.items()}
        fastest = min(medians, key=medians.__getitem__)
        loss = medians[choice] / medians[fastest] - 1.0
        right += loss <= 0.05
        swapped = f"{medians['swapped']:.2f}" if "swapped" in medians else "-"
        print(
            f"{case.name:<38}{medians['channels_last']:>14.2f}{swapped:>9}{fastest:>15}"
            f"{choice:>15}{loss:>7.1%}"
        )
    print(f"the rule picks the fastest method (within 5%) in {right} of {len(LAYOUT_CASES)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Time every case, print the table and the balance sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of cases, fewer pairs")
    parser.add_argument("--pairs", type=int, default=None, help="alternating pairs per case")
    parser.add_argument(
        "--threads", type=int, default=_THREADS, help=f"torch threads (default {_THREADS})"
    )
    parser.add_argument("--save", metavar="JSON", help="write the timings to this file")
    parser.add_argument(
        "--replay", metavar="JSON", help="reuse saved timings (nothing is timed): re-check the rule"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [CASES[i] for i in QUICK] if args.quick else list(CASES)
    pairs = args.pairs or (5 if args.quick else 9)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; "
        f"median of {pairs} alternating pairs; MACHINE_BALANCE = {flora._cost.MACHINE_BALANCE}; "
        f"load average {load:.1f} at start"
    )
    if args.replay:
        results = replay(args.replay, cases)
    else:
        results = [measure(case, pairs) for case in cases]
    if args.save:
        save(args.save, results)
    report(results)
    sweep(results)
    if not args.replay:
        report_layout(pairs)
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
