"""flora: FLoRA adapters (Tucker-structured weight updates) for PyTorch modules."""

from flora.compression import compress
from flora.config import DEFAULT_RANKS, DEFAULT_TARGET_MODULES, FLoRAConfig
from flora.diagnostic import Sensitivity, SensitivityRecord, sensitivity
from flora.extraction import ExtractedLayer, Extraction, ExtractionError, extract
from flora.io import (
    SavedAdapter,
    adapter_state_dict,
    load_adapter,
    read_adapter,
    save_adapter,
    write_adapter,
)
from flora.kinds import LayerKind, register_layer_kind, unregister_layer_kind
from flora.layers import (
    AdaptedWeight,
    Conv1D,
    Conv1d,
    Conv2d,
    Conv3d,
    Embedding,
    FLoRALayer,
    Linear,
    ModulesToSave,
    MultiheadAttentionWeight,
    TuckerDelta,
    TuckerParametrization,
)
from flora.lifecycle import (
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    set_adapter,
)
from flora.lora import LoraConversionError, export_lora, import_lora
from flora.model import (
    adapted_layers,
    attach_adapter,
    inject,
    merge,
    merged_state_dict,
    trainable_parameters,
    unload,
    unmerge,
)
from flora.report import summary
from flora.spec import LayerSpec

__all__ = [
    "DEFAULT_RANKS",
    "DEFAULT_TARGET_MODULES",
    "AdaptedWeight",
    "Conv1D",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "ExtractedLayer",
    "Extraction",
    "ExtractionError",
    "FLoRAConfig",
    "FLoRALayer",
    "LayerKind",
    "LayerSpec",
    "Linear",
    "LoraConversionError",
    "ModulesToSave",
    "MultiheadAttentionWeight",
    "SavedAdapter",
    "Sensitivity",
    "SensitivityRecord",
    "TuckerDelta",
    "TuckerParametrization",
    "active_adapters",
    "adapted_layers",
    "adapter_names",
    "adapter_state_dict",
    "add_weighted_adapter",
    "attach_adapter",
    "compress",
    "delete_adapter",
    "disable_adapter",
    "export_lora",
    "extract",
    "import_lora",
    "inject",
    "load_adapter",
    "merge",
    "merged_state_dict",
    "read_adapter",
    "register_layer_kind",
    "save_adapter",
    "sensitivity",
    "set_adapter",
    "summary",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister_layer_kind",
    "write_adapter",
]
