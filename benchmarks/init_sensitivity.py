"""How far each parameter group moves ΔW per unit of learning rate, per init (issue 19).

Trains each method a few steps with the study's own optimizer (Adam, the
study's batch size, cosine schedule over the study's steps) and then
measures, on one fixed batch of training data, :func:`flora.sensitivity`
for FLoRA, and the same two numbers for the PEFT LoRA model itself (its
``lora_B`` and ``lora_A`` groups). Figures are sums over the adapted layers,
split by layer kind.

FLoRA methods: the inits by name (``balanced``, ``zero_core``), plus two
N-D variants of ``balanced`` measured for the choice of the N-D rule:
``balanced_orth`` (every factor but ``U_0`` orthonormal, core ``[I 0]``)
and ``balanced_orth3`` (the same with the core divided by ``sqrt(3)``,
the row norm of PEFT's ``lora_A``).

Run (a minute for digits, a few for MiniLM, one thread)::

    .venv/bin/python benchmarks/init_sensitivity.py --study digits --steps 0 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import math
import sys

import torch
from _quality_methods import (
    FloraVariant,
    adapt,
    flora_layer_ranks,
    flora_model,
    lora_model,
    train_head,
    with_new_head,
)
from _quality_train import _Stepper
from torch.nn import functional

import flora

#: N-D variants of ``balanced``: name -> the factor the core ``[I 0]`` is multiplied by.
ORTH_VARIANTS = {"balanced_orth": 1.0, "balanced_orth3": 1.0 / math.sqrt(3.0)}


def orthonormalize(model, core_scale: float) -> None:
    """Rewrite N-D balanced adapters: factors 1.. orthonormal, core ``[I 0] · core_scale``."""
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            adapter = layer.adapter()
            if len(adapter.factors) < 3:
                continue
            for factor in list(adapter.factors)[1:]:
                factor.copy_(torch.linalg.qr(torch.randn_like(factor)).Q)
            adapter.core.mul_(core_scale)


def _lora_groups(model) -> dict[str, dict[str, float]]:
    """Per PEFT LoRA layer: ΔW moved per unit LR by a sign step of B, and of A."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a_mod, b_mod = module.lora_A["default"], module.lora_B["default"]
        scaling = module.scaling["default"]
        a = a_mod.weight.detach().reshape(a_mod.weight.shape[0], -1)
        b = b_mod.weight.detach().reshape(b_mod.weight.shape[0], -1)
        ga = a_mod.weight.grad.reshape(a.shape)
        gb = b_mod.weight.grad.reshape(b.shape)
        kind = type(module.get_base_layer()).__name__
        out[name] = {
            "kind": kind,
            "LoRA B": float(scaling * (gb.sign() @ a).norm()),
            "LoRA A": float(scaling * (b @ ga.sign()).norm()),
        }
    return out


def _kind(layer) -> str:
    return "conv" if layer.kind.startswith("Conv") else "2-D"


def _flora_groups(model, loss) -> dict[str, dict[str, float]]:
    table = flora.sensitivity(model, loss)
    layers = flora.adapted_layers(model)
    out: dict[str, dict[str, float]] = {}
    for r in table:
        row = out.setdefault(r.layer, {"kind": _kind(layers[r.layer])})
        key = "U_n>1" if r.group.startswith("U_") and r.group not in ("U_0", "U_1") else r.group
        row[key] = row.get(key, 0.0) + r.delta_per_lr
    return out


def _totals(per_layer: dict[str, dict]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for row in per_layer.values():
        kind = "conv" if row["kind"].startswith("Conv") or row["kind"] == "conv" else "2-D"
        into = totals.setdefault(kind, {})
        for key, value in row.items():
            if key != "kind":
                into[key] = into.get(key, 0.0) + value
    return totals


def _setup(study: str):
    if study == "digits":
        import quality as q
        from _quality_setup import load_task, pretrain

        data = load_task()
        base = pretrain(data.source_train, steps=q.FULL.pretrain_steps)

        def build(method, budget, seed):
            if method == "lora":
                return adapt(base, "lora", budget_rank=budget, seed=seed, variant=None)
            init = "balanced" if method.startswith("balanced") else method
            variant = FloraVariant(init=init)
            return adapt(base, "flora_x", budget_rank=budget, seed=seed, variant=variant)

        return build, data, q.TrainSettings(steps=q.FULL.steps), 0.03
    import quality_minilm as q

    experiment = q.FULL
    base, data, _, _ = q._setup(experiment, None)
    targets = q.text_targets(experiment.n_adapted)

    def build(method, budget, seed):
        model = with_new_head(base, seed)
        if method == "lora":
            return train_head(lora_model(model, budget, 1.0, targets))
        variant = FloraVariant(init=method, channel_rule="equal")
        ranks = flora_layer_ranks(base, budget, variant, targets)
        torch.manual_seed(seed)
        return train_head(flora_model(model, ranks, variant))

    settings = q.TrainSettings(steps=experiment.steps, batch_size=experiment.batch_size)
    return build, data, settings, 0.01


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("minilm", "digits"), required=True)
    parser.add_argument("--budget", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10])
    parser.add_argument("--lr", type=float, help="default: the study's LoRA LR")
    parser.add_argument(
        "--methods", nargs="+", default=["lora", "zero_core", "balanced", *ORTH_VARIANTS]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    build, data, settings, lr = _setup(args.study)
    lr = args.lr or lr
    probe = torch.Generator().manual_seed(1234)
    index = torch.randint(data.train.y.numel(), (256,), generator=probe)
    x, y = data.train.x[index], data.train.y[index]

    def loss(model):
        return functional.cross_entropy(model(x), y)

    print(f"{args.study}, budget r = {args.budget}, LR {lr:g}, seed {args.seed}")
    for method in args.methods:
        torch.manual_seed(args.seed)
        adapted = build(method, args.budget, args.seed)
        if method in ORTH_VARIANTS:
            orthonormalize(adapted.model, ORTH_VARIANTS[method])
        options = {"lr": lr, "seed": args.seed, "steps": settings.steps}
        stepper = _Stepper(
            adapted.model, adapted.trainable, data.train, **options, batch_size=settings.batch_size
        )
        adapted.model.train()
        done = 0
        for target in sorted(args.steps):
            for _ in range(target - done):
                stepper.step()
            done = target
            adapted.model.eval()
            if method == "lora":
                adapted.model.zero_grad(set_to_none=True)
                loss(adapted.model).backward()
                totals = _totals(_lora_groups(adapted.model))
                adapted.model.zero_grad(set_to_none=True)
            else:
                totals = _totals(_flora_groups(adapted.model, loss))
            adapted.model.train()
            for kind, row in sorted(totals.items()):
                cells = ", ".join(f"{k} {v:.3g}" for k, v in sorted(row.items()))
                print(f"{method:15s} step {target:3d} {kind:4s}: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
