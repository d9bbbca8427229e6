"""LoRA-shaped budgets: what a layer's weight is, and FLoRA ranks at a LoRA's size.

These rules are shared by ``tuckerlib analyze`` and ``flora extract``: a
weight is classified by its name and shape, a rank-``r`` LoRA of its
``(out, rest)`` matricization sets the parameter budget, and
:func:`~tuckerlib.ranks_for_budget` picks the Tucker ranks within it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from tuckerlib._ranks import tucker_params
from tuckerlib._validation import as_list, as_shape, check_int
from tuckerlib.analysis._budget import ranks_for_budget

__all__ = ["TENSOR_KINDS", "lora_budget", "lora_budget_ranks", "tensor_kind"]

#: What :func:`tensor_kind` can answer.
TENSOR_KINDS = ("linear", "conv", "embedding", "other")

_EMBEDDING_NAME = re.compile(r"emb|wte|wpe|tok_embeddings|lookup", re.IGNORECASE)


def tensor_kind(name: str, shape: Sequence[int]) -> str:
    """Classify a parameter as ``"linear"``, ``"conv"``, ``"embedding"`` or ``"other"``.

    Layers store their weights as PyTorch does: Linear ``(out, in)``, ConvNd
    ``(out, in/groups, *kernel)``, Embedding ``(num, dim)``. Only tensors
    whose name ends in ``weight`` (or ``kernel``) count as layer weights;
    2-D ones whose name mentions an embedding (``emb``, ``wte``, ``wpe``,
    ``tok_embeddings``, ``lookup``) are embeddings.

    Parameters
    ----------
    name : str
        The parameter's name in its checkpoint or model.
    shape : sequence of int
        Its shape.

    Returns
    -------
    str
        One of :data:`TENSOR_KINDS`.

    Raises
    ------
    TypeError
        If ``name`` is not a string or ``shape`` not a sequence of integers.
    ValueError
        If a size in ``shape`` is negative.

    Examples
    --------
    >>> from tuckerlib.analysis import tensor_kind
    >>> tensor_kind("layers.0.q_proj.weight", (8, 8))
    'linear'
    >>> tensor_kind("features.0.weight", (8, 3, 3, 3)), tensor_kind("wte.weight", (100, 8))
    ('conv', 'embedding')
    >>> tensor_kind("pos_embed", (1, 197, 768))
    'other'
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    shape = as_shape(shape)
    leaf = name.rsplit(".", 1)[-1].lower()
    if not leaf.endswith(("weight", "kernel")):
        return "other"
    if len(shape) == 2:
        return "embedding" if _EMBEDDING_NAME.search(name) else "linear"
    if 3 <= len(shape) <= 5:
        return "conv"
    return "other"


def lora_budget(shape: Sequence[int], lora_rank: int) -> int:
    """Parameters of a rank-``lora_rank`` LoRA of the ``(out, rest)`` matricization.

    Parameters
    ----------
    shape : sequence of int
        The weight's shape ``(out, ...)``, at least two modes.
    lora_rank : int
        The LoRA rank ``r >= 1``; clipped to ``min(out, rest)``, since a
        LoRA pair of higher rank holds the full matrix and more.

    Returns
    -------
    int
        ``r * (out + rest)`` with ``rest = prod(shape[1:])``.

    Raises
    ------
    ValueError
        If ``shape`` has fewer than two modes or a negative size, or
        ``lora_rank < 1``.
    TypeError
        If ``shape`` or ``lora_rank`` is not made of integers.

    Examples
    --------
    >>> from tuckerlib.analysis import lora_budget
    >>> lora_budget((64, 32, 3, 3), 8)  # 8 * (64 + 288)
    2816
    >>> lora_budget((16, 1, 3, 3), 16)  # rank clipped to 9
    225
    """
    lora_rank = check_int(lora_rank, "lora_rank", 1)
    shape = as_shape(shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least two modes (out, ...), got {shape}")
    rows, cols = shape[0], math.prod(shape[1:])
    return min(lora_rank, rows, cols) * (rows + cols)


def _pinned_kernel(kind: str, shape: tuple[int, ...], rank: int | None) -> dict[int, int] | None:
    if rank is None or kind != "conv":
        return None
    return {mode: min(rank, shape[mode]) for mode in range(2, len(shape))}


def lora_budget_ranks(
    spectra: Sequence[Any], kind: str, lora_rank: int, *, kernel_rank: int | None = None
) -> tuple[tuple[int, ...], int]:
    """FLoRA ranks within the budget of a rank-``lora_rank`` LoRA, and that budget.

    Parameters
    ----------
    spectra : sequence of 1-D arrays
        The tensor's mode spectra (:func:`~tuckerlib.mode_spectra`); their
        lengths give its shape.
    kind : str
        The tensor's kind (:func:`tensor_kind`).
    lora_rank : int
        The LoRA rank whose budget (:func:`lora_budget`) the ranks must fit.
    kernel_rank : int, optional
        For ``kind == "conv"``: pin every kernel mode to this rank (clipped
        to the mode's size) and spend the budget on the channel modes.

    Returns
    -------
    ranks : tuple of int
        :func:`~tuckerlib.ranks_for_budget` at ``budget``.
    budget : int
        The LoRA budget, lifted where needed to the cheapest Tucker tensor
        with the pinned ranks (a 1×1 convolution at LoRA rank 1 affords less
        than rank 1 in every mode).

    Raises
    ------
    ValueError
        If ``kind`` is not one of :data:`TENSOR_KINDS`, ``lora_rank`` or
        ``kernel_rank`` is below 1, or the spectra are invalid (as for
        :func:`~tuckerlib.ranks_for_budget`).
    TypeError
        If ``spectra`` is not a sequence of spectra, or a rank is not an
        integer.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib.analysis import lora_budget_ranks
    >>> spectra = [np.array([5.0, 2, 1, 0.5]), np.array([5.0, 2, 1, 0.5, 0.1, 0, 0, 0]),
    ...            np.array([4.0, 1, 0.5]), np.array([4.0, 1, 0.5])]  # a (4, 8, 3, 3) conv
    >>> lora_budget_ranks(spectra, "conv", 2)  # budget 2 * (4 + 72)
    ((3, 3, 3, 3), 152)
    >>> lora_budget_ranks(spectra, "conv", 2, kernel_rank=1)  # R_1 <= R_0 · 1 · 1
    ((4, 4, 1, 1), 152)
    """
    spectra = as_list(spectra, "spectra", "a sequence of 1-D spectra, one per mode")
    if kind not in TENSOR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TENSOR_KINDS)}, got {kind!r}")
    if kernel_rank is not None:
        kernel_rank = check_int(kernel_rank, "kernel_rank", 1)
    shape = tuple(len(s) for s in spectra)
    fixed = _pinned_kernel(kind, shape, kernel_rank)
    pinned = fixed or {}
    floor = tucker_params(shape, [pinned.get(n, 1) for n in range(len(shape))])
    budget = max(lora_budget(shape, lora_rank), floor)
    return ranks_for_budget(spectra, budget, fixed=fixed), budget
