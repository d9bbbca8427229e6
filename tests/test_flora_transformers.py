"""A small BERT (built from ``transformers.BertConfig``, nothing downloaded) with named adapters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import NO_DROPOUT, tiny_bert_config

import flora

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["query", "value"]


def _bert() -> torch.nn.Module:
    config = tiny_bert_config(hidden_size=32, intermediate_size=37, num_labels=3, **NO_DROPOUT)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (8, 6), generator=generator)
    return ids, torch.randint(0, 3, (8,), generator=generator)


def _train(model: torch.nn.Module, seed: int) -> None:
    ids, labels = _data(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_two_named_adapters_with_a_saved_head(tmp_path: Path) -> None:
    model = _bert()
    base_state = copy.deepcopy(model.state_dict())
    ids, _ = _data(99)
    base = _logits(model, ids)
    for name, ranks in (("a", 2), ("b", 4)):
        config = flora.FLoRAConfig(
            ranks=ranks, target_modules=TARGETS, modules_to_save=["classifier"]
        )
        flora.inject(model, config, adapter_name=name)
    assert flora.adapter_names(model) == ["a", "b"]
    summary = flora.summary(model)
    assert "classifier" in summary
    assert summary.splitlines()[-1].startswith("trainable params:")
    outputs = {}
    for index, name in enumerate(("a", "b")):
        flora.set_adapter(model, name)
        _train(model, index)
        outputs[name] = _logits(model, ids)
    assert not torch.allclose(outputs["a"], outputs["b"])
    flora.set_adapter(model, "a")
    assert torch.equal(_logits(model, ids), outputs["a"])
    with flora.disable_adapter(model):
        assert torch.equal(_logits(model, ids), base)
    for name in ("a", "b"):
        flora.save_adapter(model, tmp_path / name, adapter_name=name)

    # Loaded trainable, every tensor has the trained model's requires_grad, so
    # torch picks the same kernels and the logits match bit for bit.
    fresh = _bert()
    fresh.load_state_dict(base_state)
    flora.load_adapter(fresh, tmp_path / "a", trainable=True)
    flora.load_adapter(fresh, tmp_path / "b", trainable=True)
    assert torch.equal(_logits(fresh, ids), outputs["a"])
    flora.set_adapter(fresh, "b")
    assert torch.equal(_logits(fresh, ids), outputs["b"])
    with flora.disable_adapter(fresh):
        assert torch.equal(_logits(fresh, ids), base)
    # Loaded for inference (the default): frozen, and equal to rounding (torch
    # folds matmuls differently for tensors that require gradients).
    frozen = _bert()
    frozen.load_state_dict(base_state)
    for name in ("a", "b"):
        flora.load_adapter(frozen, tmp_path / name)
    assert flora.trainable_parameters(frozen) == 0
    for name in ("a", "b"):
        flora.set_adapter(frozen, name)
        torch.testing.assert_close(_logits(frozen, ids), outputs[name], rtol=1e-6, atol=1e-6)


def test_a_full_save_pretrained_needs_the_merged_state_dict(tmp_path: Path) -> None:
    model = _bert()
    config = flora.FLoRAConfig(ranks=2, target_modules=TARGETS, modules_to_save=["classifier"])
    flora.inject(model, config)
    _train(model, 0)
    ids, _ = _data(5)
    expected = _logits(model, ids)
    with pytest.raises(ValueError, match="merged_state_dict"):
        model.save_pretrained(tmp_path / "wrong", state_dict=model.state_dict())
    model.save_pretrained(tmp_path / "merged", state_dict=flora.merged_state_dict(model))
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)
    flora.unload(model)
    model.save_pretrained(tmp_path / "unloaded")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "unloaded")
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)
