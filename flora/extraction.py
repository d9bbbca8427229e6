"""Turn a full fine-tune into a FLoRA adapter: a truncated Tucker tensor of each ΔW."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flora._args import check_flag, check_fraction, check_positive_int
from flora._atomic import check_not_input, check_target
from flora._carry import Carried, carry
from flora.config import FLoRAConfig
from flora.io import CONFIG_NAME, WEIGHTS_NAME, write_adapter
from flora.kinds import kind_of_module
from flora.spec import LayerSpec, RankTemplate, check_template, clip_ranks, usable_ranks
from tuckerlib import (
    TuckerTensor,
    energy_ranks,
    hooi,
    mode_spectra,
    relative_error,
    sthosvd,
)
from tuckerlib.analysis import lora_budget_ranks, tensor_kind
from tuckerlib.io import Checkpoint, open_checkpoint, pair_checkpoints, read_delta
from tuckerlib.io.flora_format import bias_key, core_key, factor_key, saved_key
from tuckerlib.io.layer_kinds import kind_rule, known_tensor_class

__all__ = ["ExtractedLayer", "Extraction", "ExtractionError", "extract"]

_DEFAULT_LORA_RANK = 8


class ExtractionError(ValueError):
    """The checkpoints and the settings of :func:`extract` do not make an adapter.

    Raised for well-typed input that cannot be used: settings that conflict
    or do not fit the checkpoints' tensors, checkpoints with nothing to
    extract or with two tensors for one adapter layer, an output directory
    that cannot take the adapter. The command line reports it as exit
    status 2; a plain ``ValueError`` or ``TypeError`` from :func:`extract`
    means an invalid argument value.

    Examples
    --------
    >>> import flora
    >>> issubclass(flora.ExtractionError, ValueError)
    True
    """


@dataclass(frozen=True)
class ExtractedLayer:
    r"""One adapted weight of an extracted adapter.

    Parameters
    ----------
    name : str
        The adapter layer's name: the module name for Linear, ConvNd and
        Embedding layers, the parameter's full name for kind ``Parameter``.
    tensor : str
        The checkpoint tensor it adapts (``name + ".weight"`` for modules).
    kind : str
        The flora layer kind (``"Linear"``, ``"Conv2d"``, ..., ``"Parameter"``).
    shape : tuple of int
        The update's shape: the weight's, or for a kind that stores its
        weight transposed (``Conv1D``) the ``(out, in)`` map's.
    ranks : tuple of int
        The Tucker ranks of the adapter.
    n_params : int
        Adapter parameters: core plus factors.
    relative_error : float
        :math:`\|\Delta W - \Delta\hat{W}\| / \|\Delta W\|` of the adapter's update against the
        fine-tune's.
    """

    #: The adapter layer's name (module name, or parameter name for ``Parameter``).
    name: str
    #: The checkpoint tensor it adapts.
    tensor: str
    #: The flora layer kind.
    kind: str
    #: The update's shape (a ``Conv1D``'s ``(out, in)``).
    shape: tuple[int, ...]
    #: The Tucker ranks of the adapter.
    ranks: tuple[int, ...]
    #: Adapter parameters: core plus factors.
    n_params: int
    #: :math:`\|\Delta W - \Delta\hat{W}\| / \|\Delta W\|`.
    relative_error: float


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract` wrote.

    Parameters
    ----------
    directory : pathlib.Path
        The adapter directory (``adapter_model.safetensors`` and
        ``adapter_config.json``).
    layers : list of ExtractedLayer
        The adapted weights, in checkpoint order.
    skipped : list of (str, str)
        Tensors not in the adapter, with the reason (1-D tensors such as
        biases and norms unless carried, unchanged or mismatched tensors,
        ...).
    config : FLoRAConfig
        The config recorded in the directory: injecting it into the base
        model recreates the adapter's structure.
    carried : list of (str, str)
        With ``carry_1d``: the 1-D tensors carried into the adapter, and
        how (as the bias update of their layer, or saved with their module).
    carried_values : int
        Entries of the carried tensors: the bias updates and the saved
        modules' tensors (not counted in the layers' ``n_params``).
    """

    #: The adapter directory.
    directory: Path
    #: The adapted weights, in checkpoint order.
    layers: list[ExtractedLayer]
    #: ``(name, reason)`` of each tensor not in the adapter.
    skipped: list[tuple[str, str]]
    #: The config recorded in the directory.
    config: FLoRAConfig
    #: ``(name, how)`` of each 1-D tensor carried into the adapter.
    carried: list[tuple[str, str]] = field(default_factory=list)
    #: Entries of the carried tensors (bias updates, saved modules).
    carried_values: int = 0


@dataclass(frozen=True)
class _Rules:
    """The validated rank settings of one extraction."""

    ranks: RankTemplate | None
    energy: float | None
    lora_rank: int
    kernel_rank: int | None

    def ranks_for(self, name: str, delta: np.ndarray, layer_kind: str) -> tuple[int, ...]:
        """The usable ranks of ``delta``; a rank above them adds parameters, not accuracy."""
        shape = tuple(delta.shape)
        kind = known_tensor_class(layer_kind) or tensor_kind(name, shape)
        if self.ranks is None and self.energy is None:
            spectra = [np.asarray(s) for s in mode_spectra(delta)]
            ranks = lora_budget_ranks(spectra, kind, self.lora_rank, kernel_rank=self.kernel_rank)
            return usable_ranks(ranks[0], shape)
        if self.ranks is not None:
            ranks = list(clip_ranks(self.ranks, shape))
        else:
            ranks = list(energy_ranks(delta, self.energy))
        if self.kernel_rank is not None and kind == "conv":
            ranks[2:] = [min(self.kernel_rank, size) for size in shape[2:]]
        return usable_ranks(ranks, shape)


#: A rank rule of :func:`extract`: a rank template or a dict of ``RULE_KEYS``.
RankRule = int | Sequence[int | None] | Mapping[str, Any]

#: The keys of a rank rule given as a dict (``rank={"energy": 0.9}``): at most one of
#: the first three, optionally with ``fixed_kernel_rank``.
RULE_KEYS = ("ranks", "energy", "budget_like_lora", "fixed_kernel_rank")


def _rank_rule(rank: object, deprecated: Mapping[str, object]) -> dict[str, object]:
    """The rank rule of ``rank=`` (or of the deprecated keywords) as a dict of :data:`RULE_KEYS`."""
    unknown = sorted(set(deprecated) - set(RULE_KEYS))
    if unknown:
        raise TypeError(f"extract() got unexpected keyword arguments {unknown}")
    old = {key: value for key, value in deprecated.items() if value is not None}
    if old and rank is not None:
        raise ExtractionError(
            f"give the rank rule once, as rank=...; got rank={rank!r} and {sorted(old)}"
        )
    if old:
        new = old["ranks"] if list(old) == ["ranks"] else old
        warnings.warn(
            f"extract({', '.join(f'{k}=...' for k in old)}) is deprecated and goes in the "
            f"next release; pass rank={new!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        return old
    if rank is None:
        return {}
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(RULE_KEYS))
        if unknown or not all(isinstance(key, str) for key in rank):
            raise ValueError(f"rank's keys must be among {list(RULE_KEYS)}, got {sorted(rank)}")
        return dict(rank)
    return {"rank": rank}


def _rules(
    rank: object = None,
    ranks: object = None,
    energy: object = None,
    budget_like_lora: object = None,
    fixed_kernel_rank: object = None,
) -> _Rules:
    """The checked rule; ``rank`` is a template given as ``rank=`` itself, ``ranks`` in a dict."""
    if rank is not None:
        ranks = check_template(rank, "rank")
    rules = {"ranks": ranks, "energy": energy, "budget_like_lora": budget_like_lora}
    given = [name for name, value in rules.items() if value is not None]
    if len(given) > 1:
        raise ExtractionError(f"give at most one of {list(rules)}, got {given}")
    template = None if ranks is None else check_template(ranks, "ranks")
    fraction = None if energy is None else check_fraction(energy, "energy")
    lora_rank = _DEFAULT_LORA_RANK
    if budget_like_lora is not None:
        lora_rank = check_positive_int(budget_like_lora, "budget_like_lora")
    kernel_rank = None
    if fixed_kernel_rank is not None:
        kernel_rank = check_positive_int(fixed_kernel_rank, "fixed_kernel_rank")
        if isinstance(template, tuple):
            raise ExtractionError(
                f"fixed_kernel_rank={kernel_rank} conflicts with per-mode ranks {template}, "
                "which already give the kernel modes' ranks; give one rank or drop "
                "fixed_kernel_rank"
            )
    return _Rules(template, fraction, lora_rank, kernel_rank)


def _pattern(value: object, name: str) -> str | re.Pattern[str] | None:
    if value is None or isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a regular expression (str or re.Pattern), got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"{name} is not a valid regular expression {value!r}: {exc}") from None


def _flora_kind(name: str, shape: tuple[int, ...], as_parameters: bool) -> str:
    kind = tensor_kind(name, shape)
    if as_parameters or kind == "other" or not name.endswith(".weight"):
        return "Parameter"
    if kind == "conv":
        return f"Conv{len(shape) - 2}d"
    return {"linear": "Linear", "embedding": "Embedding"}[kind]


def _layer_name(name: str, kind: str) -> str:
    return name if kind == "Parameter" else name.removesuffix(".weight")


def _model_layers(model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """Tensor name to (adapter layer name, kind) for every weight a registered kind adapts.

    A module of a registered kind adapts its ``weight`` (the layer is named
    by the module); a kind that adapts named parameters
    (``MultiheadAttention``) names each layer by its parameter. The kinds
    are the registry's, as :func:`flora.inject` finds them.
    """
    layers: dict[str, tuple[str, str]] = {}
    for module_name, module in model.named_modules():
        kind = kind_of_module(module)
        if kind is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        if kind.parameters is not None:
            for parameter in kind.parameters(module):
                layers[prefix + parameter] = (prefix + parameter, kind.saved_kind)
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            layers[f"{prefix}weight"] = (module_name, kind.saved_kind)
    return layers


def _model_plan(model: torch.nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each tensor's (layer, kind) from ``model``'s modules; other tensors are Parameters."""
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    missing = [name for name in names if name not in known]
    if missing:
        raise ExtractionError(
            f"model has no parameter or buffer {missing[0]!r} ({len(missing)} checkpoint "
            f"tensors are not the model's, e.g. {missing[:3]}); pass the model whose "
            "state_dict the checkpoints hold (the same names), or select tensors with "
            "include/exclude"
        )
    layers = _model_layers(model)
    return {name: layers.get(name, (name, "Parameter")) for name in names}


def _plan(
    checkpoint: Checkpoint,
    names: Sequence[str],
    rules: _Rules,
    as_parameters: bool,
    model: torch.nn.Module | None,
) -> dict[str, tuple[str, str]]:
    """Tensor name to (layer name, kind), checked before any decomposition runs."""
    plan: dict[str, tuple[str, str]] = {}
    owners: dict[str, str] = {}
    by_model = _model_plan(model, names) if model is not None else {}
    for name in names:
        shape = checkpoint.info(name).shape
        if model is None:
            kind = _flora_kind(name, shape, as_parameters)
            layer = _layer_name(name, kind)
        else:
            layer, kind = by_model[name]
        if layer in owners:
            raise ExtractionError(
                f"tensors {owners[layer]!r} and {name!r} would both be adapter layer "
                f"{layer!r}; no model has both (exclude one, or name every layer by its tensor "
                "with as_parameters=True, --as-parameters)"
            )
        if isinstance(rules.ranks, tuple) and len(rules.ranks) != len(shape):
            raise ExtractionError(
                f"ranks {rules.ranks} give {len(rules.ranks)} modes but tensor {name!r} has "
                f"{len(shape)} (shape {shape}); give one rank, or select tensors of "
                f"{len(rules.ranks)} modes with include/exclude"
            )
        owners[layer] = name
        plan[name] = (layer, kind)
    return plan


def _check_model(model: object, as_parameters: bool) -> None:
    if model is None:
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if as_parameters:
        raise ExtractionError(
            "give model or as_parameters, not both: with model each layer's kind is its "
            "module's, with as_parameters every layer is a Parameter"
        )


def _open(stack: ExitStack, checkpoint: object, name: str) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"{name} must be a path or a Checkpoint, got {type(checkpoint).__name__}")
    return stack.enter_context(open_checkpoint(checkpoint))


def _unusable(delta: np.ndarray) -> str | None:
    if not np.all(np.isfinite(delta)):
        return "dW has NaN or infinite entries"
    if not np.any(delta):
        return "unchanged (dW = 0)"
    return None


def _output(directory: object) -> Path:
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    path = Path(directory)
    try:
        check_target(path, (CONFIG_NAME, WEIGHTS_NAME))
    except (FileExistsError, ValueError) as exc:
        raise ExtractionError(str(exc)) from None
    return path


def _check_inputs(target: Path, base: list[object], tuned: list[object]) -> None:
    """Refuse an output directory that is, or holds, a file of either checkpoint."""
    try:
        check_not_input(target, base, "base checkpoint")
        check_not_input(target, tuned, "tuned checkpoint")
    except ValueError as exc:
        raise ExtractionError(str(exc)) from None


def extract(
    base: Checkpoint | str | os.PathLike[str],
    tuned: Checkpoint | str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    rank: RankRule | None = None,
    include: str | re.Pattern[str] | None = None,
    exclude: str | re.Pattern[str] | None = None,
    refine: bool = False,
    as_parameters: bool = False,
    model: torch.nn.Module | None = None,
    carry_1d: bool = False,
    progress: Callable[[Sequence[str]], Iterable[str]] | None = None,
    **deprecated: Any,
) -> Extraction:
    r"""Extract a FLoRA adapter from a base checkpoint and its full fine-tune.

    Each weight of at least two dimensions that changed,
    :math:`\Delta W = \text{tuned} - \text{base}`, is replaced by a truncated Tucker tensor
    (ST-HOSVD, optionally refined by HOOI) and written as an adapter directory that
    :func:`flora.load_adapter` accepts for the model with the base weights.

    Parameters
    ----------
    base, tuned : Checkpoint or path-like
        The checkpoints before and after fine-tuning (anything
        :func:`tuckerlib.io.open_checkpoint` reads).
    directory : path-like
        The adapter directory to write (created if missing; an existing one
        must be empty or hold an adapter, which is replaced).
    rank : int, sequence of int, dict or None, optional
        How each layer's ranks are chosen, one rule:

        * an int or a sequence: a rank template for every layer, as in
          :class:`flora.FLoRAConfig`: an int for every mode, or one rank
          per mode (``None`` keeps the mode full; every selected tensor
          must then have that many modes), clipped to each mode's size;
        * ``{"energy": e}``: per layer and mode, the smallest rank that
          keeps this fraction (in ``(0, 1]``) of the energy of ΔW's
          unfolding (:func:`tuckerlib.energy_ranks`);
        * ``{"budget_like_lora": R}``: per layer, the ranks that keep the
          most energy within the parameter count of a rank-``R`` LoRA of
          the ``(out, rest)`` reshape, as ``tuckerlib analyze`` recommends
          (:func:`tuckerlib.analysis.lora_budget_ranks`);
        * ``{"ranks": template}``: the template, as a dict entry.

        A dict may add ``"fixed_kernel_rank": K``: the kernel modes (2 and
        up) of convolutions get rank ``K`` (clipped to the kernel size)
        whichever rule sets the others: with the budget rule the budget
        then goes to the channel modes; with ``{"ranks": R}`` a convolution
        gets ``(R, R, K, ..., K)``. It conflicts with per-mode ranks, which
        give the kernel ranks themselves. Default (``None`` or a dict with
        only ``fixed_kernel_rank``): the budget rule with ``R = 8``.
    include, exclude : str or re.Pattern, optional
        Regular expressions (``re.search``) selecting tensor names.
    refine : bool, optional
        Refine each ST-HOSVD with HOOI (:func:`tuckerlib.hooi`).
    as_parameters : bool, optional
        Record every layer as kind ``"Parameter"`` (adapted through
        :class:`flora.TuckerParametrization`) instead of guessing the module
        type from the name and shape. Not with ``model``.
    model : torch.nn.Module, optional
        The base model (its structure: the weights are not read, so a model
        on the ``meta`` device will do), whose ``state_dict`` names the
        checkpoints' tensors. Each layer's kind is then its module's
        registered kind (:func:`flora.register_layer_kind`), as
        :func:`flora.inject` finds it, instead of a guess from names and
        shapes: transformers' ``Conv1D`` (its update in the ``(out, in)``
        map, the transpose of the stored weight),
        ``torch.nn.MultiheadAttention`` (a layer per projection weight,
        ``in_proj_weight`` or ``q/k/v_proj_weight``, and
        ``out_proj.weight``), user kinds. Tensors of 2 or more dimensions
        of modules no kind adapts are adapted as kind ``"Parameter"``.
    carry_1d : bool, optional
        Carry the fine-tune's 1-D tensors into the adapter too: the bias of
        each adapted Linear/ConvNd layer as the adapter's bias update :math:`\Delta b`
        (``bias`` of :class:`flora.LayerSpec`), and each changed module made only of
        1-D tensors and scalars (a norm layer, with its running statistics)
        saved whole (``modules_to_save``). Other changed 1-D tensors are
        listed as skipped.
    progress : callable, optional
        Wraps the list of tensor names into the iterable that is looped
        over (e.g. ``tqdm.tqdm``).
    **deprecated
        ``ranks``, ``energy``, ``budget_like_lora`` and
        ``fixed_kernel_rank``, the keywords of earlier releases, still work
        for this release with a :class:`DeprecationWarning` that names the
        ``rank=`` form to use instead.

    Returns
    -------
    Extraction
        The directory, each layer's ranks and relative error, the skipped
        tensors with their reasons, and the carried ones.

    Raises
    ------
    ExtractionError
        A ``ValueError`` for input that cannot make an adapter: more than
        one rank rule (or ``rank`` with a deprecated rank keyword),
        ``model`` with ``as_parameters``, a selected tensor that is no
        parameter or buffer of ``model``, per-mode
        ranks with ``fixed_kernel_rank`` or with
        tensors of another number of modes, two tensors that would be the
        same layer (``blk.proj`` and ``blk.proj.weight``), no tensor to
        extract, or a ``directory`` that is a file, holds other files, or
        is or holds a file of either checkpoint (compared resolved and by
        inode: symlinks and hard links count).
        Nothing is written then; all but the last but one are found before
        any decomposition runs.
    tuckerlib.io.CheckpointError
        If a checkpoint cannot be read.
    TypeError
        If an argument has the wrong type (``rank={"energy": "0.9"}``,
        ``progress=42``, ``rank={"budget_like_lora": True}``), or is an
        unknown keyword.
    ValueError
        If an argument's value is invalid (a rank below 1, an energy outside
        ``(0, 1]``, a ``rank`` dict key other than ``"ranks"``, ``"energy"``,
        ``"budget_like_lora"`` and ``"fixed_kernel_rank"``, an invalid
        regular expression).
    OSError
        If writing the adapter fails (the error names the file).

    See Also
    --------
    flora.load_adapter : Loads the directory into the base model.
    tuckerlib.sthosvd, tuckerlib.hooi

    Notes
    -----
    Without ``model``, module kinds are inferred from the checkpoint
    alone: a 2-D ``*.weight`` is a ``Linear`` (an ``Embedding`` if its name
    mentions one), a 3/4/5-D ``*.weight`` a ``Conv1d``/``Conv2d``/``Conv3d``;
    anything else is a ``Parameter``. A GPT-2 ``Conv1D`` or a
    ``MultiheadAttention`` needs ``model`` (or ``as_parameters``): its
    weights read as Linear ones. Without ``carry_1d``, changes to 1-D
    tensors (biases, norms) are not part of the adapter and are listed as
    skipped. The
    adapter's scale is 1 and its tensors are float32 (bias updates of a
    float64 checkpoint float64); at full ranks it reproduces ΔW to float32
    rounding. A saved module holds the tuned tensors exactly. A carried bias
    update is :math:`\text{tuned} - \text{base}` in float32: merging it gives the tuned bias
    bit for bit wherever that difference is a float32 number (always for
    float16 and bfloat16 checkpoints, and for a float32 bias that kept its
    sign and at most doubled or halved), else to one float32 rounding.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> import flora
    >>> tmp = Path(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> w0 = rng.standard_normal((6, 5)).astype(np.float32)
    >>> step = np.outer(rng.standard_normal(6), rng.standard_normal(5)).astype(np.float32)
    >>> save_file({"fc.weight": w0}, tmp / "base.safetensors")
    >>> save_file({"fc.weight": w0 + step}, tmp / "tuned.safetensors")
    >>> result = flora.extract(tmp / "base.safetensors", tmp / "tuned.safetensors",
    ...                        tmp / "adapter", rank=1)
    >>> layer = result.layers[0]
    >>> layer.name, layer.kind, layer.ranks, layer.relative_error < 1e-6
    ('fc', 'Linear', (1, 1), True)
    >>> result = flora.extract(tmp / "base.safetensors", tmp / "tuned.safetensors",
    ...                        tmp / "adapter", rank={"energy": 0.99})
    >>> result.layers[0].ranks
    (1, 1)
    """
    rules = _rules(**_rank_rule(rank, deprecated))
    include, exclude = _pattern(include, "include"), _pattern(exclude, "exclude")
    decompose = hooi if check_flag(refine, "refine") else sthosvd
    check_flag(as_parameters, "as_parameters")
    check_flag(carry_1d, "carry_1d")
    _check_model(model, as_parameters)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable such as tqdm.tqdm, got {progress!r}")
    target = _output(directory)
    with ExitStack() as stack:
        base_ckpt, tuned_ckpt = _open(stack, base, "base"), _open(stack, tuned, "tuned")
        _check_inputs(target, [base, *base_ckpt.files], [tuned, *tuned_ckpt.files])
        pairing = pair_checkpoints(base_ckpt, tuned_ckpt, include=include, exclude=exclude)
        plan = _plan(tuned_ckpt, pairing.names, rules, as_parameters, model)
        layers, tensors, skipped = _decompose(
            base_ckpt, tuned_ckpt, plan, rules, decompose, progress or list
        )
        if not layers:
            raise ExtractionError("nothing to extract: no changed tensor of 2 or more dimensions")
        skipped += pairing.skipped
        carried = Carried()
        if carry_1d:
            kinds = {layer.name: layer.kind for layer in layers}
            carried = carry(base_ckpt, tuned_ckpt, kinds, [name for name, _ in pairing.skipped])
    handled = {name for name, _ in carried.carried + carried.skipped}
    skipped = [(n, r) for n, r in skipped if n not in handled] + carried.skipped
    return _write(target, layers, tensors, skipped, carried)


def _decompose(
    base: Checkpoint,
    tuned: Checkpoint,
    plan: dict[str, tuple[str, str]],
    rules: _Rules,
    decompose: Callable[..., TuckerTensor],
    progress: Callable[[Sequence[str]], Iterable[str]],
) -> tuple[list[ExtractedLayer], dict[str, torch.Tensor], list[tuple[str, str]]]:
    layers, tensors, skipped = [], {}, []
    for name in progress(list(plan)):
        delta = read_delta(base, tuned, name)
        reason = _unusable(delta)
        if reason is not None:
            skipped.append((name, reason))
            continue
        layer_name, kind = plan[name]
        if kind != "Parameter" and kind_rule(kind).transposed:
            delta = np.ascontiguousarray(delta.T)  # stored (in, out); ΔW is the (out, in) map
        tucker = decompose(delta, rules.ranks_for(name, delta, kind))
        layer, layer_tensors = _extract_layer(name, layer_name, kind, delta, tucker)
        layers.append(layer)
        tensors.update(layer_tensors)
    return layers, tensors, skipped


def _write(
    directory: Path,
    layers: list[ExtractedLayer],
    tensors: dict[str, torch.Tensor],
    skipped: list[tuple[str, str]],
    carried: Carried,
) -> Extraction:
    specs = {
        layer.name: LayerSpec(
            layer.kind, layer.shape, layer.ranks, bias=layer.name in carried.biases
        )
        for layer in layers
    }
    for layer, delta in carried.biases.items():
        tensors[bias_key(layer)] = delta
    for module, state in carried.modules.items():
        tensors.update({saved_key(module, key): t for key, t in state.items()})
    modules = list(carried.modules)
    config = FLoRAConfig.for_layers(specs)
    if modules:
        config = dataclasses.replace(config, modules_to_save=modules)
    path = write_adapter(directory, config, specs, tensors, modules_to_save=modules)
    states = [*carried.biases.values(), *(t for s in carried.modules.values() for t in s.values())]
    values = sum(t.numel() for t in states)
    return Extraction(path, layers, skipped, config, carried.carried, values)


def _extract_layer(
    name: str, layer_name: str, kind: str, delta: np.ndarray, tucker: TuckerTensor
) -> tuple[ExtractedLayer, dict[str, torch.Tensor]]:
    shape = tuple(int(d) for d in delta.shape)
    error = relative_error(delta, tucker)
    layer = ExtractedLayer(layer_name, name, kind, shape, tucker.rank, tucker.n_params, error)
    tensors = {core_key(layer_name): torch.from_numpy(np.asarray(tucker.core, np.float32))}
    for n, factor in enumerate(tucker.factors):
        tensors[factor_key(layer_name, n)] = torch.from_numpy(np.asarray(factor, np.float32))
    return layer, tensors
