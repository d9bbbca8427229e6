"""FLoRA layers: one module per layer family, all holding named :class:`TuckerDelta` adapters."""

from flora.layers.attention import MultiheadAttentionWeight
from flora.layers.base import AdaptedWeight, FLoRALayer, TuckerDelta
from flora.layers.bnb import QuantizedLinear
from flora.layers.conv import Conv1d, Conv2d, Conv3d
from flora.layers.embedding import Embedding
from flora.layers.hf_conv1d import Conv1D
from flora.layers.linear import Linear
from flora.layers.parametrization import TuckerParametrization
from flora.layers.saved import ModulesToSave

__all__ = [
    "AdaptedWeight",
    "Conv1D",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "FLoRALayer",
    "Linear",
    "ModulesToSave",
    "MultiheadAttentionWeight",
    "QuantizedLinear",
    "TuckerDelta",
    "TuckerParametrization",
]
