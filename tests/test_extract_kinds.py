"""Extraction onto the registry's kinds: GPT-2's Conv1D and MultiheadAttention, with ``model=``."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

import flora  # noqa: E402
from flora.cli import main  # noqa: E402


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return tuned


def _save(model: torch.nn.Module, path: Path, skip: tuple[str, ...] = ()) -> Path:
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items() if k not in skip}
    save_file(state, path)
    return path


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)


@pytest.fixture
def gpt2(tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module, Path, Path]:
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(_gpt2_config()).eval()
    tuned = _perturbed(base)
    tied = ("lm_head.weight",)  # tied to transformer.wte, as save_pretrained leaves it out
    return (
        base,
        tuned,
        _save(base, tmp_path / "base.safetensors", tied),
        _save(tuned, tmp_path / "tuned.safetensors", tied),
    )


def _skeleton() -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(_gpt2_config())


def _assert_weights(merged: torch.nn.Module, tuned: torch.nn.Module, names, atol: float) -> None:
    state, expected = merged.state_dict(), tuned.state_dict()
    for name in names:
        torch.testing.assert_close(state[name], expected[name], atol=atol, rtol=0)


def test_gpt2_conv1d_layers_extract_as_conv1d_and_merge_to_the_tuned_weights(
    gpt2, tmp_path
) -> None:
    base, tuned, base_path, tuned_path = gpt2
    result = flora.extract(
        base_path,
        tuned_path,
        tmp_path / "adapter",
        rank=10_000,
        model=_skeleton(),
        include=r"\.h\.",
    )
    assert {layer.kind for layer in result.layers} == {"Conv1D"}
    c_fc = next(layer for layer in result.layers if layer.name.endswith("h.0.mlp.c_fc"))
    assert c_fc.tensor == "transformer.h.0.mlp.c_fc.weight"
    assert c_fc.shape == (128, 32)  # the (out, in) map; the stored weight is (32, 128)
    assert all(layer.relative_error < 1e-5 for layer in result.layers)
    model = flora.load_adapter(copy.deepcopy(base), result.directory)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert isinstance(model.transformer.h[0].attn.c_attn, flora.Conv1D)
    names = [
        f"transformer.h.{n}.{m}.weight"
        for n in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    reference = copy.deepcopy(base)  # the base with the fine-tune's Conv1D weights
    reference.load_state_dict({name: tuned.state_dict()[name] for name in names}, strict=False)
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    merged = flora.unload(model, merge=True)
    _assert_weights(merged, tuned, names, atol=1e-6)


def test_gpt2_truncated_conv1d_error_is_the_reported_one(gpt2, tmp_path) -> None:
    base, tuned, base_path, tuned_path = gpt2
    result = flora.extract(
        base_path, tuned_path, tmp_path / "adapter", rank=4, model=_skeleton(), include="c_fc"
    )
    merged = flora.unload(flora.load_adapter(copy.deepcopy(base), result.directory), merge=True)
    for layer in result.layers:
        assert layer.ranks == (4, 4)
        name = f"{layer.name}.weight"
        delta = (tuned.state_dict()[name] - base.state_dict()[name]).T
        got = (merged.state_dict()[name] - base.state_dict()[name]).T
        error = (torch.linalg.norm(got - delta) / torch.linalg.norm(delta)).item()
        assert error == pytest.approx(layer.relative_error, rel=1e-3)
        assert 0.1 < error < 1  # a real truncation


def test_gpt2_carried_conv1d_biases_are_the_layers_bias_updates(gpt2, tmp_path) -> None:
    base, tuned, base_path, tuned_path = gpt2
    result = flora.extract(
        base_path,
        tuned_path,
        tmp_path / "adapter",
        rank=10_000,
        model=_skeleton(),
        include=r"h\.0\.attn\.c_attn",
        carry_1d=True,
    )
    assert result.carried == [
        ("transformer.h.0.attn.c_attn.bias", "bias update of its adapted layer")
    ]
    merged = flora.unload(flora.load_adapter(copy.deepcopy(base), result.directory), merge=True)
    _assert_weights(merged, tuned, ["transformer.h.0.attn.c_attn.bias"], atol=0)


def test_gpt2_without_a_model_the_conv1d_weights_do_not_load(gpt2, tmp_path) -> None:
    base, _, base_path, tuned_path = gpt2
    result = flora.extract(base_path, tuned_path, tmp_path / "adapter", rank=2, include="c_fc")
    assert {layer.kind for layer in result.layers} == {"Linear"}
    with pytest.raises(ValueError, match=r"c_fc"):
        flora.load_adapter(copy.deepcopy(base), result.directory)


class Attention(torch.nn.Module):
    """Two attentions, one packed and one with separate q/k/v weights, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.split = torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, k, v):  # type: ignore[no-untyped-def]
        y = self.packed(x, x, x, need_weights=False)[0]
        return self.head(self.split(y, k, v, need_weights=False)[0])


@pytest.fixture
def attention(tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module, Path, Path]:
    torch.manual_seed(0)
    base = Attention().eval()
    tuned = _perturbed(base)
    return (
        base,
        tuned,
        _save(base, tmp_path / "base.safetensors"),
        _save(tuned, tmp_path / "tuned.safetensors"),
    )


def test_multihead_attention_extracts_per_projection_and_merges_to_tuned(
    attention, tmp_path
) -> None:
    base, tuned, base_path, tuned_path = attention
    result = flora.extract(
        base_path, tuned_path, tmp_path / "adapter", rank=10_000, model=Attention()
    )
    kinds = {layer.name: (layer.kind, layer.shape) for layer in result.layers}
    assert kinds == {
        "packed.in_proj_weight": ("MultiheadAttention", (48, 16)),
        "packed.out_proj.weight": ("MultiheadAttention", (16, 16)),
        "split.q_proj_weight": ("MultiheadAttention", (16, 16)),
        "split.k_proj_weight": ("MultiheadAttention", (16, 8)),
        "split.v_proj_weight": ("MultiheadAttention", (16, 12)),
        "split.out_proj.weight": ("MultiheadAttention", (16, 16)),
        "head": ("Linear", (4, 16)),
    }
    model = flora.load_adapter(copy.deepcopy(base), result.directory)
    layers = flora.adapted_layers(model)
    assert type(layers["split.k_proj_weight"]).__name__ == "MultiheadAttentionWeight"
    names = [name if "weight" in name else f"{name}.weight" for name in kinds]
    reference = copy.deepcopy(base)  # the base with the fine-tune's weights, not its biases
    reference.load_state_dict({name: tuned.state_dict()[name] for name in names}, strict=False)
    x, k, v = torch.randn(2, 5, 16), torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x, k, v), reference(x, k, v), atol=1e-5, rtol=0)
    merged = flora.unload(model, merge=True)
    _assert_weights(merged, tuned, names, atol=1e-6)


def test_a_checkpoint_tensor_the_model_lacks_is_refused_by_name(attention, tmp_path) -> None:
    _, _, base_path, tuned_path = attention
    wrong = torch.nn.Module()
    wrong.packed = torch.nn.MultiheadAttention(16, 2)
    with pytest.raises(
        flora.ExtractionError,
        match=r"model has no parameter or buffer 'head\.weight' \(5 checkpoint",
    ):
        flora.extract(base_path, tuned_path, tmp_path / "adapter", model=wrong)
    assert not (tmp_path / "adapter").exists()


def test_model_and_as_parameters_conflict(attention, tmp_path) -> None:
    _, _, base_path, tuned_path = attention
    with pytest.raises(flora.ExtractionError, match=r"give model or as_parameters, not both"):
        flora.extract(
            base_path, tuned_path, tmp_path / "adapter", model=Attention(), as_parameters=True
        )
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        flora.extract(base_path, tuned_path, tmp_path / "adapter", model="gpt2")


def test_cli_model_option_reads_the_kinds_from_a_hugging_face_folder(
    gpt2, tmp_path, capsys
) -> None:
    base, tuned, base_path, tuned_path = gpt2
    folder = tmp_path / "gpt2"
    config = _gpt2_config()
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(folder)
    out = tmp_path / "adapter"
    code = main(
        [
            "extract",
            str(base_path),
            str(tuned_path),
            "--out",
            str(out),
            "--ranks",
            "100",
            "--include",
            "c_proj",
            "--model",
            str(folder),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"transformer\.h\.1\.mlp\.c_proj +Conv1D +32x128 ", printed)
    merged = flora.unload(flora.load_adapter(copy.deepcopy(base), out), merge=True)
    _assert_weights(merged, tuned, ["transformer.h.1.mlp.c_proj.weight"], atol=1e-6)


def test_cli_model_option_needs_a_hugging_face_folder(gpt2, tmp_path, capsys) -> None:
    _, _, base_path, tuned_path = gpt2
    code = main(
        [
            "extract",
            str(base_path),
            str(tuned_path),
            "--out",
            str(tmp_path / "a"),
            "--model",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 2
    assert f"--model {tmp_path}: no config.json" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


class Projection(torch.nn.Module):
    """A user's own linear map (no torch.nn.Linear)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class FLoRAProjection(flora.Linear):
    kind = "ExtractedProjection"
    base_type = Projection


def test_a_registered_kind_is_extracted_as_itself(tmp_path) -> None:
    flora.register_layer_kind(FLoRAProjection)
    try:
        torch.manual_seed(0)
        base = torch.nn.Sequential(Projection(6, 5), torch.nn.Linear(5, 3))
        tuned = _perturbed(base)
        paths = [_save(m, tmp_path / f"{n}.safetensors") for n, m in (("b", base), ("t", tuned))]
        result = flora.extract(*paths, tmp_path / "adapter", rank=10_000, model=base)
        assert [(layer.name, layer.kind) for layer in result.layers] == [
            ("0", "ExtractedProjection"),
            ("1", "Linear"),
        ]
        merged = flora.unload(flora.load_adapter(copy.deepcopy(base), result.directory), merge=True)
        _assert_weights(merged, tuned, ["0.weight", "1.weight"], atol=1e-6)
    finally:
        flora.unregister_layer_kind("ExtractedProjection")
