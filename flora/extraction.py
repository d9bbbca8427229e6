"""Turn a full fine-tune into a FLoRA adapter: a truncated Tucker tensor of each ΔW."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flora.config import FLoRAConfig
from flora.io import write_adapter
from flora.spec import LayerSpec, usable_ranks
from tuckerlib import (
    TuckerTensor,
    energy_ranks,
    hooi,
    mode_spectra,
    relative_error,
    resolve_rank,
    sthosvd,
)
from tuckerlib.analysis import lora_budget_ranks, tensor_kind
from tuckerlib.io import Checkpoint, open_checkpoint, pair_checkpoints, read_delta

__all__ = ["ExtractedLayer", "Extraction", "extract"]

_DEFAULT_LORA_RANK = 8


@dataclass(frozen=True)
class ExtractedLayer:
    """One adapted weight of an extracted adapter.

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
        The weight's shape.
    ranks : tuple of int
        The Tucker ranks of the adapter.
    n_params : int
        Adapter parameters: core plus factors.
    relative_error : float
        ``‖ΔW − ΔŴ‖ / ‖ΔW‖`` of the adapter's update against the fine-tune's.
    """

    #: The adapter layer's name (module name, or parameter name for ``Parameter``).
    name: str
    #: The checkpoint tensor it adapts.
    tensor: str
    #: The flora layer kind.
    kind: str
    #: The weight's shape.
    shape: tuple[int, ...]
    #: The Tucker ranks of the adapter.
    ranks: tuple[int, ...]
    #: Adapter parameters: core plus factors.
    n_params: int
    #: ``‖ΔW − ΔŴ‖ / ‖ΔW‖``.
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
        biases and norms, unchanged or mismatched tensors, ...).
    config : FLoRAConfig
        The config recorded in the directory: injecting it into the base
        model recreates the adapter's structure.
    """

    #: The adapter directory.
    directory: Path
    #: The adapted weights, in checkpoint order.
    layers: list[ExtractedLayer]
    #: ``(name, reason)`` of each tensor not in the adapter.
    skipped: list[tuple[str, str]]
    #: The config recorded in the directory.
    config: FLoRAConfig


def _flora_kind(name: str, shape: tuple[int, ...], as_parameters: bool) -> str:
    kind = tensor_kind(name, shape)
    if as_parameters or kind == "other" or not name.endswith(".weight"):
        return "Parameter"
    if kind == "conv":
        return f"Conv{len(shape) - 2}d"
    return {"linear": "Linear", "embedding": "Embedding"}[kind]


def _rank_rule(
    ranks: int | Sequence[int] | None,
    energy: float | None,
    budget_like_lora: int | None,
    fixed_kernel_rank: int | None,
) -> Callable[[str, np.ndarray], tuple[int, ...]]:
    given = [v is not None for v in (ranks, energy, budget_like_lora)]
    if sum(given) > 1:
        raise ValueError("give at most one of ranks, energy and budget_like_lora")
    rule = _base_rule(ranks, energy, budget_like_lora, fixed_kernel_rank)
    # A rank above what the Tucker tensor can use adds parameters, not accuracy.
    return lambda name, delta: usable_ranks(rule(name, delta), delta.shape)


def _base_rule(
    ranks: int | Sequence[int] | None,
    energy: float | None,
    budget_like_lora: int | None,
    fixed_kernel_rank: int | None,
) -> Callable[[str, np.ndarray], tuple[int, ...]]:
    if ranks is not None:

        def by_ranks(name: str, delta: np.ndarray) -> tuple[int, ...]:
            return resolve_rank(ranks, delta.shape, f"ranks for {name!r}")

        return by_ranks
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy}")
        return lambda name, delta: energy_ranks(delta, energy)
    lora_rank = _DEFAULT_LORA_RANK if budget_like_lora is None else budget_like_lora
    if lora_rank < 1:
        raise ValueError(f"budget_like_lora must be >= 1, got {lora_rank}")

    def by_budget(name: str, delta: np.ndarray) -> tuple[int, ...]:
        spectra = [np.asarray(s) for s in mode_spectra(delta)]
        kind = tensor_kind(name, delta.shape)
        return lora_budget_ranks(spectra, kind, lora_rank, kernel_rank=fixed_kernel_rank)[0]

    return by_budget


def _open(stack: ExitStack, checkpoint: Checkpoint | str | os.PathLike[str]) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return stack.enter_context(open_checkpoint(checkpoint))


def _unusable(delta: np.ndarray) -> str | None:
    if not np.all(np.isfinite(delta)):
        return "dW has NaN or infinite entries"
    if not np.any(delta):
        return "unchanged (dW = 0)"
    return None


def extract(
    base: Checkpoint | str | os.PathLike[str],
    tuned: Checkpoint | str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    ranks: int | Sequence[int] | None = None,
    energy: float | None = None,
    budget_like_lora: int | None = None,
    fixed_kernel_rank: int | None = None,
    include: str | re.Pattern[str] | None = None,
    exclude: str | re.Pattern[str] | None = None,
    refine: bool = False,
    as_parameters: bool = False,
    progress: Callable[[Sequence[str]], Iterable[str]] | None = None,
) -> Extraction:
    """Extract a FLoRA adapter from a base checkpoint and its full fine-tune.

    Each weight of at least two dimensions that changed,
    ``ΔW = tuned − base``, is replaced by a truncated Tucker tensor (ST-HOSVD,
    optionally refined by HOOI) and written as an adapter directory that
    :func:`flora.load_adapter` accepts for the model with the base weights.

    Parameters
    ----------
    base, tuned : Checkpoint or path-like
        The checkpoints before and after fine-tuning (anything
        :func:`tuckerlib.io.open_checkpoint` reads).
    directory : path-like
        The adapter directory to write (created if missing).
    ranks : int or sequence of int, optional
        Ranks for every layer: an int for every mode (clipped to each mode's
        size), or one rank per mode (every selected tensor must then have
        that many modes). Whatever the rule, ranks are then clipped to the
        usable ones (:func:`flora.spec.usable_ranks`).
    energy : float, optional
        Per layer and mode, the smallest rank that keeps this fraction of
        the energy of ΔW's unfolding (:func:`tuckerlib.energy_ranks`).
    budget_like_lora : int, optional
        Per layer, the ranks that keep the most energy within the parameter
        count of a rank-``R`` LoRA of the ``(out, rest)`` reshape, as
        ``tuckerlib analyze`` recommends. The default rule, with ``R = 8``,
        when none of the three is given.
    fixed_kernel_rank : int, optional
        With the budget rule, pin the kernel modes of convolutions to this
        rank.
    include, exclude : str or re.Pattern, optional
        Regular expressions (``re.search``) selecting tensor names.
    refine : bool, optional
        Refine each ST-HOSVD with HOOI (:func:`tuckerlib.hooi`).
    as_parameters : bool, optional
        Record every layer as kind ``"Parameter"`` (adapted through
        :class:`flora.TuckerParametrization`) instead of guessing the module
        type from the name and shape; use it when the model's modules are
        not exactly ``torch.nn.Linear``/``ConvNd``/``Embedding``.
    progress : callable, optional
        Wraps the list of tensor names into the iterable that is looped
        over (e.g. ``tqdm.tqdm``).

    Returns
    -------
    Extraction
        The directory, each layer's ranks and relative error, and the
        skipped tensors with their reasons.

    Raises
    ------
    ValueError
        If more than one rank rule is given, a rule's value is invalid or
        does not fit a tensor, or no tensor could be extracted.
    tuckerlib.io.CheckpointError
        If a checkpoint cannot be read.

    See Also
    --------
    flora.load_adapter : Loads the directory into the base model.
    tuckerlib.sthosvd, tuckerlib.hooi

    Notes
    -----
    Module kinds are inferred from the checkpoint alone: a 2-D ``*.weight``
    is a ``Linear`` (an ``Embedding`` if its name mentions one), a 3/4/5-D
    ``*.weight`` a ``Conv1d``/``Conv2d``/``Conv3d``; anything else is a
    ``Parameter``. Changes to 1-D tensors (biases, norms) are not part of a
    FLoRA adapter and are listed as skipped. The adapter's scale is 1 and
    its tensors are float32; at full ranks it reproduces ΔW to float32
    rounding.

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
    ...                        tmp / "adapter", ranks=1)
    >>> layer = result.layers[0]
    >>> layer.name, layer.kind, layer.ranks, layer.relative_error < 1e-6
    ('fc', 'Linear', (1, 1), True)
    """
    rule = _rank_rule(ranks, energy, budget_like_lora, fixed_kernel_rank)
    decompose = hooi if refine else sthosvd
    layers: list[ExtractedLayer] = []
    tensors: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        base_ckpt, tuned_ckpt = _open(stack, base), _open(stack, tuned)
        pairing = pair_checkpoints(base_ckpt, tuned_ckpt, include=include, exclude=exclude)
        skipped = list(pairing.skipped)
        for name in (progress or list)(pairing.names):
            delta = read_delta(base_ckpt, tuned_ckpt, name)
            reason = _unusable(delta)
            if reason is not None:
                skipped.append((name, reason))
                continue
            kind = _flora_kind(name, delta.shape, as_parameters)
            layer, layer_tensors = _extract_layer(
                name, kind, delta, decompose(delta, rule(name, delta))
            )
            layers.append(layer)
            tensors.update(layer_tensors)
    if not layers:
        raise ValueError("nothing to extract: no changed tensor of 2 or more dimensions")
    specs = {layer.name: LayerSpec(layer.kind, layer.shape, layer.ranks) for layer in layers}
    config = FLoRAConfig.for_layers(specs)
    return Extraction(write_adapter(directory, config, specs, tensors), layers, skipped, config)


def _extract_layer(
    name: str, kind: str, delta: np.ndarray, tucker: TuckerTensor
) -> tuple[ExtractedLayer, dict[str, torch.Tensor]]:
    layer_name = name if kind == "Parameter" else name.removesuffix(".weight")
    shape = tuple(int(d) for d in delta.shape)
    error = relative_error(delta, tucker)
    layer = ExtractedLayer(layer_name, name, kind, shape, tucker.rank, tucker.n_params, error)
    tensors = {f"{layer_name}.core": torch.from_numpy(np.asarray(tucker.core, np.float32))}
    for n, factor in enumerate(tucker.factors):
        tensors[f"{layer_name}.factors.{n}"] = torch.from_numpy(np.asarray(factor, np.float32))
    return layer, tensors
