"""``transformers.Trainer`` itself, unchanged, on a small BERT with a FLoRA adapter (CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_models import NO_DROPOUT, tiny_bert_config

import flora

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CONFIG = flora.FLoRAConfig(
    ranks=4, target_modules=["query", "value"], modules_to_save=["classifier"]
)


def _bert(name_or_path: str = "") -> torch.nn.Module:
    config = tiny_bert_config(
        hidden_size=32, intermediate_size=37, num_labels=3, name_or_path=name_or_path, **NO_DROPOUT
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _adapted(**config: object) -> torch.nn.Module:
    base = _bert()
    options = CONFIG.to_dict() | config
    return flora.inject(base, flora.FLoRAConfig.from_dict(options))


class _Data(torch.utils.data.Dataset):
    def __init__(self, count: int = 24) -> None:
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(1, 40, (count, 6), generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


class _StopAt(transformers.TrainerCallback):
    """Stops training after ``step`` steps: an interrupted run, same schedule as the whole one."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _trainer(
    model: torch.nn.Module,
    out: Path,
    *,
    stop_at: int | None = None,
    evaluate: bool = False,
    **options: object,
) -> transformers.Trainer:
    settings = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 6,
        "save_steps": 3,
        "logging_steps": 100,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
    }
    args = transformers.TrainingArguments(**(settings | options))
    callbacks = [] if stop_at is None else [_StopAt(stop_at)]
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Data(),
        eval_dataset=_Data(8) if evaluate else None,
        callbacks=callbacks,
    )


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in flora.adapter_state_dict(model).items()}


def _largest_difference(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> float:
    assert one.keys() == two.keys()
    return max((one[k] - two[k]).abs().max().item() for k in one)


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path: Path, caplog) -> None:
    straight = _adapted()
    _trainer(straight, tmp_path / "straight").train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= files
    assert {"optimizer.pt", "trainer_state.json"} <= files
    assert "config.json" not in files  # not a full model: from_pretrained cannot misread it
    loaded = flora.load_adapter(_bert(), tmp_path / "straight" / "checkpoint-6")
    assert _largest_difference(_adapter_tensors(straight), _adapter_tensors(loaded)) == 0.0

    interrupted = _adapted()
    _trainer(interrupted, tmp_path / "interrupted", stop_at=3).train()
    resumed = _adapted()  # a fresh process: the same script, resumed
    trainer = _trainer(resumed, tmp_path / "interrupted")
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint: checkpoint-3
    # The base weights are not in a checkpoint by design: no "missing keys" warning.
    assert "missing keys" not in caplog.text
    assert trainer.state.global_step == 6
    expected, found = _adapter_tensors(straight), _adapter_tensors(resumed)
    assert "modules_to_save.classifier.weight" in found
    assert _largest_difference(expected, found) == 0.0
    assert _largest_difference(expected, _adapter_tensors(interrupted)) > 0.0


def test_save_model_writes_what_load_adapter_loads(tmp_path: Path) -> None:
    model = _adapted()
    trainer = _trainer(model, tmp_path / "run", save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))  # beside Trainer's own files
    loaded = flora.load_adapter(_bert(), tmp_path / "run")
    assert _largest_difference(_adapter_tensors(model), _adapter_tensors(loaded)) == 0.0
    assert (tmp_path / "run" / "training_args.bin").exists()


def test_load_best_model_at_end(tmp_path: Path) -> None:
    model = _adapted()
    trainer = _trainer(
        model,
        tmp_path / "run",
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        evaluate=True,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = flora.read_adapter(best)
    found = _adapter_tensors(model)
    assert _largest_difference({k: saved.tensors[k] for k in found}, found) == 0.0


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_accumulation_steps": 2},
        {"bf16": True},
        {"gradient_checkpointing": True},
    ],
    ids=["accumulation", "bf16", "checkpointing"],
)
def test_training_options_resume_exactly(tmp_path: Path, options: dict) -> None:
    straight = _adapted()
    before = _adapter_tensors(straight)
    short = {"max_steps": 4, "save_steps": 2} | options
    autocast = []
    query = straight.bert.encoder.layer[0].attention.self.query
    query.register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    _trainer(straight, tmp_path / "straight", **short).train()
    assert set(autocast) == {options.get("bf16", False)}  # bf16 trains under CPU autocast
    assert _largest_difference(before, _adapter_tensors(straight)) > 0.0
    _trainer(_adapted(), tmp_path / "cut", stop_at=2, **short).train()
    resumed = _adapted()
    _trainer(resumed, tmp_path / "cut", **short).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")
    )
    assert _largest_difference(_adapter_tensors(straight), _adapter_tensors(resumed)) == 0.0
    assert all(v.dtype == torch.float32 for v in _adapter_tensors(resumed).values())


def test_save_pretrained_writes_the_adapter_folder(tmp_path: Path) -> None:
    model = flora.inject(_bert("org/tiny-bert"), CONFIG)
    model.save_pretrained(tmp_path / "out")
    document = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert document["base_model_name_or_path"] == "org/tiny-bert"
    assert flora.read_adapter(tmp_path / "out").base_model_name_or_path == "org/tiny-bert"
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(TypeError, match=r"takes no \['push_to_hub'\]"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    model = flora.inject(_bert(), flora.FLoRAConfig(ranks=2, target_modules=["query"]))
    flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["query"]), adapter_name="second")
    flora.set_adapter(model, ["default", "second"])
    with pytest.raises(ValueError, match=r"adapters \['default', 'second'\] are active"):
        model.save_pretrained(tmp_path / "two")
    assert not (tmp_path / "two").exists()


def test_a_full_save_needs_the_plain_layout(tmp_path: Path) -> None:
    model = flora.inject(_bert(), CONFIG)
    with pytest.raises(ValueError, match=r"adapted layout .*merged_state_dict"):
        model.save_pretrained(tmp_path / "wrong", state_dict=model.state_dict())
    assert not (tmp_path / "wrong").exists()
    model.save_pretrained(tmp_path / "full", state_dict=flora.merged_state_dict(model))
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "full")
    ids = _Data().ids[:4]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_on_the_adapter_folder_names_flora(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    _bert().save_pretrained(tmp_path / "base")
    model = flora.inject(_bert(str(tmp_path / "base")), CONFIG)
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(KeyError, match="flora export-lora"):
        peft.PeftConfig.from_pretrained(str(tmp_path / "out"))
    with pytest.raises(KeyError, match=r"flora\.load_adapter"):
        peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "out"))
    # transformers finds the recorded base model, then PEFT refuses the adapter by name.
    with pytest.raises(KeyError, match="FLORA: a flora adapter"):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out")


def test_only_a_whole_training_state_hides_the_missing_base(tmp_path: Path) -> None:
    model = _adapted()
    model.save_pretrained(tmp_path / "out")
    state = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert not any("base_layer" in key or "original_module" in key for key in state)
    assert model.load_state_dict(state, strict=True).missing_keys == []
    partial = dict(list(state.items())[1:])
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial, strict=True)
    assert "bert.pooler.dense.weight" in model.load_state_dict(partial, strict=False).missing_keys
    flora.unload(model)
    assert not model._load_state_dict_pre_hooks  # the hooks leave with the adapters


def test_a_failed_save_pretrained_leaves_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _adapted()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flora._hf.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
