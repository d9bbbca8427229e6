"""Train a FLoRA adapter with ``transformers.Trainer``, unchanged: checkpoints, resume, save.

A small BERT classifier built from a config (nothing is downloaded) gets a
FLoRA adapter on its attention projections and a trainable copy of its
classification head. ``Trainer`` trains it, writes a checkpoint every three
steps, is stopped half-way, resumes from its last checkpoint in a fresh
model, and saves the result; ``flora.load_adapter`` loads that folder into a
fresh base model. Run it with ``python examples/train_with_trainer.py``
(CPU, a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import flora


def base_model() -> transformers.BertForSequenceClassification:
    """The same small, randomly initialized BERT every time (seed 0)."""
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def adapted_model() -> transformers.BertForSequenceClassification:
    config = flora.FLoRAConfig(
        ranks=4, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    return flora.inject(base_model(), config)


class Parity(torch.utils.data.Dataset):
    """Token sequences labelled by whether token 7 occurs in them."""

    def __init__(self, count: int = 64) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 100, (count, 12), generator=generator)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


class StopAt(transformers.TrainerCallback):
    """Stops training after ``step`` steps, as an interrupted job would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def trainer(model, out: Path, callbacks=()) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_steps=8,
        save_steps=3,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=Parity(), callbacks=list(callbacks)
    )


def main(out: Path) -> None:
    # 1. An uninterrupted run, for comparison.
    straight = adapted_model()
    trainer(straight, out / "straight").train()

    # 2. The same run, stopped after 4 steps (checkpoint-3 is on disk) ...
    trainer(adapted_model(), out / "run", callbacks=[StopAt(4)]).train()
    print("checkpoint files:", sorted(p.name for p in (out / "run" / "checkpoint-3").iterdir()))

    # 3. ... and resumed in a fresh model from its last checkpoint.
    resumed = adapted_model()
    run = trainer(resumed, out / "run")
    run.train(resume_from_checkpoint=True)
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(
            flora.adapter_state_dict(straight).values(),
            flora.adapter_state_dict(resumed).values(),
            strict=True,
        )
    )
    print(f"resumed against uninterrupted, largest parameter difference: {difference}")

    # 4. save_model writes the adapter folder; load_adapter reads it into a fresh base.
    run.save_model(str(out / "final"))
    loaded = flora.load_adapter(base_model(), out / "final")
    ids = Parity().ids[:8]
    with torch.no_grad():
        same = torch.allclose(loaded(input_ids=ids).logits, resumed(input_ids=ids).logits)
    print("loaded adapter reproduces the trained model:", same)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where Trainer writes (default: a temporary dir)")
    options = parser.parse_args()
    if options.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        main(options.out)
