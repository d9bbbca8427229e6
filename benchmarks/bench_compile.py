"""``torch.compile`` time of a FLoRA-adapted transformer against PEFT LoRA's.

The model is all-MiniLM-L6-v2's architecture (``_minilm.py``: a 6-layer BERT,
384 wide, random weights) with each library's default targets (PEFT's LoRA
defaults for BERT, ``query`` and ``value``, which ``flora.FLoRAConfig()``
takes too) at rank 8. Each run is a fresh Python process that compiles the
model with ``fullgraph=True`` and times

* ``train``: the first training step (forward and backward of a batch of
  8 × 64 tokens), which compiles the training graph;
* ``eval``: the first inference forward (eval mode, ``torch.no_grad()``),
  which compiles the inference graph.

Backends ``aot_eager`` (TorchDynamo and AOTAutograd: where adapter code is
traced) and ``inductor`` (plus code generation), each with a cold cache (a
new, empty ``TORCHINDUCTOR_CACHE_DIR``) and a warm one (the same directory
again, right after the cold run). FLoRA and PEFT runs alternate within each
configuration so that drifting machine load hits both alike; the table shows
medians over the repeats and the ratio flora / PEFT. Each child also reports
its graph count and graph breaks (``fullgraph=True`` would fail on a break).

Usage::

    python benchmarks/bench_compile.py                      # about 8 minutes on 2 cores
    python benchmarks/bench_compile.py --backends aot_eager  # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("flora", "peft")
PHASES = ("train", "eval")


def _child(method: str, backend: str) -> None:
    """One compile, timed; prints a JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from _minilm import minilm
    from torch._dynamo.utils import counters

    torch.set_num_threads(2)
    model = minilm()
    if method == "flora":
        import flora

        flora.inject(model, flora.FLoRAConfig())
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8))
    ids = torch.randint(1, 30000, (8, 64), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    seconds = {}
    model.train()
    start = time.perf_counter()
    compiled(input_ids=ids).last_hidden_state.square().mean().backward()
    seconds["train"] = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=ids)
    seconds["eval"] = time.perf_counter() - start
    stats = counters["stats"]
    breaks = sum(counters["graph_break"].values())
    print(json.dumps({**seconds, "graphs": stats["unique_graphs"], "breaks": breaks}))


def _run(method: str, backend: str, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache)}
    here = Path(__file__).resolve()
    done = subprocess.run(
        [sys.executable, str(here), "--child", method, backend],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=here.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{method} {backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], phase: str) -> float:
    """Median seconds of ``phase`` (``"total"``: train plus eval) over runs."""
    return statistics.median(
        sum(r[p] for p in PHASES) if phase == "total" else r[phase] for r in runs
    )


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    print(f"bench_compile: MiniLM (6x384) + rank-8 adapters on query/value, 2 threads; {_load()}")
    results: dict[tuple[str, str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for backend in args.backends:
            order = METHODS if repeat % 2 == 0 else METHODS[::-1]
            with tempfile.TemporaryDirectory() as root:
                for cache in ("cold", "warm"):
                    for method in order:
                        directory = Path(root) / method
                        result = _run(method, backend, directory)
                        results.setdefault((backend, cache, method), []).append(result)
                        print(
                            f"  {backend:<9} {cache} {method:<5} {json.dumps(result)}  ({_load()})"
                        )
    header = (
        f"{'backend':<10} {'cache':<5} {'phase':<6} {'flora s':>8} {'peft s':>8} "
        f"{'ratio':>6} {'graphs':>7} {'breaks':>7}"
    )
    print(header)
    print("-" * len(header))
    for backend in args.backends:
        for cache in ("cold", "warm"):
            runs = {m: results[(backend, cache, m)] for m in METHODS}
            for phase in (*PHASES, "total"):
                flora_s, peft_s = (_median(runs[m], phase) for m in METHODS)
                graphs = "/".join(str(runs[m][0]["graphs"]) for m in METHODS)
                breaks = "/".join(str(runs[m][0]["breaks"]) for m in METHODS)
                print(
                    f"{backend:<10} {cache:<5} {phase:<6} {flora_s:8.1f} {peft_s:8.1f} "
                    f"{flora_s / peft_s:6.2f} {graphs:>7} {breaks:>7}"
                )
    print(f"graphs and breaks are flora/peft; {_load()} at the end")


if __name__ == "__main__":
    main()
