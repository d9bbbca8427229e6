r"""bitsandbytes 4-bit and 8-bit bases: FLoRA adapters on a quantized Linear (QLoRA).

:class:`QuantizedLinear` wraps a ``bitsandbytes.nn.Linear4bit`` (``nf4`` or
``fp4``) or a ``bitsandbytes.nn.Linear8bitLt`` (int8, ``has_fp16_weights=False``)
as :class:`flora.Linear` wraps a ``torch.nn.Linear``; :func:`flora.inject`
picks it for such modules (by name, or with ``target_modules="all-linear"``).
The base stays quantized and frozen. The adapter's tensors have the dtype of
the dequantized weight (float32 for half precision, as PEFT's
``autocast_adapter_dtype``); the branch runs in it and is cast to the dtype
of the base layer's output, which bitsandbytes computes in its own compute
dtype. The forward never builds the dense base weight.

Merging dequantizes the base weight with bitsandbytes' own functions, adds
:math:`\Delta W` and quantizes the sum again, as PEFT does: the merged layer holds
:math:`Q(W + \Delta W)`, the sum rounded to the quantization grid, so its outputs
differ from the unmerged layer's by up to one quantization step of the
weight (a ``UserWarning`` says so). Unmerging subtracts :math:`\Delta W` and rounds
again: it does not give the original quantized bytes back. bitsandbytes
quantizes a new int8 weight from float16, and a 4-bit one from the dtype it
was first quantized from: a merge whose sum overflows that dtype (beyond
±65504 for float16) is refused, naming the layer, before anything changes
(PEFT would write the overflowed weight).
``flora.unload(model, merge=False)`` does, bit for bit, when nothing was
merged (the base module is returned untouched).

bitsandbytes is imported only where a module of its classes is met, so
flora imports and runs without it (``pip install "tuckerlib[bnb]"`` adds it).

Examples
--------
>>> import torch
>>> import flora
>>> import bitsandbytes as bnb
>>> base = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")  # quantizes
>>> config = flora.FLoRAConfig(ranks=4, target_modules=["0"])
>>> model = flora.inject(torch.nn.Sequential(base), config)
>>> type(model[0]).__name__, model[0].shape, model[0].base_layer is base
('QuantizedLinear', (32, 64), True)
>>> from flora.layers.bnb import dequantize_weight, quantization
>>> quantization(base), dequantize_weight(base).shape
('nf4', torch.Size([32, 64]))
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from flora.kinds import LayerKind, add_kind
from flora.layers.base import TuckerDelta
from flora.layers.linear import Linear

__all__ = [
    "QuantizedLinear",
    "check_quantizable",
    "dequantize_weight",
    "is_quantized",
    "quantization",
    "quantize_weight",
    "refuse_dense_state",
    "refuse_initial_update",
    "refuse_unquantizable",
    "requantize_into",
]

_ROUNDING = (
    "FLoRA: merging into (or unmerging from) a quantized base layer ({quantization}) "
    "dequantizes its weight, "
    "adds the update and quantizes the sum again: the result is rounded to the "
    "quantization grid, so outputs differ from the unmerged model's by up to one "
    "quantization step of the weight, and unmerging does not give the original "
    "quantized weight back bit for bit"
)


_UNMERGED = (
    "nothing was merged (keep the adapter unmerged, or merge it into the full-precision "
    "model and quantize that)"
)


def _bitsandbytes() -> ModuleType | None:
    """The bitsandbytes module if it is imported: only then can a model hold its layers."""
    return sys.modules.get("bitsandbytes")


def quantization(module: nn.Module) -> str | None:
    """How a bitsandbytes Linear stores its weight: ``"nf4"``, ``"fp4"``, ``"int8"``, or None.

    None for every other module (bitsandbytes is not imported for that).

    Examples
    --------
    >>> import torch
    >>> from flora.layers.bnb import quantization
    >>> print(quantization(torch.nn.Linear(4, 4)))
    None
    """
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return str(module.weight.quant_type)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (any subclass).

    Examples
    --------
    >>> import torch
    >>> from flora.layers.bnb import is_quantized
    >>> is_quantized(torch.nn.Linear(4, 4))
    False
    """
    return quantization(module) is not None


def _quant_state(module: nn.Module) -> object:
    """The 4-bit quantization state: the weight's, or the copy bitsandbytes keeps on the module."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _check_ready(module: nn.Module) -> str:
    """``module``'s quantization, refusing a layer whose weight is not quantized (yet)."""
    kind = quantization(module)
    if kind is None:
        raise TypeError(
            f"expected a bitsandbytes Linear4bit or Linear8bitLt, got a {type(module).__name__}"
        )
    if kind == "int8":
        if module.state.has_fp16_weights or module.weight.dtype != torch.int8:
            raise ValueError(
                "this Linear8bitLt keeps a float weight (has_fp16_weights=True, or not moved "
                "to a device yet); FLoRA adapts int8 bases: build it with "
                "has_fp16_weights=False and move it to a device, which quantizes it"
            )
    elif not getattr(module.weight, "bnb_quantized", False) or _quant_state(module) is None:
        raise ValueError(
            f"this Linear4bit ({kind}) is not quantized yet: bitsandbytes quantizes it when "
            "it is moved to a device (module.to('cuda') or module.to('cpu'))"
        )
    return kind


def _packed(state: object) -> bool:
    """Whether a 4-bit weight is in bitsandbytes' CPU inference layout (AVX512-BF16, eval)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def _dequantize_4bit(module: nn.Module) -> torch.Tensor:
    functional = _bitsandbytes().functional
    data, state = module.weight.data, _quant_state(module)
    if not _packed(state):
        return functional.dequantize_4bit(data, state)
    # bitsandbytes repacked the codes for its CPU kernel and keeps the block
    # scales unnested in bfloat16, transposed: unpack the codes (on copies) and
    # dequantize with those very scales, as that kernel does.
    codes, unpacked = functional._convert_weight_packed_for_cpu_inverse(
        data.clone(), copy.deepcopy(state)
    )
    unpacked.absmax = state.absmax.T.reshape(-1).float()
    unpacked.nested = False
    return functional.dequantize_4bit(codes, unpacked)


def _dequantize_int8(module: nn.Module) -> torch.Tensor:
    # Quantized but never run: the scales are on the weight; after a forward
    # bitsandbytes moves them to module.state (the codes stay in weight.data).
    weight = module.weight
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    functional = _bitsandbytes().functional
    return functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes Linear computes with, as a dense ``(out, in)`` tensor.

    Dequantized with bitsandbytes' own functions for the layout the module
    is in: 4-bit codes with their (nested or plain) block scales, the
    layout bitsandbytes repacks 4-bit weights into for its CPU inference
    kernel, and int8 codes with row scales on the weight (before the first
    forward) or in ``module.state`` (after it).

    Parameters
    ----------
    module : bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt
        A quantized layer.

    Returns
    -------
    torch.Tensor
        A new tensor on the weight's device, in the dtype the weight was
        quantized from (4-bit) or float32 (int8).

    Raises
    ------
    TypeError
        If ``module`` is not such a layer.
    ValueError
        If its weight is not quantized: a ``Linear4bit`` not yet moved to a
        device, a ``Linear8bitLt`` with ``has_fp16_weights=True``.

    Examples
    --------
    >>> import torch
    >>> from flora.layers.bnb import dequantize_weight
    >>> import bitsandbytes as bnb
    >>> linear = torch.nn.Linear(64, 8)
    >>> base = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False)
    >>> base.load_state_dict(linear.state_dict())
    <All keys matched successfully>
    >>> base = base.to("cpu")  # quantizes
    >>> step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    >>> bool(((dequantize_weight(base) - linear.weight).abs() <= step).all())
    True
    """
    kind = _check_ready(module)
    with torch.no_grad():
        return _dequantize_int8(module) if kind == "int8" else _dequantize_4bit(module)


def _source_dtype(module: nn.Module, kind: str) -> torch.dtype:
    """The dtype bitsandbytes quantizes a new weight of ``module`` from."""
    if kind == "int8":
        return torch.float16  # Int8Params casts to float16 before quantizing
    state = _quant_state(module)
    return state.original_dtype if _packed(state) else state.dtype


def check_quantizable(module: nn.Module, weight: torch.Tensor) -> None:
    """Refuse a finite ``weight`` that overflows the dtype ``module``'s weight is quantized from.

    bitsandbytes casts a new int8 weight to float16 before quantizing it,
    and a 4-bit weight to the dtype it was first quantized from; an entry
    beyond that dtype's range (±65504 for float16) becomes infinite and the
    quantized weight meaningless. NaN and infinite entries already in
    ``weight`` are left to the caller (``safe`` of :func:`flora.merge`).

    Parameters
    ----------
    module : bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt
        A quantized layer.
    weight : torch.Tensor
        The dense weight to quantize, ``(out, in)``.

    Raises
    ------
    ValueError
        If an entry overflows, naming the largest magnitude and the range.
    TypeError
        As :func:`dequantize_weight`.

    Examples
    --------
    >>> import torch
    >>> from flora.layers.bnb import check_quantizable
    >>> import bitsandbytes as bnb
    >>> base = bnb.nn.Linear8bitLt(4, 2, has_fp16_weights=False).to("cpu")
    >>> check_quantizable(base, torch.full((2, 4), 6e4))
    >>> check_quantizable(base, torch.full((2, 4), 7e4))
    Traceback (most recent call last):
    ...
    ValueError: the merged weight has entries up to 7e+04 in magnitude, beyond float16's ±65504, ...
    """
    kind = _check_ready(module)
    dtype = _source_dtype(module, kind)
    with torch.no_grad():
        finite = torch.isfinite(weight)
        overflow = finite & ~torch.isfinite(weight.to(dtype))
        if bool(overflow.any()):
            largest = weight[finite].abs().max().item()
            name = str(dtype).removeprefix("torch.")
            raise ValueError(
                f"the merged weight has entries up to {largest:.3g} in magnitude, beyond "
                f"{name}'s ±{torch.finfo(dtype).max:.0f}, the dtype bitsandbytes quantizes "
                f"this {kind} weight from: quantized, they would be infinite"
            )


def quantize_weight(module: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new quantized parameter holding ``weight``, quantized as ``module``'s weight is.

    The same quantization type, block size, nested statistics and storage
    for 4-bit, int8 with row scales for 8-bit, on the weight's device, in the
    standard (not CPU-repacked) layout. ``module`` is not changed; install
    the result with :func:`requantize_into`.

    Parameters
    ----------
    module : bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt
        A quantized layer.
    weight : torch.Tensor
        The new dense weight, of shape ``(out, in)``.

    Returns
    -------
    bitsandbytes.nn.Params4bit or bitsandbytes.nn.Int8Params
        Frozen (``requires_grad=False``).

    Raises
    ------
    TypeError, ValueError
        As :func:`dequantize_weight`; ``ValueError`` also if ``weight`` has
        another shape or overflows (:func:`check_quantizable`).
    """
    kind = _check_ready(module)
    shape = (module.out_features, module.in_features)
    if tuple(weight.shape) != shape:
        raise ValueError(f"weight must have shape {shape}, got {tuple(weight.shape)}")
    check_quantizable(module, weight)
    bnb = _bitsandbytes()
    old = module.weight
    device = old.device
    with torch.no_grad():
        if kind == "int8":
            fresh = bnb.nn.Int8Params(
                weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False
            )
            return fresh.to(device)
        dtype = _source_dtype(module, kind)
        fresh = bnb.nn.Params4bit(
            weight.detach().to(device=device, dtype=dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        return fresh.to(device)


def requantize_into(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` as :func:`quantize_weight` does and make it ``module``'s weight.

    All or nothing: the new parameter is built first. The module's cached
    quantization state (the 4-bit ``module.quant_state``, the int8
    ``module.state``) is reset to it.

    Raises
    ------
    TypeError, ValueError
        As :func:`quantize_weight` (nothing is changed then).

    Examples
    --------
    >>> import torch
    >>> from flora.layers.bnb import dequantize_weight, requantize_into
    >>> import bitsandbytes as bnb
    >>> base = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    >>> requantize_into(base, torch.zeros(8, 64))
    >>> bool((dequantize_weight(base) == 0).all())
    True
    """
    fresh = quantize_weight(module, weight)
    module.weight = fresh
    if quantization(module) == "int8":
        module.state.reset_grads()  # stale codes and scales: the next forward takes the new
    else:
        fresh.module = module
        module.quant_state = fresh.quant_state


class QuantizedLinear(Linear):
    r"""A bitsandbytes ``Linear4bit`` (nf4, fp4) or ``Linear8bitLt`` (int8) with FLoRA adapters.

    :class:`flora.Linear` on a quantized base: the same kind (``"Linear"``),
    ranks, options, adapter files and LoRA export. The base layer stays
    quantized and frozen and computes its own part; the adapters' branches
    run in the adapters' dtype beside it (see :mod:`flora.layers.bnb`).
    Merging rounds :math:`W + \Delta W` to the quantization grid, with a warning.

    Parameters
    ----------
    base_layer : bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt
        The quantized layer (already moved to its device, which quantizes it).
    ranks, scale, dropout, init, forward, adapter_name : optional
        As for :class:`flora.Linear`.

    Raises
    ------
    TypeError
        If ``base_layer`` is not such a layer.
    ValueError
        If its weight is not quantized (see :func:`dequantize_weight`), or
        for invalid options.

    Examples
    --------
    >>> import torch
    >>> from flora.layers.bnb import QuantizedLinear
    >>> import bitsandbytes as bnb
    >>> base = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    >>> layer = QuantizedLinear(base, ranks=4)
    >>> x = torch.randn(5, 64)
    >>> torch.equal(layer(x), base(x))  # the core starts at zero
    True
    >>> layer.base_layer.weight.requires_grad, layer.core.requires_grad
    (False, True)
    """

    def __init__(self, base_layer: nn.Module, *args: object, **kwargs: object):
        _check_ready(base_layer)  # a TypeError for a plain torch.nn.Linear
        super().__init__(base_layer, *args, **kwargs)

    def add_adapter(self, name: str, adapter: TuckerDelta) -> None:
        """Add ``adapter`` as :meth:`flora.AdaptedWeight.add_adapter` does.

        Raises
        ------
        ValueError
            Also for an ``init="hosvd"`` adapter (see :func:`refuse_initial_update`).
        """
        refuse_initial_update(f"adapter {name!r}", self, adapter.spec.init)
        super().add_adapter(name, adapter)

    def check_merge(self, adapter_names: Sequence[str] | None = None, *, safe: bool = True) -> None:
        r"""Raise what :meth:`flora.AdaptedWeight.merge` would raise, changing nothing.

        As :meth:`flora.AdaptedWeight.check_merge`, and, with ``safe`` or
        not, a ``ValueError`` if :math:`W + \Delta W` overflows the dtype bitsandbytes
        quantizes it from (:func:`check_quantizable`).
        """
        super().check_merge(adapter_names, safe=safe)
        names = self._merge_names(adapter_names)
        if names:
            with torch.no_grad():
                delta = self._sum(self.adapters[n].delta_weight() for n in names)
                weight = self.base_weight().to(delta.dtype) + delta
            try:
                check_quantizable(self.base_layer, weight)
            except ValueError as exc:
                raise ValueError(f"merging {names}: {exc}; {_UNMERGED}") from None

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape ``(out, in)`` (without dequantizing it)."""
        return (self.base_layer.out_features, self.base_layer.in_features)

    def _fusable_delta(self, delta: torch.Tensor) -> bool:
        # The quantized weight cannot take ΔW inside the base op.
        return False

    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        warnings.warn(
            _ROUNDING.format(quantization=quantization(self.base_layer)),
            UserWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            # In the adapter's precision: quantizing rounds once (the record's write_weight).
            self._write_base(self.base_weight().to(delta.dtype) + sign * delta)


def refuse_dense_state(name: str, layer: nn.Module) -> None:
    """Refuse to write a dense weight under a quantized base module's keys.

    :func:`flora.merged_state_dict` would give a dense ``weight`` beside the
    quantized module's statistics, a state dict no module loads.

    Raises
    ------
    ValueError
        If ``layer`` is a :class:`QuantizedLinear`, naming it and what to do.
    """
    if isinstance(layer, QuantizedLinear):
        raise ValueError(
            f"layer {name!r} has a quantized base ({quantization(layer.base_layer)}): a merged "
            "state dict would hold a dense weight under its quantized module's keys; call "
            "flora.unload(model) (which merges and quantizes again) and take model.state_dict()"
        )


def refuse_unquantizable(name: str, layer: nn.Module, weight: torch.Tensor) -> None:
    """Refuse a merged ``weight`` that a quantized base layer cannot hold.

    :func:`flora.unload` calls it for every layer before it merges any.

    Parameters
    ----------
    name : str
        The layer's name, for the message.
    layer : torch.nn.Module
        An adapted layer; only a :class:`QuantizedLinear` is checked.
    weight : torch.Tensor
        Its merged weight ``(out, in)``.

    Raises
    ------
    ValueError
        If ``weight`` overflows the dtype the base is quantized from
        (:func:`check_quantizable`), naming the layer.
    """
    if not isinstance(layer, QuantizedLinear):
        return
    try:
        check_quantizable(layer.base_layer, weight)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}; {_UNMERGED}") from None


def refuse_initial_update(what: str, module: nn.Module, init: str) -> None:
    """Refuse an ``init="hosvd"`` adapter on a quantized base, before anything changes.

    Such an adapter takes its initial update out of the base weight, which a
    quantized base can hold only rounded: the model's output would change by
    that rounding as the adapter is added (PEFT refuses PiSSA there too).

    Parameters
    ----------
    what : str
        What the message names (``"layer 'encoder.query'"``).
    module : torch.nn.Module
        The base module or its :class:`QuantizedLinear`.
    init : str
        The adapter's ``init``.

    Raises
    ------
    ValueError
        Naming the layer and what to do instead.
    """
    base = module.base_layer if isinstance(module, QuantizedLinear) else module
    if init == "hosvd" and is_quantized(base):
        raise ValueError(
            f"{what}: init='hosvd' takes its initial update out of the base weight, which "
            f"this quantized base ({quantization(base)}) holds only rounded, so the output "
            "would change; use init='zero_core' or 'gaussian', or add the adapter to the "
            "full-precision model and quantize its residual base yourself"
        )


# The quantized storage of the Linear kind: adapters save as "Linear" adapters;
# the weight reads dequantized and a merged one is quantized again.
add_kind(
    LayerKind(
        "QuantizedLinear",
        ("bitsandbytes.nn.modules.Linear4bit", "bitsandbytes.nn.modules.Linear8bitLt"),
        QuantizedLinear,
        read_weight=dequantize_weight,
        write_weight=requantize_into,
        lora="linear",
        all_linear=True,
        saves_as="Linear",
    )
)
