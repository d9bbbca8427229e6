"""Adapter folders as PEFT's tools and the Hub see them: base model, version, hub ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bert_config
from torch import nn

import flora
import tuckerlib
from flora.io import PEFT_TYPE
from tuckerlib.io import CheckpointError, open_adapter

CONFIG = flora.FLoRAConfig(ranks=2, target_modules=["0"], modules_to_save=["1"])


class _Named(nn.Sequential):
    """A model whose config names it, as a Hugging Face model's does."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(4, 3), nn.Linear(3, 2))
        self.config = type("Config", (), {"name_or_path": name})()


def _saved(directory: Path, name: str = "") -> Path:
    return flora.save_adapter(flora.inject(_Named(name), CONFIG), directory)


def test_the_folder_records_the_base_model_and_the_version(tmp_path: Path) -> None:
    document = json.loads((_saved(tmp_path / "a", "org/base") / "adapter_config.json").read_text())
    assert document["base_model_name_or_path"] == "org/base"
    assert document["library_version"] == tuckerlib.__version__
    assert document["peft_type"] == PEFT_TYPE
    saved = flora.read_adapter(tmp_path / "a")
    assert (saved.base_model_name_or_path, saved.library_version) == (
        "org/base",
        tuckerlib.__version__,
    )
    unnamed = json.loads((_saved(tmp_path / "b") / "adapter_config.json").read_text())
    assert unnamed["base_model_name_or_path"] is None
    with open_adapter(tmp_path / "a") as adapter:  # tuckerlib's reader accepts the keys
        assert list(adapter) == ["0"]


def test_folders_without_the_new_keys_load_as_before(tmp_path: Path) -> None:
    directory = _saved(tmp_path / "a", "org/base")
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    for key in ("base_model_name_or_path", "library_version", "peft_type"):
        del document[key]
    path.write_text(json.dumps(document))
    saved = flora.read_adapter(directory)
    assert saved.base_model_name_or_path is None
    assert saved.library_version is None
    assert flora.FLoRAConfig.from_pretrained(directory) == CONFIG
    flora.load_adapter(_Named(""), directory)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base_model_name_or_path", 3, "base_model_name_or_path must be None or a non-empty"),
        ("library_version", None, "library_version must be a string"),
        ("peft_type", ["LORA"], "peft_type must be a string"),
    ],
)
def test_invalid_new_keys_are_named(tmp_path: Path, key: str, value: object, message: str) -> None:
    directory = _saved(tmp_path / "a")
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    document[key] = value
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message):
        flora.read_adapter(directory)
    with pytest.raises(CheckpointError, match=message):
        flora.FLoRAConfig.from_pretrained(directory)


def test_config_from_pretrained(tmp_path: Path) -> None:
    assert flora.FLoRAConfig.from_pretrained(_saved(tmp_path / "a")) == CONFIG
    with pytest.raises(CheckpointError, match="no such directory"):
        flora.FLoRAConfig.from_pretrained(tmp_path / "missing")


def test_write_adapter_checks_the_base_name(tmp_path: Path) -> None:
    spec = flora.LayerSpec("Linear", (3, 4), (1, 1))
    tensors = {"fc.core": torch.ones(1, 1), "fc.factors.0": torch.ones(3, 1)}
    tensors["fc.factors.1"] = torch.ones(4, 1)
    with pytest.raises(TypeError, match="base_model_name_or_path must be None or a non-empty"):
        flora.write_adapter(
            tmp_path / "a", CONFIG, {"fc": spec}, tensors, base_model_name_or_path=""
        )
    assert not (tmp_path / "a").exists()


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face Hub cache, offline."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache(cache: Path, repo: str, folder: Path) -> None:
    """Put ``folder`` in the cache as revision ``main`` of model repository ``repo``."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / revision)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)


def test_load_adapter_reads_a_hub_id_from_the_cache_offline(
    tmp_path: Path, offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = flora.inject(_Named("org/base"), CONFIG)
    with torch.no_grad():
        trained[0].core.fill_(0.5)
    _cache(offline_hub, "someone/tiny-adapter", flora.save_adapter(trained, tmp_path / "a"))
    monkeypatch.chdir(tmp_path)  # no local "someone/tiny-adapter"
    loaded = flora.load_adapter(_Named(""), "someone/tiny-adapter")
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), trained(x))
    assert flora.FLoRAConfig.from_pretrained("someone/tiny-adapter") == CONFIG
    with pytest.raises(CheckpointError, match="someone/other: no such directory, and no adapter"):
        flora.load_adapter(_Named(""), "someone/other")


def test_a_local_path_wins_over_a_hub_id(
    tmp_path: Path, offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cache(offline_hub, "someone/adapter", _saved(tmp_path / "hub"))
    local = flora.inject(_Named(""), flora.FLoRAConfig(ranks=1, target_modules=["1"]))
    monkeypatch.chdir(tmp_path)
    flora.save_adapter(local, tmp_path / "someone" / "adapter")
    assert flora.read_adapter("someone/adapter").layers["1"].ranks == (1, 1)


def _bert_with_head(tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """A small BERT saved to ``tmp_path / "base"``, and a copy adapted with a trained head."""
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(
        hidden_size=32, num_hidden_layers=1, intermediate_size=37, num_labels=3
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    base.save_pretrained(tmp_path / "base")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    adapter = flora.FLoRAConfig(
        ranks=2, init="gaussian", target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    flora.inject(model, adapter)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    return base, model


@pytest.mark.parametrize("base_option", [[], ["--base"]], ids=["alone", "with-base"])
def test_export_lora_cli_carries_the_saved_head(tmp_path: Path, base_option: list[str]) -> None:
    peft = pytest.importorskip("peft")
    from flora.cli import main

    base, model = _bert_with_head(tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    document = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert document["base_model_name_or_path"] == str(tmp_path / "base")
    extra = [*base_option, str(tmp_path / "base")] if base_option else []
    assert main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora"), *extra]) == 0
    lora = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert lora["modules_to_save"] == ["classifier"]
    ids = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        expected = model(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
        found = peft_model(input_ids=ids).logits
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 0.1


def test_export_lora_cli_base_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from flora.cli import main

    _, model = _bert_with_head(tmp_path)
    flora.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    args = ["export-lora", str(tmp_path / "adapter"), str(tmp_path / "lora"), "--base"]
    assert main([*args, str(tmp_path / "empty")]) == 2
    assert "no config.json (a Hugging Face model folder)" in capsys.readouterr().err
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["architectures"] = ["NoSuchModel"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert main([*args, str(tmp_path / "base")]) == 2
    assert "names no transformers model class" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()
