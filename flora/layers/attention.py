r"""FLoRA adapters for ``torch.nn.MultiheadAttention``: its projections, as attention reads them.

``MultiheadAttention.forward`` never calls a projection module: it hands
``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight``) and ``out_proj.weight`` to
``F.multi_head_attention_forward`` (or the fused kernel) as tensors. An
adapter therefore has to change the tensors the attention reads, not wrap
a module's forward. Each projection weight gets a parametrization
(:class:`MultiheadAttentionWeight`, a :class:`flora.TuckerParametrization`
of kind ``"MultiheadAttention"``): reading the attribute gives
:math:`W + \sum \Delta W` of the active adapters, which autograd differentiates through.
The branch always runs dense (one :math:`W + \Delta W` per projection and forward),
the only form the functional attention accepts; merging writes :math:`\Delta W` into
the stored weight and removes that addition. PEFT's LoRA does the same for
the packed weight by merging before and unmerging after each forward.

Adapted weights are named by parameter: ``"attn.in_proj_weight"``,
``"attn.out_proj.weight"`` (packed), or ``"attn.q_proj_weight"``,
``"attn.k_proj_weight"``, ``"attn.v_proj_weight"`` and
``"attn.out_proj.weight"`` when keys and values have their own sizes
(``kdim``/``vdim`` other than ``embed_dim``). Each update is modelled in
the projection's ``(out, in)`` map, which is how the weights are stored.
"""

from __future__ import annotations

from torch import nn

from flora.kinds import LayerKind, add_kind
from flora.layers.parametrization import TuckerParametrization

__all__ = ["MultiheadAttentionWeight", "attention_parameters"]


class MultiheadAttentionWeight(TuckerParametrization):
    """One projection weight of a ``torch.nn.MultiheadAttention``, adapted in place.

    A :class:`flora.TuckerParametrization` of kind ``"MultiheadAttention"``:
    parameters, options and errors are that class's. :func:`flora.inject`
    creates one per projection of every targeted attention module.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2))
    >>> model = flora.inject(model, flora.FLoRAConfig(target_modules=["0"], ranks=4))
    >>> {name: layer.shape for name, layer in flora.adapted_layers(model).items()}
    {'0.in_proj_weight': (48, 16), '0.out_proj.weight': (16, 16)}
    >>> type(flora.adapted_layers(model)["0.in_proj_weight"]).__name__
    'MultiheadAttentionWeight'
    """

    kind = "MultiheadAttention"


def attention_parameters(module: nn.Module) -> tuple[str, ...]:
    """The projection weights of ``module`` that an adapter updates (paths below it).

    Examples
    --------
    >>> import torch
    >>> attention_parameters(torch.nn.MultiheadAttention(8, 2))
    ('in_proj_weight', 'out_proj.weight')
    >>> attention_parameters(torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=6))
    ('q_proj_weight', 'k_proj_weight', 'v_proj_weight', 'out_proj.weight')
    """
    if module._qkv_same_embed_dim:
        return ("in_proj_weight", "out_proj.weight")
    return ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")


add_kind(
    LayerKind(
        "MultiheadAttention",
        (nn.MultiheadAttention,),
        MultiheadAttentionWeight,
        lora="attention",
        parameters=attention_parameters,
    )
)
