"""Read model checkpoints lazily, one tensor at a time.

Supported: ``.safetensors`` files (pure NumPy, memory-mapped; no PyTorch
needed, bfloat16 included), sharded checkpoints with a ``*.index.json``,
and PyTorch state dicts loaded with ``torch.load(weights_only=True)``.
Adapter directories (flora, PEFT LoRA) open as Tucker updates, one per layer.
"""

from tuckerlib.io._adapter import Adapter, AdapterError, AdapterLayer
from tuckerlib.io._adapter_open import open_adapter
from tuckerlib.io._base import Checkpoint, CheckpointError, TensorInfo
from tuckerlib.io._open import open_checkpoint
from tuckerlib.io._pairs import Pairing, pair_checkpoints, read_delta

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterLayer",
    "Checkpoint",
    "CheckpointError",
    "Pairing",
    "TensorInfo",
    "open_adapter",
    "open_checkpoint",
    "pair_checkpoints",
    "read_delta",
]
