"""FLoRA and PEFT LoRA: exact export and import, analyze --adapter, compress on a trained adapter.

Four tables:

(a) Export round trips. A small BERT (``transformers.BertConfig``, random
    weights, no download) with FLoRA adapters on every attention and MLP
    Linear and on the word embeddings (``padding_idx`` 0), and a conv net
    with Conv1d, Conv2d, a grouped and a depthwise Conv2d, and Conv3d. The
    adapters get random non-zero cores and factors (as after training),
    are saved with ``flora.save_adapter``, exported with
    ``flora.export_lora`` and loaded with ``peft.PeftModel.from_pretrained``
    into a fresh copy of the base model. Reported: max abs difference of
    the outputs against the FLoRA model, next to the outputs' magnitude
    (target: float32 rounding), and the parameter counts.
(a2) Import round trips. PEFT LoRA adapters made with ``peft.get_peft_model``
    on the same BERT (``use_rslora``, a ``rank_pattern`` and an
    ``alpha_pattern``; the word embeddings' ``padding_idx`` column of
    ``lora_embedding_A`` kept at zero, as PEFT's training leaves it) and on
    the conv net's ungrouped convolutions (a LoRA trained in PEFT mixes a
    grouped conv's channel groups, which no grouped weight holds), with
    random non-zero A and B, saved and read back with ``flora.import_lora``
    into a fresh copy of the base model: max abs difference against the PEFT
    model's outputs. Then flora -> ``export_lora`` -> ``import_lora`` on the
    FLoRA adapters of (a), grouped convolutions included: the largest
    difference of any layer's ΔW, relative to its largest entry.
(b) ``tuckerlib analyze --adapter`` on a synthetic LLaMA-7B-shaped PEFT LoRA
    adapter: rank 64 on the 7 projections of 32 decoder blocks (q, k, v, o
    4096x4096; gate, up 11008x4096; down 4096x11008), written as bfloat16
    safetensors (about 0.3 GB) to a temporary directory and deleted
    afterwards. The factored analysis runs on all 224 layers. The
    materialized path (form ΔW = s·B·A in float32, as analyze sees a ΔW
    between checkpoints of this size, then the same per-tensor analysis,
    ``analyze_delta``) is timed on the layers of ``--blocks`` decoder
    blocks only (default 1: each layer takes seconds) and extrapolated to
    all 32 blocks per projection kind; that extrapolation is labelled.
    Accuracy: the largest relative difference of the r leading singular
    values, factored against materialized, and both against the spectrum of
    the float64 ΔW (eigenvalues of its float64 Gram matrix; on the same
    subset). Targets: >= 20x faster, relative spectrum
    difference <= 1e-5.
(c) ``flora.compress`` on trained adapters: the digits CNN of the quality
    study (scikit-learn's 8x8 digits, no download), pretrained on upright
    digits and adapted with FLoRA (ranks 16 per channel mode, full kernel
    modes, on the three convolutions and the head) to the digits rotated by
    90 degrees. The trained adapter is compressed at three energy levels
    and by the default rule (the ``FLoRA ranks`` column of
    ``analyze --adapter``): adapter parameters against test accuracy, and
    the largest per-layer relative error ``‖ΔW − ΔW'‖ / ‖ΔW‖``.

``--quick`` shrinks them for a smoke run: (a) unchanged but tiny already;
(b) d=512, ffn=1376, rank 16, 4 blocks; (c) 40 pretraining and 40
adaptation steps.

Usage: python benchmarks/bench_interop.py [--quick] [--only a,a2,b,c] [--workdir /tmp]
                                          [--blocks 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from bench_analyze import bf16_bits, write_safetensors

from tuckerlib.cli import main as tuckerlib_main
from tuckerlib.cli._adapter import analyze_layer
from tuckerlib.cli._report import AnalyzeOptions, analyze_delta
from tuckerlib.io import open_adapter

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


# (a) -------------------------------------------------------------------------


def _randomize(model: object, seed: int) -> None:
    import torch

    import flora

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for p in (layer.core, *layer.factors):
                p.add_(0.3 * torch.randn(p.shape, generator=generator))


def _bert() -> tuple[object, object, Callable[[], object], object]:
    import torch
    from transformers import BertConfig, BertModel

    import flora

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    base = BertModel(config).eval()
    targets = ["query", "key", "value", "dense", "word_embeddings"]
    flora_config = flora.FLoRAConfig(ranks=8, scale=0.5, target_modules=targets)
    ids = torch.randint(1, 500, (4, 16))
    ids[:, -3:] = 0  # padding tokens

    def run(model: object) -> object:
        return model(input_ids=ids).last_hidden_state

    return base, flora_config, run, "BERT (2 layers, hidden 64)"


def _conv_net() -> tuple[object, object, Callable[[], object], object]:
    import torch
    from torch import nn

    import flora

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1d = nn.Conv1d(3, 16, 5, padding=2)
            self.conv2d = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
            self.depthwise = nn.Conv2d(32, 32, 3, padding="same", groups=32)
            self.conv3d = nn.Conv3d(32, 8, (2, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv1d(x))  # (B, 16, L)
            h = h.unsqueeze(-1) * h.unsqueeze(-2)  # (B, 16, L, L)
            h = self.depthwise(torch.relu(self.grouped(torch.relu(self.conv2d(h)))))
            return self.conv3d(torch.stack([h, h.flip(-1)], dim=2))

    torch.manual_seed(0)
    base = ConvNet().eval()
    flora_config = flora.FLoRAConfig(
        scale=0.5, target_modules=["conv1d", "conv2d", "grouped", "depthwise", "conv3d"]
    )
    x = torch.randn(2, 3, 16)

    def run(model: object) -> object:
        return model(x)

    return base, flora_config, run, "conv net (Conv1d/2d/3d, grouped, depthwise)"


def _round_trip(make: Callable[[], tuple]) -> list[str]:
    import peft
    import torch

    import flora

    base, config, run, label = make()
    model = flora.inject(copy.deepcopy(base), config).eval()
    _randomize(model, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        flora.save_adapter(model, Path(tmp) / "flora")
        start = time.perf_counter()
        flora.export_lora(Path(tmp) / "flora", Path(tmp) / "lora")
        export_time = time.perf_counter() - start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "lora").eval()
        with open_adapter(Path(tmp) / "lora") as adapter:
            lora_params = sum(adapter[name].stored_params for name in adapter)
    with torch.no_grad():
        expected, got, plain = run(model), run(lora), run(base)
    layers = flora.adapted_layers(model)
    return [
        label,
        str(len(layers)),
        str(sum(layer.n_adapter_params for layer in layers.values())),
        str(lora_params),
        f"{export_time:.2f}",
        f"{float((got - expected).abs().max()):.2e}",
        f"{float(expected.abs().max()):.2e}",
        f"{float((expected - plain).abs().max()):.2e}",
    ]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def table_a() -> None:
    header = ["model", "layers", "FLoRA params", "LoRA params", "export s", "max |PEFT - FLoRA|",
              "max |out|", "max |FLoRA - base|"]  # fmt: skip
    print("\n(a) flora adapter -> export_lora -> peft.PeftModel.from_pretrained: outputs")
    _print_table([header, *(_round_trip(make) for make in (_bert, _conv_net))])
    print("target: max |PEFT - FLoRA| at float32 rounding of max |out|")


# (a2) ------------------------------------------------------------------------

#: PEFT options of the import round trips, per model.
_PEFT_OPTIONS = {
    "BERT (2 layers, hidden 64)": {
        "r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"value": 4},
        "alpha_pattern": {"dense": 4},
        "target_modules": ["query", "key", "value", "dense", "word_embeddings"],
    },
    "conv net (Conv1d/2d/3d, grouped, depthwise)": {
        "r": 4, "lora_alpha": 8, "target_modules": ["conv1d", "conv2d", "conv3d"],
    },
}  # fmt: skip
_IMPORT_LABELS = {"conv net (Conv1d/2d/3d, grouped, depthwise)": "conv net (Conv1d/2d/3d)"}


def _trained_peft(base: object, options: dict) -> object:
    """A PEFT LoRA model with non-zero A and B, as after training."""
    import peft
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        for module in model.modules():
            # PEFT's lookup never sends gradient to the padding column of
            # lora_embedding_A, which starts at zero: training leaves it zero.
            padding_idx = getattr(getattr(module, "base_layer", None), "padding_idx", None)
            if hasattr(module, "lora_embedding_A") and padding_idx is not None:
                for a in module.lora_embedding_A.values():
                    a[:, padding_idx] = 0
    return model.eval()


def _import_row(make: Callable[[], tuple]) -> list[str]:
    import torch

    import flora
    from tuckerlib.io import open_adapter as open_dir

    base, _, run, label = make()
    lora = _trained_peft(base, _PEFT_OPTIONS[label])
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_pretrained(tmp)
        with open_dir(tmp) as adapter:
            lora_params = sum(adapter[name].stored_params for name in adapter)
        start = time.perf_counter()
        model = flora.import_lora(copy.deepcopy(base), tmp).eval()
        seconds = time.perf_counter() - start
    layers = flora.adapted_layers(model)
    with torch.no_grad():
        expected, got = run(lora), run(model)
    return [
        f"PEFT LoRA -> import_lora, {_IMPORT_LABELS.get(label, label)}",
        str(len(layers)),
        str(lora_params),
        str(sum(layer.n_adapter_params for layer in layers.values())),
        f"{seconds:.2f}",
        f"{float((got - expected).abs().max()):.2e}",
        f"{float(expected.abs().max()):.2e}",
    ]


def _flora_round_trip_row(make: Callable[[], tuple]) -> list[str]:
    import torch

    import flora

    base, config, run, label = make()
    model = flora.inject(copy.deepcopy(base), config).eval()
    _randomize(model, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        flora.export_lora(model, Path(tmp) / "lora")
        start = time.perf_counter()
        back = flora.import_lora(copy.deepcopy(base), Path(tmp) / "lora").eval()
        seconds = time.perf_counter() - start
    before, after = flora.adapted_layers(model), flora.adapted_layers(back)
    gap = 0.0
    with torch.no_grad():
        for name, layer in before.items():
            delta = layer.delta_weight()
            difference = (after[name].delta_weight() - delta).abs().max() / delta.abs().max()
            gap = max(gap, float(difference))
        expected, got = run(model), run(back)
    return [
        f"flora -> export_lora -> import_lora, {label}",
        str(len(before)),
        str(sum(layer.n_adapter_params for layer in before.values())),
        str(sum(layer.n_adapter_params for layer in after.values())),
        f"{seconds:.2f}",
        f"{float((got - expected).abs().max()):.2e}",
        f"{float(expected.abs().max()):.2e}",
        f"{gap:.1e}",
    ]


def table_a2() -> None:
    print("\n(a2) PEFT LoRA -> flora.import_lora: outputs against PEFT's")
    header = ["round trip", "layers", "LoRA params", "FLoRA params", "import s",
              "max |FLoRA - PEFT|", "max |out|"]  # fmt: skip
    _print_table([header, *(_import_row(make) for make in (_bert, _conv_net))])
    print("\n     flora -> export_lora -> import_lora: the same adapter back")
    header = ["round trip", "layers", "FLoRA params", "params back", "import s",
              "max |out diff|", "max |out|", "max rel. dW diff"]  # fmt: skip
    _print_table([header, *(_flora_round_trip_row(make) for make in (_bert, _conv_net))])
    print("target: differences at float32 rounding")


# (b) -------------------------------------------------------------------------


def _llama_shapes(d: int, ff: int, blocks: int) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every LoRA target."""
    shapes = {}
    for block in range(blocks):
        prefix = f"model.layers.{block}"
        for p in "qkvo":
            shapes[f"{prefix}.self_attn.{p}_proj"] = (d, d)
        shapes[f"{prefix}.mlp.gate_proj"] = (ff, d)
        shapes[f"{prefix}.mlp.up_proj"] = (ff, d)
        shapes[f"{prefix}.mlp.down_proj"] = (d, ff)
    return shapes


def write_lora(directory: Path, shapes: dict[str, tuple[int, int]], rank: int) -> Path:
    """A PEFT LoRA directory with random bfloat16 A (r, in) and B (out, r), streamed."""
    directory.mkdir()
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name in shapes}),
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors: dict[str, tuple[int, ...]] = {}
    for name, (rows, cols) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = (rank, cols)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (rows, rank)

    def arrays() -> Iterator[np.ndarray]:
        for index, (key, shape) in enumerate(tensors.items()):
            rng = np.random.default_rng(index)
            scale = 1 / math.sqrt(shape[1]) if key.endswith("lora_A.weight") else 0.01
            yield bf16_bits(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    write_safetensors(directory / "adapter_model.safetensors", tensors, "BF16", arrays())
    return directory


def _relative_gap(s: np.ndarray, reference: np.ndarray, rank: int) -> float:
    return float(np.max(np.abs(s[:rank] - reference[:rank]) / reference[:rank]))


def _float64_spectrum(delta: np.ndarray) -> np.ndarray:
    """Singular values of a matrix from its float64 Gram matrix on the smaller side."""
    gram = delta.T @ delta if delta.shape[0] >= delta.shape[1] else delta @ delta.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def _materialized(adapter: object, names: list[str], rank: int, options: AnalyzeOptions) -> dict:
    """Per-projection seconds of the materialized path, and spectrum gaps, on ``names``."""
    seconds: dict[str, list[float]] = {p: [] for p in PROJECTIONS}
    gaps = {"factored vs materialized": 0.0, "factored vs float64 dense": 0.0,
            "materialized vs float64 dense": 0.0}  # fmt: skip
    for name in names:
        layer = adapter[name]
        start = time.perf_counter()
        delta = layer.to_tensor(np.float32)
        dense = analyze_delta(f"{name}.weight", delta, 0.0, options)
        seconds[name.rsplit(".", 1)[1].removesuffix("_proj")].append(time.perf_counter() - start)
        factored = analyze_layer(layer, options)
        reference = _float64_spectrum(layer.to_tensor(np.float64))
        pairs = {
            "factored vs materialized": (factored.spectra[0], dense.spectra[0]),
            "factored vs float64 dense": (factored.spectra[0], reference),
            "materialized vs float64 dense": (dense.spectra[0], reference),
        }
        for key, (s, t) in pairs.items():
            gaps[key] = max(gaps[key], _relative_gap(np.asarray(s), np.asarray(t), rank))
        del delta
    return {"seconds": seconds, "gaps": gaps}


def table_b(workdir: Path, quick: bool, blocks_timed: int) -> None:
    d, ff, rank, blocks = (512, 1376, 16, 4) if quick else (4096, 11008, 64, 32)
    shapes = _llama_shapes(d, ff, blocks)
    size = sum(2 * rank * (r + c) for r, c in shapes.values())
    free = shutil.disk_usage(workdir).free
    if free < 3 * size:
        raise SystemExit(
            f"(b) needs about {size / 2**30:.1f} GiB free in {workdir}, has {free / 2**30:.1f}"
        )
    options = AnalyzeOptions()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        start = time.perf_counter()
        directory = write_lora(Path(tmp) / "lora", shapes, rank)
        written = time.perf_counter() - start
        out = Path(tmp) / "report.json"
        start = time.perf_counter()
        status = tuckerlib_main(["analyze", "--adapter", str(directory), "--format", "json",
                                 "--quiet", "--out", str(out)])  # fmt: skip
        factored_total = time.perf_counter() - start
        assert status == 0
        report = json.loads(out.read_text())
        timed = [name for name in shapes if int(name.split(".")[2]) < blocks_timed]
        with open_adapter(directory) as adapter:
            measured = _materialized(adapter, timed, rank, options)
    per_kind = {p: float(np.mean(t)) for p, t in measured["seconds"].items()}
    extrapolated = blocks * sum(per_kind.values())
    print(
        f"\n(b) analyze --adapter on a LLaMA-7B-shaped rank-{rank} LoRA (d={d}, ffn={ff}, "
        f"{blocks} blocks x 7 = {len(shapes)} layers, bfloat16, {size / 2**20:.0f} MiB written in "
        f"{written:.0f} s)"
    )
    per_layer = factored_total / len(shapes) * 1e3
    print(f"{'factored, all layers (measured)':<46}{factored_total:>9.2f} s  "
          f"({per_layer:.1f} ms per layer, {len(report['tensors'])} analysed)")  # fmt: skip
    for p in PROJECTIONS:
        print(f"  materialized {p + '_proj':<10} (mean of {len(measured['seconds'][p])}, measured)"
              f"{per_kind[p]:>9.2f} s per layer")  # fmt: skip
    print(f"{'materialized, all layers (extrapolated)':<46}{extrapolated:>9.1f} s  "
          f"({blocks_timed} of {blocks} blocks measured, per-kind mean x {blocks})")  # fmt: skip
    print(f"{'speed-up':<46}{extrapolated / factored_total:>9.1f} x  target >= 20")
    for key, gap in measured["gaps"].items():
        print(f"{'max rel. diff of the ' + str(rank) + ' leading singular values, ' + key:<46}"
              f"  {gap:.1e}")  # fmt: skip
    print(
        "target: factored vs materialized <= 1e-5 (materialized: float32 Gram matrices of dW; "
        "factored: float64 Gram square roots of the factors, SVD of the small core)"
    )


# (c) -------------------------------------------------------------------------


def _adapt_digits(steps: int, pretrain_steps: int) -> tuple[object, object]:
    """(FLoRA-adapted digits CNN trained on the rotated digits, the task's data)."""
    import torch
    from _quality_setup import TARGET_MODULES, load_task, pretrain
    from torch.nn import functional

    import flora

    data = load_task()
    base = pretrain(data.source_train, steps=pretrain_steps)
    config = flora.FLoRAConfig(
        ranks={"Conv2d": (16, 16, None, None), "Linear": 10},
        target_modules=list(TARGET_MODULES),
        forward="dense",  # 8x8 maps: one dense conv beats three small ones
    )
    torch.manual_seed(0)
    model = flora.inject(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(data.train.y.numel(), (64,), generator=generator)
        loss = functional.cross_entropy(model(data.train.x[index]), data.train.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), data


def _test_accuracy(model: object, data: object) -> float:
    import torch

    with torch.no_grad():
        return float((model(data.test.x).argmax(dim=1) == data.test.y).float().mean())


def table_c(quick: bool) -> None:
    import flora

    steps, pretrain_steps = (40, 40) if quick else (300, 600)
    start = time.perf_counter()
    trained, data = _adapt_digits(steps, pretrain_steps)
    seconds = time.perf_counter() - start
    with flora.disable_adapter(trained):
        base_accuracy = _test_accuracy(trained, data)
    rows = [
        ["adapter", "params", "test acc.", "max rel. error", "compress s"],
        ["base model, no adapter", "0", f"{base_accuracy:.3f}", "", ""],
        ["trained (uncompressed)", str(flora.trainable_parameters(trained)),
         f"{_test_accuracy(trained, data):.3f}", "", ""],
    ]  # fmt: skip
    levels = [("energy 0.99", {"energy": 0.99}), ("energy 0.9", {"energy": 0.9}),
              ("energy 0.7", {"energy": 0.7}), ("default rule", {})]  # fmt: skip
    for label, options in levels:
        model = copy.deepcopy(trained)
        start = time.perf_counter()
        errors = flora.compress(model, **options)
        elapsed = time.perf_counter() - start
        params = sum(layer.n_adapter_params for layer in flora.adapted_layers(model).values())
        rows.append([f"compress, {label}", str(params), f"{_test_accuracy(model, data):.3f}",
                     f"{max(errors.values()):.3f}", f"{elapsed:.3f}"])  # fmt: skip
    print(
        f"\n(c) flora.compress on a FLoRA adapter of the digits CNN trained on rotated digits "
        f"({steps} steps, {seconds:.0f} s with pretraining; {data.test.y.numel()} test images)"
    )
    _print_table(rows)
    print("params: adapter entries (cores and factors of the 4 adapted layers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", default="a,a2,b,c", help="tables to run, e.g. 'b'")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--blocks", type=int, default=1, help="blocks timed materialized in (b)")
    args = parser.parse_args()
    tables = set(args.only.split(","))
    if "a" in tables:
        table_a()
    if "a2" in tables:
        table_a2()
    if "b" in tables:
        table_b(args.workdir, args.quick, args.blocks)
    if "c" in tables:
        table_c(args.quick)


if __name__ == "__main__":
    main()
