"""Which objective should ranks_for_budget maximize? Sum against product of kept fractions.

For tensors with three or more modes, ``tuckerlib.ranks_for_budget`` estimates
the energy that ranks keep from the mode spectra alone. This script compares
two estimates by the error that actually matters, the ST-HOSVD error at the
ranks each one picks, on the bundled example's convolutions, a random tensor
and a planted low-rank tensor, at the parameter budgets of rank-R LoRAs:

* ``sum``: the additive HOSVD surrogate ``Σ_n f_n(R_n)``;
* ``product``: ``Π_n f_n(R_n)`` (what ``ranks_for_budget`` maximizes),

where ``f_n(R)`` is the fraction of the energy mode ``n`` keeps at rank ``R``.
Both are maximized by brute force here. Usage::

    python benchmarks/bench_rank_objective.py
"""

from __future__ import annotations

import itertools
import math
from importlib import resources

import numpy as np

import tuckerlib as tl
from tuckerlib.io import open_checkpoint, read_delta


def best_ranks(spectra, shape, budget, objective, fixed):
    fractions = [np.cumsum(s.astype(np.float64) ** 2) / np.sum(s.astype(np.float64) ** 2)
                 for s in spectra]  # fmt: skip
    choices = [range(1, size + 1) if n not in fixed else [fixed[n]] for n, size in enumerate(shape)]
    best = None
    for ranks in itertools.product(*choices):
        params = tl.tucker_params(shape, ranks)
        if params > budget:
            continue
        kept = [fractions[n][r - 1] for n, r in enumerate(ranks)]
        value = sum(kept) if objective == "sum" else math.prod(kept)
        if best is None or (value, -params) > best[0]:
            best = ((value, -params), ranks)
    return best[1]


def cases():
    data = resources.files("tuckerlib") / "data"
    with (
        open_checkpoint(data / "digits_cnn_base.safetensors") as base,
        open_checkpoint(data / "digits_cnn_tuned.safetensors") as tuned,
    ):
        for name in ("conv2.weight", "conv3.weight"):
            yield name, read_delta(base, tuned, name, np.float64)
    rng = np.random.default_rng(0)
    yield "random 32x32x3x3", rng.standard_normal((32, 32, 3, 3))
    shape, rank = (32, 24, 3, 3), (4, 6, 2, 2)
    sizes = zip(shape, rank, strict=True)
    factors = [np.linalg.qr(rng.standard_normal((i, r)))[0] for i, r in sizes]
    x = tl.tucker_to_tensor(rng.standard_normal(rank), factors)
    noise = rng.standard_normal(shape) * np.linalg.norm(x) / math.sqrt(x.size)
    yield "planted (4,6,2,2) + 5% noise", x + 0.05 * noise


def main() -> None:
    wins = {"sum": 0, "product": 0, "tie": 0}
    print(f"{'tensor':30} {'R':>3} {'kernel':>6}  {'sum ranks':>14} {'err':>6}  "
          f"{'product ranks':>14} {'err':>6}  better")  # fmt: skip
    for name, x in cases():
        spectra = [np.asarray(s) for s in tl.mode_spectra(x)]
        out, rest = x.shape[0], math.prod(x.shape[1:])
        for lora_rank in (1, 2, 4, 8, 16):
            budget = lora_rank * (out + rest)
            for fixed in ({}, {2: x.shape[2], 3: x.shape[3]}):
                picked = {
                    o: best_ranks(spectra, x.shape, budget, o, fixed) for o in ("sum", "product")
                }
                err = {o: tl.relative_error(x, tl.sthosvd(x, r)) for o, r in picked.items()}
                better = "tie" if abs(err["sum"] - err["product"]) < 1e-9 else min(err, key=err.get)
                wins[better] += 1
                print(f"{name:30} {lora_rank:>3} {'pinned' if fixed else 'free':>6}  "
                      f"{picked['sum']!s:>14} {err['sum']:6.3f}  "
                      f"{picked['product']!s:>14} {err['product']:6.3f}  {better}")  # fmt: skip
    print(
        f"\nlower ST-HOSVD error: product {wins['product']}, sum {wins['sum']}, tie {wins['tie']}"
    )


if __name__ == "__main__":
    main()
