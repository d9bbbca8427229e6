"""The flora adapter format: its files, tensor keys, layer kinds, record checks and ΔW rule.

This module is the one owner of the format that :mod:`flora.io` writes and
reads with PyTorch and that :func:`tuckerlib.io.open_adapter` reads without
it: both go through the constants and functions here, so both accept and
refuse the same directories with the same messages. It imports neither
PyTorch nor flora; the ΔW rule works on any array-API arrays (NumPy,
PyTorch, ...).

A directory holds two files (format version 2; the full description of
every field is in :mod:`flora.io`):

``adapter_config.json`` (:data:`CONFIG_NAME`)
    ``{"format": "flora", "format_version": 2, "adapter_name": NAME,
    "config": {...}, "layers": {LAYER: RECORD, ...}}`` and the optional
    keys of :data:`OPTIONAL_KEYS`; every other top-level key and any key
    given twice is refused. A ``RECORD`` has the keys of
    :data:`RECORD_KEYS` and optionally :data:`OPTIONAL_RECORD_KEYS`
    (:func:`check_record`).

``adapter_model.safetensors`` (:data:`WEIGHTS_NAME`)
    Per layer the tensors :func:`tensor_shapes` lists, under the keys of
    :func:`core_key`, :func:`factor_key` and :func:`bias_key`; per module
    saved whole, its ``state_dict`` under :func:`saved_key`. Nothing else.

A layer's update to its weight ``W0`` is ``ΔW = s · G ×_0 U_0 … ×_{N-1}
U_{N-1}`` over the weight's own axes (:data:`KINDS` says which), minus the
adapter at initialization for ``init="hosvd"`` (the base holds ``W0 −
ΔW_init``); :func:`update_factors` builds it as one Tucker tensor.

Examples
--------
>>> from tuckerlib.io import flora_format as fmt
>>> record = {"kind": "Linear", "shape": [3, 4], "ranks": [2, 2], "scale": 1.0,
...           "init": "hosvd"}
>>> layer = fmt.check_layer("fc", record)
>>> layer.ranks, sorted(fmt.tensor_shapes("fc", layer.shape, layer.ranks, init=layer.init))
((2, 2), ['fc.core', 'fc.factors.0', 'fc.factors.1', 'fc.initial_core', 'fc.initial_factors.0', 'fc.initial_factors.1'])
>>> fmt.check_layer("fc", {**record, "ranks": [3, 2]})
Traceback (most recent call last):
    ...
ValueError: layer 'fc': ranks (3, 2) do not fit shape (3, 4): every R_n must be at most I_n and the product of the other ranks; usable ranks are (2, 2)
"""  # noqa: E501

from __future__ import annotations

import json
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import array_api_compat

from tuckerlib._namespace import get_namespace
from tuckerlib.io._base import unique_keys
from tuckerlib.io.layer_kinds import BIAS_KINDS, KINDS, by_parameter, geometry_of

__all__ = [
    "CONFIG_NAME",
    "CONV_KEYS",
    "DIGEST_KEY",
    "DOCUMENT_KEYS",
    "EMBEDDING_KEYS",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "FORWARD_MODES",
    "INIT_MODES",
    "KINDS",
    "OPTIONAL_KEYS",
    "OPTIONAL_RECORD_KEYS",
    "PEFT_TYPE",
    "RECORD_KEYS",
    "SAVED_PREFIX",
    "WEIGHTS_NAME",
    "AdapterDocument",
    "LayerRecord",
    "as_int",
    "bias_key",
    "check_base_name",
    "check_bias",
    "check_document",
    "check_dropout",
    "check_forward",
    "check_geometry",
    "check_init",
    "check_kind",
    "check_layer",
    "check_layer_name",
    "check_layer_values",
    "check_modules",
    "check_ranks",
    "check_record",
    "check_scale",
    "check_shape",
    "check_template",
    "check_tensors",
    "core_key",
    "difference",
    "factor_key",
    "is_bool",
    "loads",
    "resolve_init",
    "saved_key",
    "saved_owner",
    "tensor_shapes",
    "update_factors",
    "usable_ranks",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: The version writers write.
FORMAT_VERSION = 2
#: The versions readers read.
FORMAT_VERSIONS = (1, 2)
#: Metadata key of the weights file: the sha256 of the config written with it.
DIGEST_KEY = "flora_config_sha256"
#: Key prefix of the tensors of modules saved whole (``modules_to_save``).
SAVED_PREFIX = "modules_to_save."
#: ``peft_type`` of a flora folder: PEFT shows it when it fails to load one.
PEFT_TYPE = (
    "FLORA: a flora adapter, not a PEFT one; load it with flora.load_adapter, or write a "
    "PEFT LoRA adapter with `flora export-lora DIR OUT`"
)
#: Top-level keys every document has.
DOCUMENT_KEYS = ("adapter_name", "config", "format", "format_version", "layers")
#: Optional top-level keys of version 2 documents.
OPTIONAL_KEYS = ("base_model_name_or_path", "library_version", "modules_to_save", "peft_type")
#: Keys every layer record has, and those it may have.
RECORD_KEYS = ("kind", "shape", "ranks", "scale", "init")
OPTIONAL_RECORD_KEYS = ("forward", "dropout", "bias", "geometry")
#: Initialisations by name; ``"auto"`` stands for one of the others per weight
#: (:func:`resolve_init`), and records always hold the one it resolved to.
INIT_MODES = ("auto", "balanced", "zero_core", "hosvd", "gaussian")
FORWARD_MODES = ("auto", "dense", "factorized")
#: Keys of a convolution's and an embedding's geometry record.
CONV_KEYS = ("groups", "stride", "padding", "dilation", "padding_mode")
EMBEDDING_KEYS = ("padding_idx", "max_norm")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def loads(data: bytes | str) -> Any:
    """The JSON document in ``data``, refusing a key given twice in one object.

    Raises
    ------
    ValueError
        ``"not valid JSON (...)"``: bad UTF-8, bad JSON, a repeated key or
        nesting too deep.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import loads
    >>> loads(b'{"a": 1, "a": 2}')
    Traceback (most recent call last):
        ...
    ValueError: not valid JSON (key 'a' appears twice)
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # bad UTF-8, bad JSON or a repeated key
        raise ValueError(f"not valid JSON ({exc})") from None


# --- tensor keys -------------------------------------------------------------------------


def core_key(layer: str, *, initial: bool = False) -> str:
    """The key of a layer's core (``initial``: the core at initialization).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import core_key
    >>> core_key("fc"), core_key("fc", initial=True)
    ('fc.core', 'fc.initial_core')
    """
    return f"{layer}.initial_core" if initial else f"{layer}.core"


def factor_key(layer: str, mode: int, *, initial: bool = False) -> str:
    """The key of a layer's factor of mode ``mode``.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import factor_key
    >>> factor_key("fc", 1), factor_key("fc", 0, initial=True)
    ('fc.factors.1', 'fc.initial_factors.0')
    """
    return f"{layer}.initial_factors.{mode}" if initial else f"{layer}.factors.{mode}"


def bias_key(layer: str) -> str:
    r"""The key of a layer's bias update :math:`\Delta b`.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import bias_key
    >>> bias_key("fc")
    'fc.bias'
    """
    return f"{layer}.bias"


def saved_key(module: str, key: str) -> str:
    """The key of entry ``key`` of the ``state_dict`` of ``module``, saved whole.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import saved_key
    >>> saved_key("head", "weight")
    'modules_to_save.head.weight'
    """
    return f"{SAVED_PREFIX}{module}.{key}"


def saved_owner(key: str, modules: Sequence[str]) -> str | None:
    """The saved module among ``modules`` that tensor ``key`` belongs to, if any (longest name).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import saved_owner
    >>> saved_owner("modules_to_save.head.out.weight", ["head", "head.out"])
    'head.out'
    """
    rest = key[len(SAVED_PREFIX) :] if key.startswith(SAVED_PREFIX) else None
    if rest is None:
        return None
    owners = [m for m in modules if rest.startswith(m + ".")]
    return max(owners, key=len) if owners else None


def tensor_shapes(
    layer: str,
    shape: Sequence[int],
    ranks: Sequence[int],
    *,
    init: str = "zero_core",
    bias: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Every tensor key one layer needs, with its shape (``ranks`` as stored).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import tensor_shapes
    >>> tensor_shapes("fc", (3, 4), (2, 2), bias=True)
    {'fc.core': (2, 2), 'fc.factors.0': (3, 2), 'fc.factors.1': (4, 2), 'fc.bias': (3,)}
    """
    keys: dict[str, tuple[int, ...]] = {}
    for initial in (False, True) if init == "hosvd" else (False,):
        keys[core_key(layer, initial=initial)] = tuple(ranks)
        for n, (size, rank) in enumerate(zip(shape, ranks, strict=True)):
            keys[factor_key(layer, n, initial=initial)] = (size, rank)
    if bias:
        keys[bias_key(layer)] = (shape[0],)
    return keys


def check_tensors(
    layers: Mapping[str, Mapping[str, tuple[int, ...]]],
    modules: Sequence[str],
    found: Mapping[str, tuple[tuple[int, ...], str, bool]],
) -> None:
    """Refuse tensors that are not exactly those the layers and saved modules need.

    Parameters
    ----------
    layers : dict
        Layer name to its :func:`tensor_shapes`.
    modules : sequence of str
        The modules saved whole.
    found : dict
        Every tensor of the file: key to ``(shape, dtype name, is floating)``.

    Raises
    ------
    ValueError
        Naming the missing and unexpected keys and the saved modules
        without tensors, or the first tensor of a wrong shape or dtype.
    """
    expected: dict[str, tuple[int, ...]] = {}
    for keys in layers.values():
        for key, shape in keys.items():
            if key in expected:
                raise ValueError(f"layers {sorted(layers)} give tensor key {key!r} twice")
            expected[key] = shape
    saved = {k for k in found if saved_owner(k, modules) is not None}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - saved)
    empty = [m for m in modules if not any(saved_owner(k, modules) == m for k in saved)]
    if missing or unexpected or empty:
        raise ValueError(
            f"adapter tensors do not match the config: missing {missing}, unexpected "
            f"{unexpected}, saved modules without tensors {empty}"
        )
    for key, shape in expected.items():
        found_shape, dtype, floating = found[key]
        if tuple(found_shape) != shape or not floating:
            raise ValueError(
                f"tensor {key!r} must be a floating tensor of shape {shape}, got "
                f"{dtype} {tuple(found_shape)}"
            )


# --- values ------------------------------------------------------------------------------


def is_bool(value: object) -> bool:
    """Whether ``value`` is a Python or NumPy boolean (``numpy.bool`` in NumPy 2).

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib.io.flora_format import is_bool
    >>> is_bool(np.True_), is_bool(1)
    (True, False)
    """
    kind = type(value)
    return isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__.startswith("bool")
    )


def as_int(value: object, name: str) -> int:
    """``value`` as an int: Python and NumPy integers, never bool or float."""
    if is_bool(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def check_scale(value: object) -> float:
    """``value`` as a finite, non-zero float (Python or NumPy real; not bool).

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib.io.flora_format import check_scale
    >>> check_scale(np.float32(0.5))
    0.5
    """
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a real number, got {value!r}")
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"scale must be finite and non-zero, got {value}")
    return float(value)


def check_dropout(value: object, kind: str | None = None) -> float:
    """``value`` as a float in ``[0, 1)`` (Python or NumPy real; not bool); 0 for some kinds.

    A kind that adapts named parameters of its module (``on_parameters``:
    ``MultiheadAttention``, whose forward reads its weights itself) has no
    branch input to drop: its dropout must be 0 (when ``kind`` is given).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_dropout
    >>> check_dropout(0)
    0.0
    >>> check_dropout(0.1, "MultiheadAttention")
    Traceback (most recent call last):
    ...
    ValueError: dropout must be 0 for a MultiheadAttention layer, got 0.1: ...
    """
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a real number, got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {value}")
    if value and kind is not None and kind != "Parameter" and by_parameter(kind):
        raise ValueError(
            f"dropout must be 0 for a {kind} layer, got {value}: its adapter changes the "
            "weights the module reads, and has no branch input to drop (PEFT's LoRA "
            "ignores lora_dropout there)"
        )
    return float(value)


def check_kind(value: object) -> str:
    """``value`` if it is a layer kind of :data:`KINDS`: ``"Linear"``, ..., ``"Parameter"``.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_kind
    >>> check_kind("Conv2d")
    'Conv2d'
    """
    if value not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {value!r}")
    return str(value)


def check_bias(value: object, kind: str | None = None) -> bool:
    """``value`` as a bool; ``True`` only for a kind whose rule allows a bias (when ``kind`` is given).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_bias
    >>> check_bias(True, "Conv2d")
    True
    """  # noqa: E501
    if not is_bool(value):
        raise TypeError(f"bias must be True or False, got {value!r}")
    if value and kind is not None and kind not in BIAS_KINDS:
        raise ValueError(
            f"bias updates exist for {tuple(BIAS_KINDS)} layers only, not for a {kind}"
        )
    return bool(value)


def check_init(value: object) -> str:
    """``value`` if it is one of :data:`tuckerlib.io.flora_format.INIT_MODES`.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_init
    >>> check_init("hosvd")
    'hosvd'
    """
    if value not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {value!r}")
    return str(value)


def resolve_init(init: str, shape: Sequence[int]) -> str:
    """The init ``"auto"`` stands for on a weight of ``shape``; any other ``init`` as it is.

    ``"auto"`` is ``"balanced"`` (PEFT LoRA's start and learning rate) for
    2-D weights (Linear, Embedding, 2-D parameters) and ``"zero_core"``
    for weights of one or three or more modes (convolutions, N-D
    parameters), where the measurements of :doc:`/initialisation` found
    no better start.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import resolve_init
    >>> resolve_init("auto", (8, 16)), resolve_init("auto", (8, 16, 3, 3))
    ('balanced', 'zero_core')
    >>> resolve_init("gaussian", (8, 16))
    'gaussian'
    """
    if init != "auto":
        return init
    return "balanced" if len(shape) == 2 else "zero_core"


def check_forward(value: object) -> str:
    """``value`` if it is one of ``"auto"``, ``"dense"``, ``"factorized"``.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_forward
    >>> check_forward("dense")
    'dense'
    """
    if value not in FORWARD_MODES:
        raise ValueError(f"forward must be one of {FORWARD_MODES}, got {value!r}")
    return str(value)


def check_shape(value: object) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive ints."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {value!r}")
    shape = tuple(as_int(s, "shape entries") for s in value)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must hold positive ints, got {shape}")
    return shape


def check_template(value: object, name: str = "ranks") -> int | tuple[int | None, ...]:
    """A rank template: a positive int, or a sequence of positive ints and ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib.io.flora_format import check_template
    >>> check_template([np.int64(4), None, 2])
    (4, None, 2)
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        entries = []
        for i, r in enumerate(value):
            if r is not None:
                r = as_int(r, f"{name}[{i}]")
                if r < 1:
                    raise ValueError(f"{name}[{i}] must be a positive int or None, got {r}")
            entries.append(r)
        return tuple(entries)
    try:
        rank = as_int(value, name)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    if rank < 1:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    return rank


def check_ranks(value: object, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``value`` as one positive int per mode of ``shape`` (not yet checked against it)."""
    ranks = check_template(value, "ranks")
    if isinstance(ranks, int) or None in ranks or len(ranks) != len(shape):
        raise ValueError(f"ranks must give one positive int per mode of {shape}, got {ranks}")
    return ranks  # type: ignore[return-value]


def usable_ranks(ranks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    r"""The largest ranks ``<= ranks`` that a Tucker tensor of ``shape`` can use.

    Every mode satisfies :math:`R_n \le \min(I_n, \prod_{m \ne n} R_m)`; clipping one
    mode can lower the bound of another, so the clipping repeats until
    nothing changes (the result does not depend on the order of the modes).

    Parameters
    ----------
    ranks : sequence of int
        One positive rank per mode.
    shape : sequence of int
        The tensor's shape.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> from tuckerlib.io.flora_format import usable_ranks
    >>> usable_ranks((2, 8), (2, 256))  # a rank-2 matrix needs no rank 8 on its columns
    (2, 2)
    >>> usable_ranks((16, 1, 2, 2), (32, 1, 3, 3))  # a depthwise 3x3 convolution
    (4, 1, 2, 2)
    """
    current = [min(int(r), int(s)) for r, s in zip(ranks, shape, strict=True)]
    changed = True
    while changed:
        changed = False
        for n, rank in enumerate(current):
            bound = math.prod(current[:n] + current[n + 1 :])
            if rank > bound:
                current[n] = bound
                changed = True
    return tuple(current)


def check_layer_values(
    kind: object,
    shape: object,
    ranks: object,
    scale: object = 1.0,
    init: object = "zero_core",
    forward: object = "auto",
    dropout: object = 0.0,
    bias: object = False,
) -> dict[str, Any]:
    """One layer's settings, checked in this order, as a dict of the checked values.

    ``ranks`` must be usable as they are (:func:`usable_ranks`): a layer
    stores no rank it cannot use.

    Raises
    ------
    ValueError
        For an unknown kind, init or forward; ranks that do not match the
        shape or are not usable; a zero or non-finite scale; a dropout
        outside ``[0, 1)`` (or above 0 for a kind without a branch input,
        see :func:`check_dropout`); a bias update for a kind without a bias.
    TypeError
        For values of the wrong type (bools are never numbers).
    """
    kind = check_kind(kind)
    shape = check_shape(shape)
    ranks = check_ranks(ranks, shape)
    usable = usable_ranks(ranks, shape)
    if usable != ranks:
        raise ValueError(
            f"ranks {ranks} do not fit shape {shape}: every R_n must be at most I_n "
            f"and the product of the other ranks; usable ranks are {usable}"
        )
    return {
        "kind": kind,
        "shape": shape,
        "ranks": ranks,
        "scale": check_scale(scale),
        "init": resolve_init(check_init(init), shape),
        "forward": check_forward(forward),
        "dropout": check_dropout(dropout, kind),
        "bias": check_bias(bias, kind),
    }


# --- geometry ----------------------------------------------------------------------------


def _ints(value: object, count: int, low: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(type(v) is int and v >= low for v in value)
    )


def _conv_problem(shape: Sequence[int], record: Mapping[str, Any]) -> str | None:
    spatial = len(shape) - 2
    groups = record["groups"]
    if type(groups) is not int or groups < 1 or shape[0] % groups:
        return f"groups must be a positive int dividing the {shape[0]} output channels"
    if not (_ints(record["stride"], spatial, 1) and _ints(record["dilation"], spatial, 1)):
        return f"stride and dilation must be lists of {spatial} positive ints"
    padding = record["padding"]
    if padding not in ("same", "valid") and not _ints(padding, spatial, 0):
        return f"padding must be 'same', 'valid' or a list of {spatial} ints >= 0"
    if record["padding_mode"] not in _PADDING_MODES:
        return f"padding_mode must be one of {list(_PADDING_MODES)}"
    return None


def _embedding_problem(shape: Sequence[int], record: Mapping[str, Any]) -> str | None:
    index, max_norm = record["padding_idx"], record["max_norm"]
    if index is not None and (type(index) is not int or not 0 <= index < shape[0]):
        return f"padding_idx must be null or an int in [0, {shape[0]})"
    if max_norm is not None and (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, numbers.Real)
        or not math.isfinite(max_norm)
        or max_norm <= 0
    ):
        return "max_norm must be null or a positive number"
    return None


#: Each geometry a kind may take (:func:`geometry_of`): its record's keys and their check.
_GEOMETRIES = {
    "conv": (CONV_KEYS, _conv_problem),
    "embedding": (EMBEDDING_KEYS, _embedding_problem),
}


def check_geometry(kind: str, shape: Sequence[int], record: object) -> dict[str, Any]:
    """``record`` if it is a valid geometry for a layer of ``kind`` and ``shape``.

    Raises
    ------
    ValueError
        If the kind has no geometry, or the record lacks a key, has an
        unknown one or holds an invalid value (named in the message).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_geometry
    >>> check_geometry("Embedding", (10, 4), {"padding_idx": 0, "max_norm": None})
    {'padding_idx': 0, 'max_norm': None}
    """
    geometry = geometry_of(kind) if kind in KINDS else None
    if geometry is None:
        with_geometry = [k for k in KINDS if geometry_of(k)]
        raise ValueError(f"a {kind} layer has no geometry; only {with_geometry} layers do")
    keys, problem_of = _GEOMETRIES[geometry]
    if not isinstance(record, Mapping) or set(record) != set(keys):
        found = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"the geometry of a {kind} must have keys {list(keys)}, got {found}")
    problem = problem_of(shape, record)
    if problem is not None:
        raise ValueError(f"geometry: {problem}, got {dict(record)}")
    return dict(record)


# --- records and documents ---------------------------------------------------------------


def check_layer_name(name: object, what: str = "layer") -> str:
    """A dotted module or parameter name: non-empty parts (``""`` is the model itself).

    Raises
    ------
    ValueError
        Naming ``what`` and the name.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_layer_name
    >>> check_layer_name("blocks.0.fc1")
    'blocks.0.fc1'
    """
    if not isinstance(name, str) or not all(name.split(".")):
        raise ValueError(
            f"{what} name {name!r} must be a dotted module name with non-empty parts "
            "(not '', which is the model itself: an adapter cannot wrap the model it is in)"
        )
    return name


def check_record(record: object, *, geometry: bool = False) -> dict[str, Any]:
    """A layer record's keys and values (:func:`check_layer_values`), as checked values.

    Parameters
    ----------
    record : dict
        A JSON object with the keys ``kind``, ``shape``, ``ranks``,
        ``scale``, ``init`` and optionally ``forward``, ``dropout``,
        ``bias`` (and ``geometry`` when
        ``geometry`` is true; not checked here, see :func:`check_geometry`).
    geometry : bool, optional
        Whether the record may have a ``geometry`` key.

    Raises
    ------
    ValueError
        If ``record`` is not a mapping, lacks a key or has an unknown one,
        or holds an invalid value (JSON numbers only: strings and booleans
        are refused; a type error is a ``ValueError`` here).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"a layer record must be a JSON object, got {type(record).__name__}")
    optional = OPTIONAL_RECORD_KEYS if geometry else OPTIONAL_RECORD_KEYS[:-1]
    if not set(RECORD_KEYS) <= set(record) <= set(RECORD_KEYS + optional):
        raise ValueError(
            f"a layer record must have keys {sorted(RECORD_KEYS)} (optional "
            f"{', '.join(optional)}), got {sorted(record)}"
        )
    for key in ("shape", "ranks"):
        if not isinstance(record[key], list):
            raise ValueError(f"{key} must be a list of ints, got {record[key]!r}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    values.pop("geometry", None)
    try:
        return check_layer_values(**values)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class LayerRecord:
    """One checked layer record of a document (:func:`check_layer`).

    ``ranks`` are the usable ranks; ``stored_ranks`` those of the tensors
    (larger only in version 1 files, whose ranks need only be ``<= shape``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    stored_ranks: tuple[int, ...]
    scale: float = 1.0
    init: str = "zero_core"
    forward: str = "auto"
    dropout: float = 0.0
    bias: bool = False
    geometry: Mapping[str, Any] | None = None

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The layer's tensor keys and shapes (:func:`tensor_shapes`, at the stored ranks)."""
        return tensor_shapes(
            self.name, self.shape, self.stored_ranks, init=self.init, bias=self.bias
        )

    @property
    def masked_row(self) -> int | None:
        r"""The row of :math:`\Delta W` never applied (an embedding's ``padding_idx``), or None."""
        if geometry_of(self.kind) != "embedding" or self.geometry is None:
            return None
        return self.geometry.get("padding_idx")


def _positive_ints(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(i) is int and i > 0 for i in value)


def _version1_ranks(record: object) -> tuple[dict[str, Any], list[int]] | None:
    """A version 1 record at usable ranks and its stored ranks, when those fit the shape."""
    if not isinstance(record, Mapping):
        return None
    shape, ranks = record.get("shape"), record.get("ranks")
    if not (_positive_ints(shape) and _positive_ints(ranks)):
        return None
    if len(shape) != len(ranks) or any(r > s for r, s in zip(ranks, shape, strict=True)):
        return None
    return {**record, "ranks": list(usable_ranks(ranks, shape))}, list(ranks)


def check_layer(name: object, record: object, version: int = FORMAT_VERSION) -> LayerRecord:
    """Layer ``name``'s record of a document of ``version``, checked.

    Version 2 records must store usable ranks (:func:`usable_ranks`) and
    may record a ``geometry``; version 1 ranks need only be ``<= shape``.

    Raises
    ------
    ValueError
        ``"layer NAME: ..."`` with what is wrong (the name itself, a key, a
        value, the ranks, the geometry).
    """
    check_layer_name(name)
    try:
        stored = None
        if version == 1:
            found = _version1_ranks(record)
            if found is not None:
                record, stored = found
        values = check_record(record, geometry=version > 1)
        geometry = None
        if isinstance(record, Mapping) and "geometry" in record:
            geometry = check_geometry(values["kind"], values["shape"], record["geometry"])
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None
    stored_ranks = values["ranks"] if stored is None else tuple(stored)
    return LayerRecord(name, stored_ranks=stored_ranks, geometry=geometry, **values)  # type: ignore[arg-type]


def check_modules(value: object) -> list[str]:
    """``modules_to_save``: a list of distinct module names (a bare string is refused).

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_modules
    >>> check_modules("head")
    Traceback (most recent call last):
        ...
    ValueError: modules_to_save must be a list of module names, got 'head'
    """
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise ValueError(f"modules_to_save must be a list of module names, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"modules_to_save lists a module twice: {value!r}")
    return list(value)


def _check_text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value


def check_base_name(value: object) -> str | None:
    """``base_model_name_or_path``: None or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(
            f"base_model_name_or_path must be None or a non-empty string, got {value!r}"
        )
    return value


def _check_adapter_name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"adapter_name must be a str, got {type(value).__name__}")
    if not value or "." in value:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {value!r}")
    return value


_OPTIONAL_CHECKS = {
    "modules_to_save": check_modules,
    "base_model_name_or_path": check_base_name,
    "library_version": lambda value: _check_text(value, "library_version"),
    "peft_type": lambda value: _check_text(value, "peft_type"),
}


def _check_top(document: object) -> int:
    """The format version of a document whose top-level keys are all known."""
    if not isinstance(document, dict) or document.get("format") != "flora":
        raise ValueError('not a flora adapter config (no "format": "flora")')
    version = document.get("format_version")
    if type(version) is not int or version not in FORMAT_VERSIONS:
        raise ValueError(
            f"unsupported format_version {version!r}; this flora reads 1 and {FORMAT_VERSION}"
        )
    optional = sorted(OPTIONAL_KEYS) if version > 1 else []
    missing = sorted(set(DOCUMENT_KEYS) - set(document))
    unknown = sorted(set(document) - set(DOCUMENT_KEYS) - set(optional))
    if missing or unknown:
        raise ValueError(
            f"the config must have keys {sorted(DOCUMENT_KEYS)}"
            f"{f' (optional {optional})' if optional else ''}; missing {missing}, "
            f"unknown {unknown}"
        )
    for key in optional:
        if key in document and key != "modules_to_save":
            _OPTIONAL_CHECKS[key](document[key])
    if not isinstance(document["layers"], dict) or not document["layers"]:
        raise ValueError("layers must be a non-empty JSON object of layer records")
    return version


@dataclass(frozen=True)
class AdapterDocument:
    """A checked ``adapter_config.json`` (:func:`check_document`).

    ``config`` is the recorded ``FLoRAConfig.to_dict()`` as read: flora
    checks it, it changes no update.
    """

    version: int
    adapter_name: str
    config: Any
    layers: dict[str, LayerRecord]
    modules_to_save: list[str]
    base_model_name_or_path: str | None = None
    library_version: str | None = None


def check_document(document: object) -> AdapterDocument:
    """A parsed ``adapter_config.json``, checked: top-level keys, names, every layer record.

    Raises
    ------
    ValueError or TypeError
        Saying what is wrong; the callers prefix the file's path.

    Examples
    --------
    >>> from tuckerlib.io.flora_format import check_document
    >>> layer = {"kind": "Linear", "shape": [3, 4], "ranks": [1, 1], "scale": 1.0,
    ...          "init": "zero_core"}
    >>> document = {"format": "flora", "format_version": 2, "adapter_name": "default",
    ...             "config": {}, "layers": {"fc": layer}, "notes": "x"}
    >>> check_document(document)
    Traceback (most recent call last):
        ...
    ValueError: the config must have keys ['adapter_name', 'config', 'format', 'format_version', 'layers'] (optional ['base_model_name_or_path', 'library_version', 'modules_to_save', 'peft_type']); missing [], unknown ['notes']
    """  # noqa: E501
    version = _check_top(document)
    assert isinstance(document, dict)  # _check_top refuses anything else
    name = _check_adapter_name(document["adapter_name"])
    modules = check_modules(document.get("modules_to_save", []))
    layers = {n: check_layer(n, r, version) for n, r in document["layers"].items()}
    return AdapterDocument(
        version,
        name,
        document["config"],
        layers,
        modules,
        document.get("base_model_name_or_path"),
        document.get("library_version"),
    )


# --- the update ----------------------------------------------------------------------------


def difference(
    core: Any, factors: Sequence[Any], initial_core: Any, initial_factors: Sequence[Any]
) -> tuple[Any, list[Any]]:
    r"""The update :math:`G \times_n U_n - G_0 \times_n U^0_n` as one Tucker tensor, exactly.

    :math:`G, U_n` are ``core``, ``factors`` and :math:`G_0, U^0_n` are
    ``initial_core``, ``initial_factors``.

    The core is block-diagonal (``core``, then ``-initial_core``), the
    factors side by side; any array-API arrays (NumPy, PyTorch) of one
    library, returned in it.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib.io.flora_format import difference
    >>> core, factors = difference(np.ones((1, 1)), [np.ones((2, 1))] * 2,
    ...                            np.ones((1, 1)), [np.ones((2, 1))] * 2)
    >>> core.tolist(), factors[0].shape
    ([[1.0, 0.0], [0.0, -1.0]], (2, 2))
    """
    xp = get_namespace(core, initial_core, *factors, *initial_factors)
    shape = tuple(a + b for a, b in zip(core.shape, initial_core.shape, strict=True))
    out = xp.zeros(shape, dtype=core.dtype, device=array_api_compat.device(core))
    out[tuple(slice(0, s) for s in core.shape)] = core
    out[tuple(slice(s, None) for s in core.shape)] = -initial_core
    joined = [xp.concat((f, g), axis=1) for f, g in zip(factors, initial_factors, strict=True)]
    return out, joined


def update_factors(
    layer: LayerRecord,
    core: Any,
    factors: Sequence[Any],
    initial: tuple[Any, Sequence[Any]] | None = None,
) -> tuple[Any, list[Any]]:
    r"""A layer's change to its pretrained weight, :math:`\Delta W - \Delta W_\text{init}`, over s.

    For ``init="hosvd"`` (``initial`` given: the adapter at initialization)
    the :func:`difference`; and where the layer's kind masks a row (an
    embedding's ``padding_idx``), that row of ``U_0`` is zero, as the layer
    never applies it. ``factors`` are not changed in place.

    Raises
    ------
    ValueError
        If ``initial`` is given for a layer whose init is not ``"hosvd"``
        or missing for one whose init is.
    """
    if (initial is not None) != (layer.init == "hosvd"):
        raise ValueError(
            f"layer {layer.name!r}: the initial core and factors come with init 'hosvd' only "
            f"(init {layer.init!r}, initial {'given' if initial is not None else 'missing'})"
        )
    factors = list(factors)
    if initial is not None:
        core, factors = difference(core, factors, *initial)
    row = layer.masked_row
    if row is not None:
        xp = get_namespace(factors[0])
        rows = xp.arange(factors[0].shape[0], device=array_api_compat.device(factors[0]))
        keep = xp.reshape(rows != row, (-1, 1))
        factors[0] = xp.where(keep, factors[0], xp.zeros_like(factors[0]))
    return core, factors
