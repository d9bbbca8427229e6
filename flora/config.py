"""`FLoRAConfig`: which layers get an adapter, at which ranks, initialized how."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = [
    "DEFAULT_RANKS",
    "FORWARD_MODES",
    "INIT_MODES",
    "KINDS",
    "FLoRAConfig",
    "clip_ranks",
]

RankTemplate = int | Sequence[int | None]
Ranks = RankTemplate | Mapping[str, RankTemplate] | None

#: Layer kinds, as written in configs and saved adapters.
KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Parameter")
INIT_MODES = ("zero_core", "hosvd", "gaussian")
FORWARD_MODES = ("auto", "dense", "factorized")

#: Ranks used for a layer kind that ``FLoRAConfig.ranks`` does not name. The
#: convolution ranks are the paper's ConvNeXt configuration (16 on the channel
#: modes, 2 on each kernel mode); Linear and Embedding take 8 on both modes,
#: PEFT's default LoRA rank, so a FLoRA adapter costs what a rank-8 LoRA does
#: plus a 64-entry core. Other parameters take 8 on every mode.
DEFAULT_RANKS: Mapping[str, RankTemplate] = {
    "Linear": (8, 8),
    "Conv1d": (16, 16, 2),
    "Conv2d": (16, 16, 2, 2),
    "Conv3d": (16, 16, 2, 2, 2),
    "Embedding": (8, 8),
    "Parameter": 8,
}


def _check_template(value: object, name: str) -> RankTemplate:
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return value
    entries = tuple(value)
    for i, r in enumerate(entries):
        if r is None:
            continue
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name}[{i}] must be a positive int or None, got {r!r}")
    return entries


def clip_ranks(
    template: RankTemplate, shape: Sequence[int], name: str = "ranks"
) -> tuple[int, ...]:
    """Clip a rank template to a weight's shape, mode by mode.

    Parameters
    ----------
    template : int or sequence of int or None
        An int applies to every mode; a sequence gives one rank per mode
        (``None`` keeps the mode full).
    shape : sequence of int
        The weight's shape ``(I_0, ..., I_{N-1})``.
    name : str, optional
        Name used in error messages.

    Returns
    -------
    tuple of int
        ``min(R_n, I_n)`` for every mode, so a depthwise convolution's
        ``in/groups`` mode of size 1 gets rank 1.

    Raises
    ------
    ValueError
        If a sequence template has a different number of entries than
        ``shape`` has modes, or a rank is below 1.
    TypeError
        If the template is not an int or a sequence.

    Examples
    --------
    >>> from flora.config import clip_ranks
    >>> clip_ranks((16, 16, 2, 2), (96, 1, 7, 7))
    (16, 1, 2, 2)
    >>> clip_ranks(8, (4, 32))
    (4, 8)
    """
    template = _check_template(template, name)
    shape = tuple(int(s) for s in shape)
    if isinstance(template, int):
        return tuple(min(template, s) for s in shape)
    if len(template) != len(shape):
        raise ValueError(
            f"{name}={template} has {len(template)} entries but the weight has "
            f"{len(shape)} modes (shape {shape})"
        )
    return tuple(s if r is None else min(r, s) for r, s in zip(template, shape, strict=True))


def _check_names(value: object, name: str) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{name} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise TypeError(f"{name} must be None, a regex string or a list of non-empty names")


@dataclass
class FLoRAConfig:
    """Where to put FLoRA adapters and how to build them.

    Parameters
    ----------
    ranks : int, sequence, dict or None, optional
        Rank template, clipped layer by layer to each mode's size: an int for
        every mode of every layer, a sequence with one rank per mode, or a
        dict from layer kind (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``,
        ``"Conv3d"``, ``"Embedding"``, ``"Parameter"``) to either. Kinds not
        given (and ``None``) use :data:`DEFAULT_RANKS`.
    scale : float, optional
        The factor ``s`` of ``ΔW = s · G ×_0 U_0 … ×_{N-1} U_{N-1}``.
    dropout : float, optional
        Dropout probability on the adapter branch's input (Linear, ConvNd).
    target_modules : list of str, str or None, optional
        A list matches module names exactly or as a dotted suffix
        (``"fc1"`` matches ``"blocks.0.fc1"``); a string is a regular
        expression matched against the whole name (``re.fullmatch``).
        ``None`` adapts every Linear, Conv1d/2d/3d and Embedding module
        (exact types, not subclasses) unless ``target_parameters`` is given,
        in which case only those parameters are adapted.
    exclude_modules : list of str, str or None, optional
        Names removed from the targets, matched like ``target_modules``.
    rank_pattern : dict, optional
        Regular expression (matched against the whole module or parameter
        name) to a rank template; the first matching pattern wins over
        ``ranks``.
    target_parameters : list of str, str or None, optional
        Parameters (by full name, e.g. ``"moe.experts"``, or dotted suffix)
        adapted through :class:`flora.TuckerParametrization`, whatever their
        module's kind and number of dimensions.
    init : {"zero_core", "hosvd", "gaussian"}, optional
        How the adapter starts; see :doc:`/flora_math`.
    forward : {"auto", "dense", "factorized"}, optional
        How the adapter branch is computed; see :doc:`/flora_math`.

    Raises
    ------
    ValueError
        For a rank below 1, a dropout outside ``[0, 1)``, a zero or
        non-finite scale, an invalid regular expression, an unknown layer
        kind, init or forward mode.
    TypeError
        For arguments of the wrong type.

    Examples
    --------
    >>> from flora import FLoRAConfig
    >>> config = FLoRAConfig(ranks={"Linear": 4}, target_modules=["fc1", "fc2"])
    >>> config.ranks_for("Conv2d"), config.ranks_for("Linear")
    ((16, 16, 2, 2), 4)
    >>> FLoRAConfig.from_dict(config.to_dict()) == config
    True
    """

    ranks: Ranks = None
    scale: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, RankTemplate] = field(default_factory=dict)
    target_parameters: list[str] | str | None = None
    init: Literal["zero_core", "hosvd", "gaussian"] = "zero_core"
    forward: Literal["auto", "dense", "factorized"] = "auto"

    def __post_init__(self) -> None:
        self.ranks = self._check_ranks(self.ranks)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"scale must be a float, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be finite and non-zero, got {self.scale}")
        self.scale = float(self.scale)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.target_modules = _check_names(self.target_modules, "target_modules")
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules")
        self.target_parameters = _check_names(self.target_parameters, "target_parameters")
        if not isinstance(self.rank_pattern, Mapping):
            raise TypeError("rank_pattern must be a dict from regex to ranks")
        self.rank_pattern = {
            str(_check_names(str(k), "rank_pattern key")): _check_template(
                v, f"rank_pattern[{k!r}]"
            )
            for k, v in self.rank_pattern.items()
        }
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.forward not in FORWARD_MODES:
            raise ValueError(f"forward must be one of {FORWARD_MODES}, got {self.forward!r}")

    @staticmethod
    def _check_ranks(ranks: Ranks) -> Ranks:
        if ranks is None:
            return None
        if isinstance(ranks, Mapping):
            unknown = set(ranks) - set(KINDS)
            if unknown:
                raise ValueError(f"ranks names unknown layer kinds {sorted(unknown)}; use {KINDS}")
            return {k: _check_template(v, f"ranks[{k!r}]") for k, v in ranks.items()}
        return _check_template(ranks, "ranks")

    def ranks_for(self, kind: str, name: str | None = None) -> RankTemplate:
        """The rank template of a layer, before clipping to its shape.

        Parameters
        ----------
        kind : str
            One of ``KINDS``.
        name : str, optional
            The module or parameter name, checked against ``rank_pattern``.

        Returns
        -------
        int or tuple
            The first matching ``rank_pattern`` entry, else ``ranks`` for
            this kind, else :data:`DEFAULT_RANKS` for this kind.

        Raises
        ------
        ValueError
            If ``kind`` is not one of ``KINDS``.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if name is not None:
            for pattern, template in self.rank_pattern.items():
                if re.fullmatch(pattern, name):
                    return template
        if isinstance(self.ranks, Mapping):
            return self.ranks.get(kind, DEFAULT_RANKS[kind])
        return DEFAULT_RANKS[kind] if self.ranks is None else self.ranks

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists).

        Returns
        -------
        dict
            One entry per field; :meth:`from_dict` reads it back.
        """

        def plain(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value

        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FLoRAConfig:
        """Build a config from :meth:`to_dict` output, rejecting unknown keys.

        Parameters
        ----------
        data : dict
            Field names to values.

        Returns
        -------
        FLoRAConfig
            The validated config.

        Raises
        ------
        ValueError
            If ``data`` has keys that are not fields, or invalid values.
        TypeError
            If ``data`` is not a mapping or a value has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(
                f"config has unknown fields {sorted(unknown)}; expected {sorted(names)}"
            )
        return cls(**dict(data))
