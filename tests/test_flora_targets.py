"""PEFT's targeting habits: ``target_modules="all-linear"`` and per-architecture defaults.

Each selection is checked against the layers PEFT itself adapts on the same
tiny Hugging Face model (built from a config, nothing downloaded).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bert_config
from torch import nn

import flora

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bert(kind: type[nn.Module] = transformers.BertModel) -> nn.Module:
    torch.manual_seed(0)
    return kind(tiny_bert_config(num_labels=3))


def _peft_targets(model: nn.Module, **options: object) -> set[str]:
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **options))
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix)
        for name, module in adapted.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def _flora_targets(model: nn.Module, **options: object) -> set[str]:
    adapted = flora.inject(copy.deepcopy(model), flora.FLoRAConfig(ranks=2, **options))
    return set(flora.adapted_layers(adapted))


def test_all_linear_on_a_classifier_matches_peft_and_skips_the_head() -> None:
    model = _bert(transformers.BertForSequenceClassification)
    targets = _flora_targets(model, target_modules="all-linear")
    assert targets == _peft_targets(model, target_modules="all-linear", task_type="SEQ_CLS")
    assert "classifier" not in targets
    assert "bert.pooler.dense" in targets
    assert len(targets) == 2 * 6 + 1  # six Linear layers per block, and the pooler
    # The head trained whole beside the adapter: no clash with all-linear.
    saved = _flora_targets(model, target_modules="ALL-LINEAR", modules_to_save=["classifier"])
    assert saved == targets


def test_all_linear_skips_the_output_embeddings_of_a_language_model() -> None:
    model = _bert(transformers.BertForMaskedLM)
    targets = _flora_targets(model, target_modules="all-linear")
    assert targets == _peft_targets(model, target_modules="all-linear")
    assert "cls.predictions.decoder" not in targets
    assert "cls.predictions.transform.dense" in targets


def test_all_linear_on_plain_modules_is_every_linear() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.Sequential(nn.Linear(4, 2)))
    assert _flora_targets(model, target_modules="all-linear") == {"0", "2.0"}
    assert _flora_targets(model, target_modules="all-linear", exclude_modules=["2.0"]) == {"0"}


def test_all_linear_adds_a_second_adapter_to_the_same_layers(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    config = flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    flora.inject(model, config)
    flora.inject(model, config, adapter_name="other")
    assert {n: layer.adapter_names for n, layer in flora.adapted_layers(model).items()} == {
        "0": ("default", "other"),
        "2": ("default", "other"),
    }
    flora.save_adapter(model, tmp_path, adapter_name="other")
    assert flora.read_adapter(tmp_path).config.target_modules == "all-linear"


def test_all_linear_takes_gpt2_conv1d_layers_as_peft_does() -> None:
    config = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    # GPT-2's projections are transformers Conv1D layers, and lm_head is the output layer.
    targets = _flora_targets(model, target_modules="all-linear")
    assert targets == _peft_targets(model, target_modules="all-linear")
    assert targets == {
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


@pytest.mark.parametrize(
    "kind", [transformers.BertModel, transformers.BertForSequenceClassification]
)
def test_default_targets_are_peft_defaults(kind: type[nn.Module]) -> None:
    model = _bert(kind)
    targets = _flora_targets(model)
    assert targets == _peft_targets(model)
    assert {name.rpartition(".")[2] for name in targets} == {"query", "value"}
    assert flora.DEFAULT_TARGET_MODULES["bert"] == ["query", "value"]


def test_default_targets_table_is_peft_table() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    assert dict(flora.DEFAULT_TARGET_MODULES) == PEFT


def test_no_default_targets_for_an_unknown_model_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no default targets for a Sequential.*all-linear"):
        flora.inject(model, flora.FLoRAConfig())
    assert type(model[0]) is nn.Linear
    config = transformers.DistilBertConfig(
        vocab_size=30, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=8
    )
    with pytest.raises(ValueError, match="no default targets for model type 'distilbert'"):
        flora.inject(transformers.DistilBertModel(config), flora.FLoRAConfig())


def test_default_targets_of_gpt2_are_its_conv1d_c_attn_as_in_peft() -> None:
    config = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2Model(config)
    assert _flora_targets(model) == _peft_targets(model) == {"h.0.attn.c_attn"}


def test_default_targets_that_flora_cannot_adapt_are_named() -> None:
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    with pytest.raises(
        TypeError, match=r"module 'self_attn\.out_proj' is a NonDynamicallyQuantizableLinear"
    ):
        flora.inject(model, flora.FLoRAConfig(target_modules=["out_proj"]))
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_target_parameters_alone_still_adapt_only_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    flora.inject(model, flora.FLoRAConfig(target_parameters=["1.weight"]))
    assert set(flora.adapted_layers(model)) == {"1.weight"}
