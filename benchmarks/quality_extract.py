"""Extraction measured by task accuracy: a full fine-tune turned into an adapter, then used.

For two (base, full fine-tune) pairs, every :func:`flora.extract` rule is
applied, the adapter is loaded into the base model and merged, and the
merged model is scored on the fine-tune's test set:

* the bundled digits pair (``tuckerlib/data``: a small CNN fine-tuned on
  digits rotated by 90 degrees, ``examples/make_digits_example.py``), on the
  rotated test split that script holds out;
* the pretrained O-Net fully fine-tuned on 48x48 digits (as in
  ``quality_onet.py``; learning rate chosen on the validation split, seed 0),
  on its test split.

Rules: the LoRA-budget ranks 2, 4, 8, 16 and the energies 0.9, 0.95, 0.99,
each without and with HOOI refinement. The anchor is an SVD LoRA of each
layer's ``(out, in·kh·kw)`` update, truncated to the rank whose LoRA pair
costs no more than FLoRA's adapter of that layer. Each is scored as
extracted (weights only) and with the fine-tune's 1-D tensors (biases,
norm scales and shifts, running statistics, PReLU slopes) as well: FLoRA
through ``flora.extract(carry_1d=True)`` (bias updates of the adapted
layers, norm and PReLU modules saved whole), the SVD LoRA anchor by copying
them into its merged model. O-Net's
new head has no pretrained counterpart (its "base" is a random
initialization), so it is excluded from extraction and carried in full by
every method (as PEFT's ``modules_to_save`` would), its size counted.

Run (a few minutes on 2 CPU cores; writes the docs' figure and table)::

    .venv/bin/python benchmarks/quality_extract.py --out docs/_static
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _quality_onet import load_digits48, onet_state_dict, pretrained_onet
from _quality_report import machine, study_arguments, write_json
from _quality_train import Split, TrainSettings, accuracy, train_and_evaluate
from safetensors.torch import load_file, save_file
from torch import nn

import flora
import tuckerlib

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_digits_example.py"


@dataclass(frozen=True)
class Experiment:
    """Rules and O-Net fine-tuning sizes; :data:`FULL` is the published run."""

    budgets: tuple[int, ...] = (2, 4, 8, 16)
    energies: tuple[float, ...] = (0.9, 0.95, 0.99)
    refine: tuple[bool, ...] = (False, True)
    onet_steps: int = 200
    onet_batch_size: int = 32
    onet_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    onet_n_train: int = 300
    onet_n_eval: int | None = None


FULL = Experiment()
QUICK = Experiment(
    budgets=(2,),
    energies=(0.9,),
    refine=(False,),
    onet_steps=2,
    onet_batch_size=8,
    onet_lrs=(1e-3,),
    onet_n_train=40,
    onet_n_eval=40,
)


@dataclass(frozen=True)
class Pair:
    """A base and tuned checkpoint, how to build the model, and the test split."""

    name: str
    base: Path
    tuned: Path
    make_model: Callable[[], nn.Module]
    test: Split
    #: Modules the fine-tune added (a new head): carried in full, never extracted.
    new_modules: tuple[str, ...] = ()

    def new_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of :attr:`new_modules` in ``state``."""
        return {k: v for k, v in state.items() if k.split(".")[0] in self.new_modules}


def _load_example():
    spec = importlib.util.spec_from_file_location("make_digits_example", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_pair() -> Pair:
    """The bundled example pair and the rotated test split its script holds out."""
    example = _load_example()
    _, x_test, _, y_test = example.load_data()
    data = Path(tuckerlib.__file__).parent / "data"
    return Pair(
        "digits CNN",
        data / "digits_cnn_base.safetensors",
        data / "digits_cnn_tuned.safetensors",
        example.DigitsCNN,
        Split(example.rotate(x_test), y_test.long()),
    )


def onet_pair(experiment: Experiment, directory: Path, state: dict | None = None) -> Pair:
    """O-Net with a seed-0 head, and its full fine-tune at the best validation learning rate."""
    state = onet_state_dict() if state is None else state
    data = load_digits48(experiment.onet_n_train, experiment.onet_n_eval)
    base = pretrained_onet(state)
    settings = TrainSettings(steps=experiment.onet_steps, batch_size=experiment.onet_batch_size)
    best = None
    for lr in experiment.onet_lrs:
        model = pretrained_onet(state)
        result = train_and_evaluate(model, list(model.parameters()), data, settings, lr=lr, seed=0)
        if best is None or result.val_accuracy > best[0]:
            best = (result.val_accuracy, lr, model)
    save_file(base.state_dict(), directory / "onet_base.safetensors")
    save_file(best[2].state_dict(), directory / "onet_tuned.safetensors")
    return Pair(
        f"O-Net (full fine-tune lr {best[1]:g})",
        directory / "onet_base.safetensors",
        directory / "onet_tuned.safetensors",
        lambda: pretrained_onet(state),
        data.test,
        new_modules=("head",),
    )


def _model_with(pair: Pair, state: dict[str, torch.Tensor]) -> nn.Module:
    model = pair.make_model()
    model.load_state_dict(state)
    return model.eval()


def _size(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def _one_d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.ndim <= 1}


def _scores(pair: Pair, model: nn.Module, tuned: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Accuracy of ``model`` as it is, then with the fine-tune's 1-D tensors copied in."""
    plain = accuracy(model.eval(), pair.test)
    model.load_state_dict(_one_d(tuned), strict=False)
    return plain, accuracy(model.eval(), pair.test)


def _flora_point(pair: Pair, directory: Path, base, tuned, rule: dict, refine: bool) -> dict:
    """A FLoRA extraction scored as extracted, then extracted with ``carry_1d=True``."""
    exclude = rf"^({'|'.join(pair.new_modules)})\." if pair.new_modules else None
    scores = []
    for carry in (False, True):
        where = directory.with_name(directory.name + ("-1d" if carry else ""))
        extraction = flora.extract(
            pair.base, pair.tuned, where, refine=refine, exclude=exclude, carry_1d=carry, rank=rule
        )
        model = flora.load_adapter(_model_with(pair, {**base, **pair.new_state(tuned)}), where)
        scores.append(accuracy(flora.unload(model, merge=True).eval(), pair.test))
        if not carry:
            sizes = {layer.tensor: layer.n_params for layer in extraction.layers}
    return {
        "method": "FLoRA, HOOI refine" if refine else "FLoRA, ST-HOSVD",
        "n_params": sum(sizes.values()) + _size(pair.new_state(tuned)),
        "accuracy": scores[0],
        "accuracy_carry": scores[1],
        "n_carried": extraction.carried_values,
        "layer_sizes": sizes,
    }


def _svd_lora(delta: torch.Tensor, rank: int) -> torch.Tensor:
    matrix = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape).to(delta.dtype)


def _svd_point(pair: Pair, base, tuned, sizes: dict[str, int]) -> dict:
    """SVD LoRA per layer, at the largest rank whose pair costs no more than FLoRA's adapter."""
    new = pair.new_state(tuned)
    state, total = {**base, **new}, _size(new)
    for name, size in sizes.items():
        shape = base[name].shape
        rows, cols = shape[0], math.prod(shape[1:])
        rank = max(1, min(size // (rows + cols), rows, cols))
        state[name] = base[name] + _svd_lora(tuned[name] - base[name], rank)
        total += rank * (rows + cols)
    plain, carried = _scores(pair, _model_with(pair, state), tuned)
    return {"method": "SVD LoRA", "n_params": total, "accuracy": plain, "accuracy_carry": carried}


def _references(pair: Pair, base, tuned) -> list[dict]:
    rows = []
    new = pair.new_state(tuned)
    for label, state in (
        ("base model" + (" + tuned new head" if new else ""), {**base, **new}),
        ("full fine-tune", tuned),
        ("base + tuned 1-D tensors only", {**base, **new, **_one_d(tuned)}),
    ):
        rows.append({"method": label, "accuracy": accuracy(_model_with(pair, state), pair.test)})
    return rows


def _rules(experiment: Experiment) -> list[tuple[str, dict]]:
    rules = [(f"LoRA budget r = {r}", {"budget_like_lora": r}) for r in experiment.budgets]
    return rules + [(f"energy {e:g}", {"energy": e}) for e in experiment.energies]


def measure_pair(pair: Pair, experiment: Experiment, workdir: Path) -> dict:
    """Every rule with and without refinement, its SVD LoRA anchor, and the references."""
    base, tuned = load_file(pair.base), load_file(pair.tuned)
    n_one_d = sum(v.numel() for k, v in _one_d(tuned).items() if not torch.equal(v, base[k]))
    rows = []
    for label, rule in _rules(experiment):
        for refine in experiment.refine:
            directory = workdir / f"{pair.name[:5]}-{label}-{refine}".replace(" ", "_")
            point = _flora_point(pair, directory, base, tuned, rule, refine)
            sizes = point.pop("layer_sizes")
            rows.append({"rule": label, **point})
            print(f"[extract] {pair.name} {label} {point['method']}", file=sys.stderr, flush=True)
        rows.append({"rule": label, **_svd_point(pair, base, tuned, sizes)})
    return {
        "pair": pair.name,
        "rows": rows,
        "references": _references(pair, base, tuned),
        "n_carried": n_one_d,
    }


def run_experiment(experiment: Experiment, out: Path | None = None, state: dict | None = None):
    """Both pairs; writes ``flora_extract.csv``, ``flora_extract.png`` and raw JSON to ``out``."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pairs = [digits_pair(), onet_pair(experiment, workdir, state)]
        results = [measure_pair(pair, experiment, workdir) for pair in pairs]
    result = {"pairs": results, "seconds": time.perf_counter() - start}
    if out is not None:
        _write(out, result)
    return result


_HEADER = (
    "Checkpoint pair",
    "Rule",
    "Method",
    "Adapter params",
    "Test accuracy",
    "Test accuracy, + tuned 1-D tensors",
)


def table_rows(result: dict) -> list[list[str]]:
    """One row per (pair, rule, method), then each pair's reference rows."""
    lines = []
    for pair in result["pairs"]:
        for r in pair["rows"]:
            lines.append(
                [
                    pair["pair"],
                    r["rule"],
                    r["method"],
                    f"{r['n_params']:,}",
                    f"{r['accuracy']:.3f}",
                    f"{r['accuracy_carry']:.3f}",
                ]
            )
        for r in pair["references"]:
            lines.append([pair["pair"], "n/a", r["method"], "n/a", f"{r['accuracy']:.3f}", "n/a"])
    return lines


def markdown(result: dict) -> str:
    """The table as Markdown."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table_rows(result)])


def _write(out: Path, result: dict) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with (out / "flora_extract.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_HEADER)
        writer.writerows(table_rows(result))
    _figure(out / "flora_extract.png", result)
    write_json(out / "flora_extract_runs.json", {**result, "machine": machine()})


def _figure(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = result["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.4 * len(pairs) / 1.3, 4.2), dpi=100)
    for ax, pair in zip(list(axes), pairs, strict=True):
        methods = dict.fromkeys(r["method"] for r in pair["rows"])
        for colour, method in zip(("C0", "C1", "C2"), methods, strict=False):
            points = sorted(
                (r for r in pair["rows"] if r["method"] == method), key=lambda r: r["n_params"]
            )
            x = [r["n_params"] for r in points]
            ax.plot(x, [r["accuracy"] for r in points], "o-", color=colour, ms=3, label=method)
            ax.plot(
                x,
                [r["accuracy_carry"] for r in points],
                "s--",
                color=colour,
                ms=3,
                label=f"{method} + tuned 1-D",
            )
        tuned = next(r["accuracy"] for r in pair["references"] if r["method"] == "full fine-tune")
        ax.axhline(tuned, color="k", linestyle=":", linewidth=1, label="full fine-tune")
        ax.set_xscale("log")
        ax.set_title(pair["pair"], fontsize=9)
        ax.set_xlabel("adapter parameters (log scale)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = study_arguments(argv, __doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    try:
        state = onet_state_dict()
    except FileNotFoundError as error:
        print(f"quality_extract: {error}", file=sys.stderr)
        return 2
    result = run_experiment(QUICK if args.quick else FULL, args.out, state)
    print(markdown(result))
    print(f"\ntotal time: {result['seconds']:.0f} s on {args.threads} threads; {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
