"""Forward+backward time and peak memory of FLoRA adapters against PEFT LoRA.

One training step (forward, then backward to the input and the adapter) of a
single layer, at (close to) equal trainable-parameter budgets, for four shapes:

* Linear 1024→1024 on 2048 tokens;
* Conv2d 64→64 3×3 on 8×64×56×56;
* depthwise Conv2d, 96 channels, 7×7, on 8×96×56×56;
* Conv1d 256→256 k3 on 8×256×1024.

Rows per shape: the frozen base alone; FLoRA with ``forward="auto"``,
``"factorized"`` and ``"dense"``; a naive FLoRA as the paper's reference code
writes it (ΔW rebuilt by a ``tensordot`` chain every call, then one
``F.linear``/``F.convNd`` with ``W0 + ΔW``); PEFT LoRA with the rank whose
parameter count is closest to FLoRA's; a merged FLoRA layer; and two named
FLoRA adapters of the same ranks active at once (``forward="auto"``), the
cost of running a second adapter.

Timing: ``torch.set_num_threads(2)``, warm-up steps first, then the variants
of a shape are interleaved (each repeat runs every variant once, in a rotated
order, so drifting machine load hits all of them alike); the table shows the
median over the repeats, and each target compares variants within a repeat
(paired) and takes the median over repeats.

Peak memory: PyTorch has no allocator statistics on CPU, so each shape is
measured in a fresh subprocess started with glibc's ``MALLOC_MMAP_THRESHOLD_``
pinned at 64 KiB. Every buffer of 64 KiB or more is then its own mapping,
returned to the system when freed, so the resident set follows live tensor
memory (and oneDNN's scratch buffers) instead of malloc's cache. Per variant:
one warm-up step, then the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and the column reports ``VmHWM`` after one more
step minus ``VmRSS`` before it: the memory a step adds on top of the weights
and the input (activations kept for backward, gradients, workspaces). The
subprocess is not used for timing because page faults on every fresh mapping
would slow the steps down. Linux only; elsewhere the column reads ``n/a``.

Usage::

    python benchmarks/bench_adapters.py            # full run, a few minutes
    python benchmarks/bench_adapters.py --quick    # smaller inputs, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

import flora

_THREADS = 2
_MMAP_THRESHOLD = "65536"
_CONV = {3: functional.conv1d, 4: functional.conv2d, 5: functional.conv3d}
_FLORA_MODES = ("auto", "factorized", "dense")
VARIANTS = (
    "base",
    "flora-auto",
    "flora-factorized",
    "flora-dense",
    "naive-flora",
    "peft-lora",
    "flora-merged",
    "flora-two-active",
)

# Targets: auto picks the faster path, FLoRA adds no more time than LoRA at
# equal parameters, a merged layer costs what the base does.
AUTO_SLACK = 1.05
OVERHEAD_RATIO = 1.0
MERGED_SLACK = 1.03


@dataclass(frozen=True)
class Case:
    """One layer shape: how to build the frozen base and its input."""

    name: str
    make_base: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    quick_input_shape: tuple[int, ...]
    ranks: tuple[int, ...]


CASES = (
    Case("linear", lambda: nn.Linear(1024, 1024), (2048, 1024), (512, 1024), (8, 8)),
    Case(
        "conv2d",
        lambda: nn.Conv2d(64, 64, 3, padding=1),
        (8, 64, 56, 56),
        (2, 64, 56, 56),
        (16, 16, 2, 2),
    ),
    Case(
        "depthwise",
        lambda: nn.Conv2d(96, 96, 7, padding=3, groups=96),
        (8, 96, 56, 56),
        (2, 96, 56, 56),
        # The default (16, 16, 2, 2) clipped to the usable ranks.
        (4, 1, 2, 2),
    ),
    Case(
        "conv1d",
        lambda: nn.Conv1d(256, 256, 3, padding=1),
        (8, 256, 1024),
        (2, 256, 1024),
        (16, 16, 2),
    ),
)


class Holder(nn.Module):
    """A one-layer model, so FLoRA and PEFT can target the layer by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class NaiveFLoRA(nn.Module):
    """FLoRA as the paper's reference code runs it: ΔW rebuilt on every call.

    The ``tensordot`` chain contracts the core's leading mode with one factor
    at a time (each step appends the new mode at the end, so after all modes
    the axes are back in order), then a single ``F.linear``/``F.convNd`` runs
    with ``W0 + s·ΔW``. Unlike the reference code it uses the weight's own
    shape ``(out, in/groups, *kernel)``, so grouped convolutions work.
    """

    def __init__(self, base: nn.Module, ranks: Sequence[int], scale: float = 1.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = scale
        shape = base.weight.shape
        generator = torch.Generator().manual_seed(0)
        self.core = nn.Parameter(0.01 * torch.randn(tuple(ranks), generator=generator))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(size, rank, generator=generator) / math.sqrt(2 * rank))
            for size, rank in zip(shape, ranks, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.core
        for factor in self.factors:
            delta = torch.tensordot(delta, factor, dims=([0], [1]))
        weight = self.base.weight + self.scale * delta
        base = self.base
        if isinstance(base, nn.Linear):
            return functional.linear(x, weight, base.bias)
        conv = _CONV[weight.ndim]
        return conv(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _lora_params(base: nn.Module, rank: int) -> int:
    """Trainable parameters of PEFT's LoRA at ``rank`` (its own layer layout)."""
    if isinstance(base, nn.Linear):
        return rank * (base.in_features + base.out_features)
    # lora_A: a full (ungrouped) conv in → r with the base's kernel; lora_B: a
    # 1×1 conv r → out with the base's groups.
    kernel = math.prod(base.kernel_size)
    return rank * (base.in_channels * kernel + base.out_channels // base.groups)


def _lora_rank(base: nn.Module, budget: int) -> int:
    """The admissible PEFT rank whose parameter count is closest to ``budget``.

    PEFT requires the rank of a grouped convolution to be a multiple of
    ``groups``, so a depthwise layer cannot go below ``r = groups``.
    """
    step = getattr(base, "groups", 1)
    candidates = range(step, max(budget, step) + step, step)
    return min(candidates, key=lambda r: (abs(_lora_params(base, r) - budget), r))


def _flora_holder(
    base: nn.Module, ranks: Sequence[int], forward: str, adapters: int = 1
) -> nn.Module:
    holder = Holder(copy.deepcopy(base))
    config = flora.FLoRAConfig(ranks=tuple(ranks), target_modules=["layer"], forward=forward)
    names = [f"adapter{i}" for i in range(adapters)]
    for name in names:
        flora.inject(holder, config, adapter_name=name)
    flora.set_adapter(holder, names)
    return holder


def _peft_holder(base: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"])
    with warnings.catch_warnings():
        # The depthwise layer warns that PEFT cannot merge it; the table says so.
        warnings.simplefilter("ignore", UserWarning)
        model = get_peft_model(Holder(copy.deepcopy(base)), config)
    # Time the adapted layer itself, without PeftModel's dispatch wrappers.
    return model.get_base_model()


def build_variants(case: Case) -> tuple[dict[str, nn.Module], int]:
    """Every row's module for ``case`` and the PEFT LoRA rank used."""
    torch.manual_seed(0)
    base = case.make_base().requires_grad_(False)
    modules: dict[str, nn.Module] = {"base": Holder(base)}
    for mode in _FLORA_MODES:
        modules[f"flora-{mode}"] = _flora_holder(base, case.ranks, mode)
    modules["naive-flora"] = Holder(NaiveFLoRA(copy.deepcopy(base), case.ranks))
    rank = _lora_rank(base, flora.trainable_parameters(modules["flora-auto"]))
    modules["peft-lora"] = _peft_holder(base, rank)
    merged = _flora_holder(base, case.ranks, "auto")
    flora.merge(merged)
    modules["flora-merged"] = merged
    modules["flora-two-active"] = _flora_holder(base, case.ranks, "auto", adapters=2)
    return modules, rank


def _step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    module(x).backward(grad_out)
    x.grad = None
    for p in module.parameters():
        p.grad = None


def _inputs(
    module: nn.Module, shape: Sequence[int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tuple(shape), generator=generator).to(device).requires_grad_()
    with torch.no_grad():
        out_shape = module(x).shape
    return x, torch.randn(out_shape, generator=generator).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(
    modules: dict[str, nn.Module],
    shape: Sequence[int],
    repeats: int,
    inner: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds per step of every variant, ``repeats`` samples interleaved across variants."""
    x, grad_out = _inputs(modules["base"], shape, device)
    names = list(modules)
    for name in names:
        for _ in range(warmup):
            _step(modules[name], x, grad_out)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                _step(modules[name], x, grad_out)
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def gemm_rate(device: torch.device, size: int = 2048) -> float:
    """Multiply-adds per second of a plain float32 ``size³`` matmul (best of 5)."""
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    a @ b
    best = math.inf
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def weight_grad_macs(base: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-adds of the weight gradient of ``base`` on an input of ``shape``.

    What a step with a trainable ``ΔW`` computes beyond the frozen base's
    step: the base layer already runs its forward and its input gradient.
    """
    with torch.no_grad():
        out = base(torch.zeros(tuple(shape), device=base.weight.device))
    return out.numel() * math.prod(base.weight.shape[1:])


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} line")
    return int(match.group(1)) * 1024


def _peak_step_bytes(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> int:
    _step(module, x, grad_out)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _proc_status("VmRSS")
    _step(module, x, grad_out)
    return _proc_status("VmHWM") - before


def memory_worker(case_name: str, quick: bool) -> None:
    """Subprocess entry: print ``{variant: peak bytes}`` for one case as JSON."""
    torch.set_num_threads(_THREADS)
    case = next(c for c in CASES if c.name == case_name)
    modules, _ = build_variants(case)
    x, grad_out = _inputs(modules["base"], case.quick_input_shape if quick else case.input_shape)
    print(json.dumps({name: _peak_step_bytes(m, x, grad_out) for name, m in modules.items()}))


def measure_memory(script: str, name: str, quick: bool) -> dict[str, int] | None:
    """Run ``script --memory-worker name`` in a fresh process; ``None`` where that cannot work.

    The script's worker prints ``{variant: peak bytes}`` as JSON (see
    :func:`memory_worker`).
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    command = [sys.executable, os.path.abspath(script), "--memory-worker", name]
    if quick:
        command.append("--quick")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=_MMAP_THRESHOLD)
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_memory(
    modules: dict[str, nn.Module],
    shape: Sequence[int],
    device: torch.device,
    *,
    script: str,
    name: str,
    quick: bool,
) -> dict[str, int]:
    """Peak step memory per variant: the allocator's counter on CUDA, a fresh process on CPU."""
    if device.type == "cuda":
        return cuda_memory(modules, shape, device)
    return measure_memory(script, name, quick)


def _fmt_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:8.1f}"


def report_case(
    case: Case,
    shape: Sequence[int],
    modules: dict[str, nn.Module],
    rank: int,
    samples: dict[str, list[float]],
    memory: dict[str, int] | None,
) -> None:
    """Print one shape's table: medians, and the fastest sample as a noise gauge."""
    print(f"\n## {case.name}: {modules['base'].layer!r}, input {tuple(shape)}")
    print(f"FLoRA ranks {case.ranks}; PEFT LoRA r={rank}")
    if case.name == "depthwise":
        print(
            "note: PEFT needs r divisible by groups=96 (lora_A is a dense 96→r 7×7 conv) "
            "and cannot merge grouped convolutions: its budget here is not comparable."
        )
    times = {name: statistics.median(values) for name, values in samples.items()}
    base = times["base"]
    print(
        f"{'variant':<18}{'trainable':>11}{'ms/step':>10}{'min ms':>9}{'x base':>8}{'+ms':>9}"
        f"{'peak MiB':>10}"
    )
    for name, module in modules.items():
        trainable = _trainable(module)
        peak = None if memory is None else memory[name]
        print(
            f"{name:<18}{trainable:>11}{times[name] * 1e3:>10.2f}{min(samples[name]) * 1e3:>9.2f}"
            f"{times[name] / base:>8.3f}{(times[name] - base) * 1e3:>9.2f}{_fmt_mib(peak):>10}"
        )
    one, two = _overhead(samples, "flora-auto"), _overhead(samples, "flora-two-active")
    print(
        f"two active adapters add {two * 1e3:.2f} ms to the base step, one adds "
        f"{one * 1e3:.2f} ms" + (f" ({two / one:.2f}x)" if one > 0 else "")
    )


def _paired(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over repeats of ``name / reference``, both timed within the same repeat."""
    pairs = zip(samples[name], samples[reference], strict=True)
    return statistics.median(a / b for a, b in pairs)


def _overhead(samples: dict[str, list[float]], name: str) -> float:
    """Median over repeats of the seconds ``name`` adds to the base in the same repeat."""
    pairs = zip(samples[name], samples["base"], strict=True)
    return statistics.median(a - b for a, b in pairs)


def evaluate_targets(case: Case, samples: dict[str, list[float]]) -> list[tuple[str, bool, str]]:
    """The three targets for one shape: (label, passed, evidence).

    Every comparison is paired: the statistic of each repeat compares two
    variants timed moments apart, and the verdict uses the median over repeats.
    """
    medians = {name: statistics.median(values) for name, values in samples.items()}
    fastest = min(("flora-dense", "flora-factorized"), key=medians.__getitem__)
    auto_ratio = _paired(samples, "flora-auto", fastest)
    flora_overhead = _overhead(samples, "flora-auto")
    peft_overhead = _overhead(samples, "peft-lora")
    merged_ratio = _paired(samples, "flora-merged", "base")
    return [
        (
            f"{case.name}: auto within {AUTO_SLACK - 1:.0%} of the faster of dense/factorized",
            auto_ratio <= AUTO_SLACK,
            f"auto / {fastest.removeprefix('flora-')} = {auto_ratio:.3f}",
        ),
        (
            f"{case.name}: FLoRA auto overhead <= {OVERHEAD_RATIO}x PEFT LoRA overhead",
            flora_overhead <= OVERHEAD_RATIO * peft_overhead,
            f"FLoRA {flora_overhead * 1e3:+.2f} ms vs PEFT {peft_overhead * 1e3:+.2f} ms"
            + (
                f" ({flora_overhead / peft_overhead:.2f}x)"
                if min(flora_overhead, peft_overhead) > 0
                else ""
            ),
        ),
        (
            f"{case.name}: merged FLoRA within {MERGED_SLACK - 1:.0%} of the base",
            merged_ratio <= MERGED_SLACK,
            f"merged / base = {merged_ratio:.3f}",
        ),
    ]


def cuda_memory(
    modules: dict[str, nn.Module], shape: Sequence[int], device: torch.device
) -> dict[str, int]:
    """Peak CUDA memory one warmed-up step adds on top of what was allocated before it."""
    x, grad_out = _inputs(modules["base"], shape, device)
    peaks = {}
    for name, module in modules.items():
        _step(module, x, grad_out)
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(module, x, grad_out)
        _sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - before
    return peaks


def report_floor(case: Case, shape: Sequence[int], module: nn.Module, added: float, rate: float):
    """The weight gradient's multiply-adds at the plain GEMM rate, against FLoRA's added time."""
    macs = weight_grad_macs(module.layer.base_layer, shape)
    floor = macs / rate
    print(
        f"flop floor: the weight gradient is {macs / 1e6:.0f} M multiply-adds, "
        f"{floor * 1e3:.2f} ms at the GEMM rate; FLoRA auto adds {added * 1e3:.2f} ms "
        f"= {added / floor:.1f}x the floor"
    )


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one table per shape, then the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:N]; CUDA times synchronize"
    )
    parser.add_argument(
        "--cases", nargs="+", choices=[c.name for c in CASES], help="only these shapes"
    )
    parser.add_argument("--memory-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick)
        return 0
    torch.set_num_threads(_THREADS)
    device = torch.device(args.device)
    repeats, inner, warmup = (3, 1, 1) if args.quick else (7, 2, 1)
    rate = gemm_rate(device)
    print(
        f"torch {torch.__version__}, {_describe(device)}, float32, "
        f"median of {repeats} interleaved repeats x {inner} steps; "
        "step = forward + backward to the input and the trainable parameters; "
        f"plain GEMM {rate / 1e9:.1f} G multiply-adds/s"
    )
    verdicts = []
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        shape = case.quick_input_shape if args.quick else case.input_shape
        modules, rank = build_variants(case)
        modules = {name: module.to(device) for name, module in modules.items()}
        samples = time_case(modules, shape, repeats, inner, warmup, device)
        memory = None
        if not args.no_memory:
            memory = peak_memory(
                modules, shape, device, script=__file__, name=case.name, quick=args.quick
            )
        report_case(case, shape, modules, rank, samples, memory)
        report_floor(case, shape, modules["flora-auto"], _overhead(samples, "flora-auto"), rate)
        verdicts += evaluate_targets(case, samples)
    print("\n## targets")
    for label, passed, evidence in verdicts:
        print(f"{'PASS' if passed else 'FAIL'}  {label}: {evidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
