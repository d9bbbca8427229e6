"""Read model checkpoints lazily, one tensor at a time.

Supported: ``.safetensors`` files (pure NumPy, memory-mapped; no PyTorch
needed, bfloat16 included), sharded checkpoints with a ``*.index.json``,
and PyTorch state dicts loaded with ``torch.load(weights_only=True)``.
"""

from tuckerlib.io._base import Checkpoint, CheckpointError, TensorInfo
from tuckerlib.io._open import open_checkpoint
from tuckerlib.io._pairs import Pairing, pair_checkpoints, read_delta

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Pairing",
    "TensorInfo",
    "open_checkpoint",
    "pair_checkpoints",
    "read_delta",
]
