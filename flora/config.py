"""`FLoRAConfig`: which layers get an adapter, at which ranks, initialized how."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from typing import Any, Literal

from flora._match import name_matches, pattern_rank
from flora.spec import (
    BIAS_KINDS,
    KINDS,
    LayerSpec,
    RankTemplate,
    check_bias,
    check_dropout,
    check_forward,
    check_init,
    check_scale,
    check_template,
)
from tuckerlib.io.layer_kinds import DEFAULT_RANKS as _KIND_DEFAULT_RANKS

__all__ = ["DEFAULT_RANKS", "DEFAULT_TARGET_MODULES", "FLoRAConfig", "name_matches"]

Ranks = RankTemplate | Mapping[str, RankTemplate] | None

#: Ranks used for a layer kind that ``FLoRAConfig.ranks`` does not name (a
#: live, read-only view of the kind registry). The convolution ranks are the
#: paper's ConvNeXt configuration (16 on the channel modes, 2 on each kernel
#: mode); Linear, Conv1D and Embedding take 8 on both modes, PEFT's default
#: LoRA rank, so a FLoRA adapter costs what a rank-8 LoRA does plus a
#: 64-entry core. Other parameters take 8 on every mode.
DEFAULT_RANKS: Mapping[str, RankTemplate] = _KIND_DEFAULT_RANKS


# The ``target_modules`` value that targets every Linear but the output layer (PEFT's).
ALL_LINEAR = "all-linear"

#: The modules adapted when ``FLoRAConfig.target_modules`` (and ``target_parameters``) is
#: not given, by Hugging Face ``config.model_type``: PEFT's LoRA defaults
#: (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, PEFT
#: 0.21), kept here so that flora does not need PEFT. Entries match like a
#: ``target_modules`` list (exact name or dotted suffix), or are a regex string.
#: Several name transformers ``Conv1D`` layers (GPT-2's ``c_attn``), which
#: :func:`flora.inject` refuses as it refuses them when named.
DEFAULT_TARGET_MODULES: Mapping[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


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
    r"""Where to put FLoRA adapters and how to build them.

    Parameters
    ----------
    ranks : int, sequence, dict or None, optional
        Rank template, clipped layer by layer to each mode's size and to the
        usable ranks (:func:`flora.spec.clip_ranks`): an int for every mode
        of every layer, a sequence with one rank per mode, or a dict from
        layer kind (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Conv3d"``,
        ``"Embedding"``, ``"Conv1D"``, ``"MultiheadAttention"``,
        ``"Parameter"``, or a registered one) to either. Kinds not given (and
        ``None``) use :data:`DEFAULT_RANKS`.
    scale : float, optional
        The factor ``s`` of :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}`.
    dropout : float, optional
        Dropout probability on the adapter branch's input (Linear, ConvNd).
        A targeted ``MultiheadAttention`` has no branch input (the attention
        reads its adapted weights) and refuses a dropout above 0.
    target_modules : list of str, str or None, optional
        A list matches module names exactly or as a dotted suffix
        (``"fc1"`` matches ``"blocks.0.fc1"``); a string is a regular
        expression matched against the whole name (``re.fullmatch``).
        ``"all-linear"`` (any case) adapts every
        ``torch.nn.Linear`` outside ``modules_to_save`` except the output
        layer of a Hugging Face model (its output embeddings, else a
        ``classifier`` or ``score`` head), as PEFT does; transformers
        ``Conv1D`` layers are not adapted. ``None`` takes PEFT's default
        targets for the model's ``config.model_type``
        (:data:`DEFAULT_TARGET_MODULES`), and is an error for other models,
        unless ``target_parameters`` is given, in which case only those
        parameters are adapted.
    exclude_modules : list of str, str or None, optional
        Names removed from the targets, matched like ``target_modules``.
    rank_pattern : dict, optional
        Layer name to a rank template, overriding ``ranks``. A key names a
        layer exactly, as a dotted suffix (``"query"`` matches
        ``"blocks.0.query"``) or as a regular expression matched against the
        whole name; the most specific match wins (exact, then suffix, then
        regex; in dict order among equals). A key that matches no adapted
        layer is an error when the config is injected.
    target_parameters : list of str, str or None, optional
        Parameters (by full name, e.g. ``"moe.experts"``, or dotted suffix)
        adapted through :class:`flora.TuckerParametrization`, whatever their
        module's kind and number of dimensions.
    init : {"auto", "balanced", "zero_core", "hosvd", "gaussian"}, optional
        How the adapter starts; see :doc:`/flora_math` and
        :doc:`/initialisation`. ``"auto"`` (the default) is ``"balanced"``
        on 2-D weights (Linear, Embedding, 2-D parameters) and
        ``"zero_core"`` on the others (:func:`tuckerlib.io.flora_format.resolve_init`).
        Why: on 2-D weights ``"balanced"`` is LoRA's start, so its
        parameter groups move :math:`\Delta W` at LoRA's rates and LoRA's learning
        rate suits it, while ``"zero_core"``'s core moves :math:`\Delta W` about 13
        times as far per step as its factors. The rerun of every study
        (LoRA ranks 1 to 16, five seeds, learning rates swept per method
        and budget; :doc:`/flora_vs_lora`) chose it: on pretrained MiniLM
        ``"auto"`` is level with PEFT LoRA or ahead at every budget, where
        ``"zero_core"`` lost 0.038 at rank 2; on convolutions
        ``"zero_core"`` is never behind ``"balanced"`` by more than a
        standard error, ahead at small budgets, and stable where
        ``"balanced"`` on convolutions diverged on one seed.
    forward : {"auto", "dense", "factorized"}, optional
        How the adapter branch is computed; see :doc:`/flora_math`.
    modules_to_save : list of str, str or None, optional
        Whole modules (a new classification head, say) that are trained and
        saved with the adapter, matched like ``target_modules``: each adapter
        gets its own trainable copy, the original stays frozen and is what
        :func:`flora.disable_adapter` runs.
    bias : bool, optional
        Give every adapted Linear and ConvNd layer that has a bias a bias
        update :math:`\Delta b` (zero at the start, trained with the adapter, added
        to the layer's bias when merged), as PEFT's ``lora_bias``.
        :func:`flora.extract` sets it when it carries the fine-tune's bias
        changes. A targeted ``MultiheadAttention``, whose adapters carry no
        bias update (nor do PEFT's), refuses it.

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
    >>> config = FLoRAConfig(ranks={"Linear": 4}, target_modules=["fc1", "fc2"],
    ...                      rank_pattern={"fc2": 2})
    >>> config.ranks_for("Conv2d"), config.ranks_for("Linear", "blocks.0.fc2")
    ((16, 16, 2, 2), 2)
    >>> config.spec_for("Linear", (2, 256), "blocks.0.fc1").ranks
    (2, 2)
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
    init: Literal["auto", "balanced", "zero_core", "hosvd", "gaussian"] = "auto"
    forward: Literal["auto", "dense", "factorized"] = "auto"
    modules_to_save: list[str] | str | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        self.ranks = self._check_ranks(self.ranks)
        self.scale = check_scale(self.scale)
        self.dropout = check_dropout(self.dropout)
        self.target_modules = _check_names(self.target_modules, "target_modules")
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules")
        self.target_parameters = _check_names(self.target_parameters, "target_parameters")
        self.modules_to_save = _check_names(self.modules_to_save, "modules_to_save")
        if not isinstance(self.rank_pattern, Mapping):
            raise TypeError("rank_pattern must be a dict from layer name or regex to ranks")
        self.rank_pattern = {
            str(_check_names(str(k), "rank_pattern key")): check_template(v, f"rank_pattern[{k!r}]")
            for k, v in self.rank_pattern.items()
        }
        self.init = check_init(self.init)
        self.forward = check_forward(self.forward)
        self.bias = check_bias(self.bias)

    @staticmethod
    def _check_ranks(ranks: Ranks) -> Ranks:
        if ranks is None:
            return None
        if isinstance(ranks, Mapping):
            unknown = set(ranks) - set(KINDS)
            if unknown:
                raise ValueError(f"ranks names unknown layer kinds {sorted(unknown)}; use {KINDS}")
            return {k: check_template(v, f"ranks[{k!r}]") for k, v in ranks.items()}
        return check_template(ranks, "ranks")

    def pattern_for(self, name: str) -> str | None:
        """The ``rank_pattern`` key that sets the ranks of layer ``name``, if any.

        Parameters
        ----------
        name : str
            A module or parameter name.

        Returns
        -------
        str or None
            The most specific matching key (exact name, then dotted suffix,
            then full regex match; the first in dict order among equals).
        """
        best: tuple[int, str] | None = None
        for key in self.rank_pattern:
            rank = pattern_rank(key, name)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, key)
        return None if best is None else best[1]

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
            The matching ``rank_pattern`` entry (:meth:`pattern_for`), else
            ``ranks`` for this kind, else :data:`DEFAULT_RANKS` for this kind.

        Raises
        ------
        ValueError
            If ``kind`` is not one of ``KINDS``.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        key = None if name is None else self.pattern_for(name)
        if key is not None:
            return self.rank_pattern[key]
        if isinstance(self.ranks, Mapping):
            return self.ranks.get(kind, DEFAULT_RANKS[kind])
        return DEFAULT_RANKS[kind] if self.ranks is None else self.ranks

    def spec_for(
        self,
        kind: str,
        shape: Sequence[int],
        name: str | None = None,
        *,
        has_bias: bool = False,
    ) -> LayerSpec:
        """The :class:`flora.LayerSpec` of a layer of ``kind`` and ``shape`` called ``name``.

        Ranks come from :meth:`ranks_for`, clipped to ``shape`` and to the
        usable ranks; scale, init, forward and dropout from the config; a
        bias update if ``bias`` is set, the kind has one (Linear, ConvNd)
        and the layer has a bias (``has_bias``).

        Raises
        ------
        ValueError
            If the rank template does not fit ``shape`` (the message names
            the layer).
        """
        try:
            return LayerSpec.from_template(
                kind,
                tuple(shape),
                self.ranks_for(kind, name),
                scale=self.scale,
                init=self.init,
                forward=self.forward,
                dropout=self.dropout,
                bias=self.bias and has_bias and kind in BIAS_KINDS,
            )
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None

    @classmethod
    def for_layers(cls, specs: Mapping[str, LayerSpec]) -> FLoRAConfig:
        """A config that targets exactly these layers with exactly these ranks.

        Options (scale, init, forward, dropout) are those of the first spec;
        ``bias`` is set if any spec has a bias update. Saved adapters that
        were not made by :func:`flora.inject` (extracted or combined ones)
        record it.

        Parameters
        ----------
        specs : dict of str to LayerSpec
            Layer name (module, or ``module.parameter`` for kind
            ``"Parameter"``) to its spec; not empty.

        Returns
        -------
        FLoRAConfig

        Examples
        --------
        >>> from flora import FLoRAConfig, LayerSpec
        >>> config = FLoRAConfig.for_layers({"fc": LayerSpec("Linear", (3, 4), (2, 2))})
        >>> config.target_modules, config.rank_pattern
        (['fc'], {'fc': (2, 2)})
        """
        first = next(iter(specs.values()))
        modules = [name for name, spec in specs.items() if spec.kind != "Parameter"]
        parameters = [name for name, spec in specs.items() if spec.kind == "Parameter"]
        return cls(
            target_modules=modules or None,
            target_parameters=parameters or None,
            rank_pattern={name: spec.ranks for name, spec in specs.items()},
            scale=first.scale,
            init=first.init,
            forward=first.forward,
            dropout=first.dropout,
            bias=any(spec.bias for spec in specs.values()),
        )

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

    @classmethod
    def from_pretrained(cls, directory: str | PathLike[str]) -> FLoRAConfig:
        """The config an adapter folder records, as PEFT's ``PeftConfig.from_pretrained``.

        Parameters
        ----------
        directory : str or path-like
            A flora adapter folder, or a Hugging Face Hub id (``"org/name"``,
            with ``huggingface_hub`` installed; a local path always wins).

        Returns
        -------
        FLoRAConfig
            How the adapter was made. The folder's base model is
            ``flora.read_adapter(directory).base_model_name_or_path``.

        Raises
        ------
        tuckerlib.io.CheckpointError
            A ``ValueError`` naming the file, if the folder is missing, not
            a flora adapter folder, or its config is invalid.

        Examples
        --------
        >>> import tempfile
        >>> import torch
        >>> import flora
        >>> config = flora.FLoRAConfig(ranks=2, scale=0.5, target_modules=["0"])
        >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 3)), config)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = flora.save_adapter(model, tmp)
        ...     flora.FLoRAConfig.from_pretrained(tmp) == config
        True
        """
        from flora.io import _read_document

        return _read_document(directory)[4]
