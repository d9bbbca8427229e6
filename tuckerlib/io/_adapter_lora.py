r"""Read a PEFT LoRA adapter directory as Tucker updates (PEFT 0.21's conventions).

PEFT saves, for a module ``NAME`` of the base model, ``lora_A`` and
``lora_B`` under ``base_model.model.NAME.lora_A.weight`` and
``….lora_B.weight`` (Linear: ``(r, in)`` and ``(out, r)``; ConvNd: a conv
``(r, in, *kernel)`` with the base's stride and padding, and a 1×1 conv
``(out, r / groups, 1, …)`` with the base's groups), or
``….lora_embedding_A`` ``(r, num)`` and ``….lora_embedding_B`` ``(dim, r)``
for an Embedding. The update is :math:`\text{scaling} \cdot B A` (Linear), :math:`(B A)^\top`
(Embedding, and Linear with ``fan_in_fan_out``) or the composition of the
two convolutions, with ``scaling = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` per layer from the
first matching ``rank_pattern`` / ``alpha_pattern`` key. With ``lora_bias``,
``lora_B`` of a Linear or ConvNd pair also has a bias, saved as
``….lora_B.bias``: PEFT adds :math:`\text{scaling} \cdot \texttt{lora_B.bias}` to the layer's
output, a bias update :math:`\Delta b` beside the weight update (PEFT's Embedding and
``target_parameters`` refuse ``lora_bias``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuckerlib.io._adapter import (
    CONFIG_NAME,
    Adapter,
    AdapterError,
    AdapterLayer,
    LayerReader,
    finite_scale,
    open_weights,
)
from tuckerlib.io._base import Checkpoint
from tuckerlib.io._patterns import PatternError, suffix_matcher

__all__ = ["open_lora"]

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<name>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<name>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_BIAS_KEY = re.compile(r"^(?P<name>.+)\.lora_B\.bias$")

#: Config entries that say how the adapter was made or which modules it
#: targets; the tensors present decide the update, so these are not needed.
_METADATA = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
    }
)
_HANDLED = frozenset(
    {
        "r",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
        "bias",
        "modules_to_save",
        "target_parameters",
        "lora_bias",
    }
)
#: Initializations that leave the base weights alone: the saved pair is the whole update.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_REASONS = {
    "use_dora": "DoRA rescales every output channel of W0 + ΔW by a trained magnitude, so "
    "its update depends on the base weight and is not a low-rank tensor",
    "alora_invocation_tokens": "aLoRA switches the adapter on per token, which no weight "
    "update does",
    "layer_replication": "layer_replication duplicates base layers, which changes the model, "
    "not a weight",
    "trainable_token_indices": "trainable tokens replace embedding rows outside the LoRA pair",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
}


_NESTED = "several target_parameters of one module (nested PEFT wrappers)"


def _neutral(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def _refuse(where: str, key: str, value: object, reason: str) -> AdapterError:
    return AdapterError(f"{where}: {key}={value!r}: {reason}; it has no exact FLoRA/Tucker form")


def _check_options(where: str, config: Mapping[str, Any]) -> None:
    r"""Refuse every option that makes the update more than :math:`\text{scaling} \cdot B A`."""
    if config.get("peft_type") != "LORA":
        raise _refuse(
            where, "peft_type", config.get("peft_type"), "only LoRA adapters are read here"
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse(
            where,
            "init_lora_weights",
            init,
            "this initialization rewrites the base weights (or adds a LoRA variant) when the "
            "adapter is loaded, so the update relative to the original weights needs them",
        )
    if config.get("bias", "none") != "none":
        raise _refuse(where, "bias", config["bias"], "the adapter trains biases of the base layers")
    if type(config.get("lora_bias", False)) is not bool:
        raise AdapterError(f"{where}: lora_bias must be true or false, got {config['lora_bias']!r}")
    if config.get("fan_in_fan_out") and config.get("target_parameters"):
        raise _refuse(
            where, "fan_in_fan_out", True, "PEFT refuses it together with target_parameters"
        )
    for key, value in config.items():
        if key in _METADATA or key in _HANDLED or _neutral(value):
            continue
        reason = _REASONS.get(
            key, "an option this reader does not know, which may change the update"
        )
        raise _refuse(where, key, value, reason)


@dataclass(frozen=True)
class _Options:
    """What decides each layer's rank and scaling."""

    r: int
    alpha: float
    rslora: bool
    rank_pattern: tuple[tuple[Callable[[str], bool], int], ...]
    alpha_pattern: tuple[tuple[Callable[[str], bool], float], ...]
    dropout: float
    fan_in_fan_out: bool
    target_parameters: tuple[str, ...]
    lora_bias: bool = False
    #: PEFT's MultiheadAttention layer adds the out_proj pair twice (see
    #: :data:`DOUBLED_OUT_PROJ`); its update is then ``2 · scaling · B A``.
    doubled_out_proj: bool = True

    def _pattern(
        self, patterns: tuple[tuple[Callable[[str], bool], Any], ...], name: str, default: Any
    ) -> Any:
        # PEFT's get_pattern_key: the first key matching a dotted suffix of the name.
        for matches, value in patterns:
            if matches(name):
                return value
        return default

    def rank(self, name: str) -> int:
        return self._pattern(self.rank_pattern, name, self.r)

    def scaling(self, name: str) -> float:
        rank = self.rank(name)
        alpha = self._pattern(self.alpha_pattern, name, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _positive_int(where: str, key: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise AdapterError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _patterns(
    where: str, key: str, value: object, check: Any
) -> tuple[tuple[Callable[[str], bool], Any], ...]:
    """``(matcher, value)`` per key, in the file's order; keys matched in linear time."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise AdapterError(f"{where}: {key} must be an object, got {type(value).__name__}")
    matchers = []
    for pattern, entry in value.items():
        try:
            matches = suffix_matcher(pattern)
        except PatternError as exc:
            raise AdapterError(f"{where}: {key}: {exc}") from None
        matchers.append((matches, check(where, f"{key}[{pattern!r}]", entry)))
    return tuple(matchers)


def _alpha(where: str, key: str, value: object) -> float:
    return finite_scale(value, f"{where}: {key}")


def _options(where: str, config: Mapping[str, Any]) -> _Options:
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{where}: lora_dropout must lie in [0, 1), got {dropout!r}")
    targets = config.get("target_parameters") or []
    if isinstance(targets, str):
        targets = [targets]
    return _Options(
        r=_positive_int(where, "r", config.get("r", 8)),
        alpha=_alpha(where, "lora_alpha", config.get("lora_alpha", 8)),
        rslora=bool(config.get("use_rslora", False)),
        rank_pattern=_patterns(where, "rank_pattern", config.get("rank_pattern"), _positive_int),
        alpha_pattern=_patterns(where, "alpha_pattern", config.get("alpha_pattern"), _alpha),
        dropout=float(dropout),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        target_parameters=tuple(targets),
        lora_bias=config.get("lora_bias", False),
        doubled_out_proj=doubles_out_proj(config.get("peft_version")),
    )


#: The last PEFT release whose MultiheadAttention layer adds its out_proj pair
#: twice, in merge and in every forward (``W + 2 · scaling · B A``;
#: huggingface/peft#3774 fixes it). Adapters saved by it, or without a
#: ``peft_version``, are read as that release computes them.
DOUBLED_OUT_PROJ = (0, 21, 2)


def doubles_out_proj(peft_version: object) -> bool:
    """Whether PEFT ``peft_version`` adds a MultiheadAttention's out_proj update twice.

    Examples
    --------
    >>> doubles_out_proj("0.21.2"), doubles_out_proj("0.22.0"), doubles_out_proj(None)
    (True, False, True)
    """
    found = (
        re.match(r"(\d+)\.(\d+)\.(\d+)", peft_version) if isinstance(peft_version, str) else None
    )
    return found is None or tuple(int(g) for g in found.groups()) <= DOUBLED_OUT_PROJ


@dataclass(frozen=True)
class _Pair:
    """The keys of one layer (``lora_B.bias`` with ``lora_bias``) and the header shapes."""

    name: str
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    embedding: bool
    bias_key: str | None = None


def _full_tensor_reason(short: str, modules_to_save: list[str]) -> str:
    if _BIAS_KEY.match(short):
        return "a lora_B bias without lora_bias=True in the config, which PEFT does not load"
    owner = next((m for m in modules_to_save if re.search(rf"(^|\.){re.escape(m)}\.", short)), None)
    if owner:
        return "modules_to_save: a full trained copy of the module, not a low-rank update"
    return "a full tensor saved with the adapter, not a low-rank update"


def _pairs(
    path: Path, weights: Checkpoint, modules_to_save: list[str], lora_bias: bool
) -> tuple[list[_Pair], list[tuple[str, str]]]:
    halves: dict[tuple[str, bool], dict[str, str]] = {}
    biases: dict[str, str] = {}
    skipped = []
    for key in weights:
        short = key.removeprefix(_PREFIX)
        bias = _BIAS_KEY.match(short) if lora_bias else None
        if bias is not None:
            biases[bias.group("name")] = key
            continue
        match = _LORA_KEY.match(short) or _EMBEDDING_KEY.match(short)
        if match is None:
            skipped.append((short, _full_tensor_reason(short, modules_to_save)))
            continue
        embedding = match.group("part").startswith("lora_embedding")
        side = match.group("part")[-1]
        halves.setdefault((match.group("name"), embedding), {})[side] = key
    pairs = []
    for (name, embedding), keys in halves.items():
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise AdapterError(f"{path}: layer {name!r} has no {missing} tensor")
        a_info, b_info = weights.info(keys["A"]), weights.info(keys["B"])
        if not (a_info.is_floating and b_info.is_floating):
            raise AdapterError(f"{path}: layer {name!r}: lora_A and lora_B must be floating point")
        bias_key = None if embedding else biases.pop(name, None)
        if bias_key is not None:
            _check_bias(path, name, weights, bias_key, b_info.shape[0])
        pair = _Pair(name, keys["A"], keys["B"], a_info.shape, b_info.shape, embedding, bias_key)
        pairs.append(pair)
    if biases:
        raise AdapterError(f"{path}: lora_B.bias tensors of no LoRA pair: {sorted(biases)}")
    return pairs, skipped


def _check_bias(path: Path, name: str, weights: Checkpoint, key: str, out: int) -> None:
    info = weights.info(key)
    if info.shape != (out,) or not info.is_floating:
        raise AdapterError(
            f"{path}: layer {name!r}: lora_B.bias must be floating with shape [{out}], got "
            f"{info.dtype} {list(info.shape)}"
        )


def _bias(weights: Checkpoint, pair: _Pair, scaling: float) -> np.ndarray | None:
    r"""PEFT's bias update :math:`\text{scaling} \cdot b_B` (None without one), stored dtype."""
    if pair.bias_key is None:
        return None
    bias = weights.read(pair.bias_key)
    return (bias.astype(np.float64) * scaling).astype(bias.dtype)


def _linear(
    pair: _Pair, scaling: float, *, kind: str, name: str, transposed: bool, dropout: float
) -> LayerReader:
    r""":math:`\text{scaling} \cdot B A` (out, in), or its transpose for a weight stored so."""
    r, cols = pair.a_shape
    rows = pair.b_shape[0]

    def read(weights: Checkpoint) -> AdapterLayer:
        a, b = weights.read(pair.a_key), weights.read(pair.b_key)
        return AdapterLayer(
            name=name,
            kind=kind,
            shape=(cols, rows) if transposed else (rows, cols),
            core=np.eye(r, dtype=a.dtype),
            factors=(a.T, b) if transposed else (b, a.T),
            scale=scaling,
            stored_ranks=(r,),
            stored_params=a.size + b.size,
            dropout=dropout,
            bias=_bias(weights, pair, scaling),
        )

    return read


def _grouped_blocks(a: np.ndarray, groups: int) -> np.ndarray | None:
    """lora_A's diagonal blocks ``(r, in/groups, *kernel)``, or None if it mixes groups."""
    r, channels = a.shape[:2]
    rank_step, channel_step = r // groups, channels // groups
    mask = np.ones(a.shape[:2], dtype=bool)
    for g in range(groups):
        mask[g * rank_step : (g + 1) * rank_step, g * channel_step : (g + 1) * channel_step] = False
    if np.any(a[mask]):
        return None
    return np.concatenate(
        [
            a[g * rank_step : (g + 1) * rank_step, g * channel_step : (g + 1) * channel_step]
            for g in range(groups)
        ]
    )


def _conv_factor(b: np.ndarray, groups: int) -> np.ndarray:
    """lora_B ``(out, r / groups)`` as the block-diagonal ``(out, r)`` factor it acts as."""
    out, rank_step = b.shape
    factor = np.zeros((out, rank_step * groups), dtype=b.dtype)
    out_step = out // groups
    for g in range(groups):
        rows = slice(g * out_step, (g + 1) * out_step)
        factor[rows, g * rank_step : (g + 1) * rank_step] = b[rows]
    return factor


def _conv(pair: _Pair, scaling: float, groups: int, dropout: float) -> LayerReader:
    r, channels, *kernel = pair.a_shape
    out = pair.b_shape[0]
    shape = (out, channels // groups, *kernel)
    kind = f"Conv{len(kernel)}d"
    stored = math.prod(pair.a_shape) + math.prod(pair.b_shape)

    def read(weights: Checkpoint) -> AdapterLayer:
        a = weights.read(pair.a_key)
        b = weights.read(pair.b_key).reshape(out, -1)
        core = a if groups == 1 else _grouped_blocks(a, groups)
        if core is None:
            raise AdapterError(f"layer {pair.name!r}: lora_A mixes channels across groups")
        factors = (_conv_factor(b, groups), *(None,) * (len(shape) - 1))
        bias = _bias(weights, pair, scaling)
        return AdapterLayer(
            pair.name, kind, shape, core, factors, scaling, (r,), stored, dropout, bias=bias
        )

    return read


def _parameter_names(pair: _Pair, targets: tuple[str, ...]) -> list[str]:
    names = []
    for target in targets:
        full = f"{pair.name}.{target.rpartition('.')[2]}"
        if full == target or full.endswith(f".{target}"):
            names.append(full)
    return names


def _check_rank(path: Path, pair: _Pair, rank: int, found: int) -> None:
    if found != rank:
        raise AdapterError(
            f"{path}: layer {pair.name!r}: r and rank_pattern give rank {rank} but the stored "
            f"lora_A has {found} rows"
        )


def _conv_groups(path: Path, pair: _Pair, rank: int) -> int:
    if len(pair.b_shape) != len(pair.a_shape) or any(k != 1 for k in pair.b_shape[2:]):
        raise AdapterError(
            f"{path}: layer {pair.name!r}: lora_B {list(pair.b_shape)} is no 1x1 convolution "
            f"for lora_A {list(pair.a_shape)}"
        )
    groups, rest = divmod(rank, pair.b_shape[1])
    if rest or pair.a_shape[1] % groups or pair.b_shape[0] % groups:
        raise AdapterError(
            f"{path}: layer {pair.name!r}: lora_B {list(pair.b_shape)} does not fit lora_A "
            f"{list(pair.a_shape)}"
        )
    return groups


_Plan = tuple[str, LayerReader] | tuple[str, str]


def _bias_refused(what: str) -> str:
    return f"lora_bias=True, which PEFT refuses for {what}: PEFT does not load this adapter"


def _require_bias(path: Path, pair: _Pair, options: _Options) -> None:
    # PEFT gives lora_B a bias initialized by its own rule: without the
    # saved one, the update PEFT applies is not in the directory.
    if options.lora_bias and pair.bias_key is None:
        raise AdapterError(
            f"{path}: layer {pair.name!r}: lora_bias=True, but the adapter holds no lora_B.bias "
            "for it"
        )


def _plan_matrix(path: Path, pair: _Pair, options: _Options, targets: list[str]) -> _Plan:
    """A Linear pair: of a module, of a 2-D parameter, or of a weight stored (in, out)."""
    if len(targets) > 1:
        return pair.name, _NESTED
    name = targets[0] if targets else pair.name
    rank, scaling = options.rank(name), options.scaling(name)
    if targets and pair.a_shape[0] != rank:
        return name, (
            "a 3-D target_parameters tensor: its axis order depends on the module "
            "(is_transposed), which the adapter does not record"
        )
    if targets and options.lora_bias:
        return name, _bias_refused("target_parameters")
    _check_rank(path, pair, rank, pair.a_shape[0])
    if targets:
        read = _linear(pair, scaling, kind="Parameter", name=name, transposed=False, dropout=0.0)
        return name, read
    _require_bias(path, pair, options)
    if options.fan_in_fan_out:
        # The option exists for weights stored (in, out), as transformers' Conv1D does.
        weight = f"{pair.name}.weight"
        dropout = options.dropout
        return weight, _linear(
            pair, scaling, kind="Parameter", name=weight, transposed=True, dropout=dropout
        )
    return pair.name, _linear(
        pair, scaling, kind="Linear", name=pair.name, transposed=False, dropout=options.dropout
    )


def _plan_conv(path: Path, pair: _Pair, options: _Options, weights: Checkpoint) -> _Plan:
    rank = options.rank(pair.name)
    _check_rank(path, pair, rank, pair.a_shape[0])
    _require_bias(path, pair, options)
    groups = _conv_groups(path, pair, rank)
    if groups > 1 and _grouped_blocks(weights.read(pair.a_key), groups) is None:
        return pair.name, (
            f"a grouped LoRA conv (groups={groups}) whose lora_A mixes input channels across "
            "groups: its update is no weight of the grouped layer"
        )
    return pair.name, _conv(pair, options.scaling(pair.name), groups, options.dropout)


def _check_shapes(path: Path, pair: _Pair) -> None:
    """Refuse a pair whose dimensions fit no layer kind, before any arithmetic on them.

    Every dimension is a rank or a size, so it is at least 1; an Embedding
    pair is ``(r, num)`` and ``(dim, r)``; any other ``lora_A`` is 2-D to
    5-D (Linear, Conv1d-3d) and ``lora_B`` has the same number of dims.
    """
    a, b = pair.a_shape, pair.b_shape
    names = ("lora_embedding_A", "lora_embedding_B") if pair.embedding else ("lora_A", "lora_B")
    where = f"{path}: layer {pair.name!r}: {names[0]} {list(a)} and {names[1]} {list(b)}"
    if 0 in a or 0 in b:
        raise AdapterError(f"{where}: every dimension must be >= 1 (a rank or a size)")
    if pair.embedding and not (len(a) == len(b) == 2 and b[1] == a[0]):
        raise AdapterError(f"{where}: an Embedding pair must be (r, num) and (dim, r)")
    if not pair.embedding and not 2 <= len(a) == len(b) <= 5:
        raise AdapterError(
            f"{where}: a Linear pair must be 2-D and a ConvNd pair (N = 1, 2, 3) (N+2)-D each"
        )


def _attention_owner(pair: _Pair, pairs: Mapping[str, _Pair]) -> str | None:
    """``X`` if ``pair`` is the out-projection pair of PEFT's MultiheadAttention layer ``X``.

    PEFT keeps it under ``X.base_layer.out_proj`` beside the packed
    in-projection pair ``X`` of a ``(3E, E)`` weight, where out_proj is
    ``(E, E)``.
    """
    owner = pair.name.removesuffix(".base_layer.out_proj")
    inner = pairs.get(owner)
    if owner == pair.name or inner is None or inner.embedding or pair.embedding:
        return None
    size = pair.b_shape[0]
    square = len(pair.a_shape) == 2 and pair.a_shape[1] == size
    packed = len(inner.a_shape) == 2 and inner.a_shape[1] == size and inner.b_shape[0] == 3 * size
    return owner if square and packed else None


def _plan_attention_out(path: Path, pair: _Pair, options: _Options, owner: str) -> _Plan:
    """PEFT's out_proj pair of attention ``owner``: the attention's rank and scaling, as PEFT.

    Read as the update PEFT applies: twice the pair for the releases that
    add it twice (:data:`DOUBLED_OUT_PROJ`).
    """
    name = f"{owner}.out_proj"
    if options.lora_bias:
        return name, _bias_refused("a MultiheadAttention")
    _check_rank(path, pair, options.rank(owner), pair.a_shape[0])
    _require_bias(path, pair, options)
    scaling = options.scaling(owner) * (2 if options.doubled_out_proj else 1)
    return name, _linear(pair, scaling, kind="Linear", name=name, transposed=False, dropout=0.0)


def _plan_pair(
    path: Path, pair: _Pair, options: _Options, weights: Checkpoint, pairs: Mapping[str, _Pair]
) -> _Plan:
    """``(name, reader)`` for a layer with a Tucker form, ``(name, reason)`` otherwise."""
    if "base_layer" in pair.name.split("."):
        owner = _attention_owner(pair, pairs)
        if owner is None:
            return pair.name, _NESTED
        return _plan_attention_out(path, pair, options, owner)
    _check_shapes(path, pair)
    if pair.embedding:
        if options.lora_bias:
            return pair.name, _bias_refused("an Embedding")
        _check_rank(path, pair, options.rank(pair.name), pair.a_shape[0])
        return pair.name, _linear(
            pair,
            options.scaling(pair.name),
            kind="Embedding",
            name=pair.name,
            transposed=True,
            dropout=0.0,
        )
    if len(pair.a_shape) == 2 and pair.b_shape[1:] == pair.a_shape[:1]:
        return _plan_matrix(path, pair, options, _parameter_names(pair, options.target_parameters))
    if 3 <= len(pair.a_shape) <= 5:
        return _plan_conv(path, pair, options, weights)
    raise AdapterError(
        f"{path}: layer {pair.name!r}: lora_A {list(pair.a_shape)} and lora_B "
        f"{list(pair.b_shape)} are no LoRA pair of a Linear, ConvNd or Embedding"
    )


def open_lora(directory: Path, config: dict[str, Any]) -> Adapter:
    """Open a PEFT LoRA adapter directory whose parsed config is ``config``."""
    where = str(directory / CONFIG_NAME)
    _check_options(where, config)
    options = _options(where, config)
    modules = config.get("modules_to_save") or []
    weights = open_weights(directory)
    try:
        pairs, skipped = _pairs(directory, weights, list(modules), options.lora_bias)
        readers: dict[str, LayerReader] = {}
        by_name = {pair.name: pair for pair in pairs}
        for pair in pairs:
            name, plan = _plan_pair(directory, pair, options, weights, by_name)
            if isinstance(plan, str):
                skipped.append((name, plan))
            else:
                readers[name] = plan
    except BaseException:
        weights.close()
        raise
    if not readers and not skipped:
        weights.close()
        raise AdapterError(f"{directory}: the adapter holds no LoRA tensors")
    return Adapter(directory, "lora", config, weights, readers, skipped)
