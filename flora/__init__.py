"""flora: FLoRA adapters (Tucker-structured weight updates) for PyTorch modules."""

from flora.config import DEFAULT_RANKS, FLoRAConfig
from flora.extraction import ExtractedLayer, Extraction, extract
from flora.io import adapter_state_dict, load_adapter, save_adapter, write_adapter
from flora.layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    Embedding,
    FLoRALayer,
    Linear,
    TuckerDelta,
    TuckerParametrization,
)
from flora.lora import export_lora
from flora.model import adapted_layers, inject, merge, trainable_parameters, unload, unmerge

__all__ = [
    "DEFAULT_RANKS",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "ExtractedLayer",
    "Extraction",
    "FLoRAConfig",
    "FLoRALayer",
    "Linear",
    "TuckerDelta",
    "TuckerParametrization",
    "adapted_layers",
    "adapter_state_dict",
    "export_lora",
    "extract",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
    "write_adapter",
]
