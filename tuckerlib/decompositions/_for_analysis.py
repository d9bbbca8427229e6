"""The internal API of the decompositions that :mod:`tuckerlib.analysis` builds on.

The analysis needs these from here, and only these: a validated tensor
(:func:`prepare_tensor`), the spectrum of every unfolding with the left
singular vectors where they come for free (:func:`unfolding_spectra`,
back in the input's units and library with :func:`in_input_library`), the
error of an ST-HOSVD at given ranks that reuses one of those spectra
(:func:`sthosvd_relative_error`), and the discarded energies of a spectrum
(:func:`tail_energies`). Each works on in-memory arrays of
any library and on Dask arrays (one pass for all the spectra).

Values are in the units of the prepared tensor (``prepared.x``, the input
times ``prepared.scale``), so energies of extreme inputs stay finite;
ratios are the input's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuckerlib._namespace import get_namespace
from tuckerlib.decompositions._factors import FactorStep, fibre_matrix, truncations
from tuckerlib.decompositions._kernels import sthosvd_steps
from tuckerlib.decompositions._linalg import sign_fix
from tuckerlib.decompositions._prepare import Prepared, prepare_tensor
from tuckerlib.decompositions._route import dask_backend
from tuckerlib.decompositions._spectra import matrix_spectrum, pad, tensor_spectrum
from tuckerlib.decompositions._spectra import unfolding_spectrum as _unfolding_spectrum
from tuckerlib.decompositions._truncation import default_order, tail_energies

__all__ = [
    "ModeSpectrum",
    "Prepared",
    "in_input_library",
    "prepare_tensor",
    "sthosvd_relative_error",
    "tail_energies",
    "unfolding_spectra",
]


@dataclass(frozen=True)
class ModeSpectrum:
    """The spectrum of one mode-``n`` unfolding.

    ``values``: singular values, descending, zero-padded to ``I_n``, in the
    library of the computation (the chunks' library for Dask input);
    ``vectors``: all left singular vectors (descending) when they came for
    free, else ``None``.
    """

    values: Any
    vectors: Any = None


def unfolding_spectra(
    prepared: Prepared, method: str = "gram", *, vectors: bool = False
) -> tuple[Prepared, list[ModeSpectrum]]:
    r"""Every mode's :class:`ModeSpectrum` of ``prepared.x``.

    ``method`` is ``"gram"`` or ``"svd"`` (Dask input always takes the
    Gram route). Returns ``prepared`` measured (for Dask input, the pass
    that computed the spectra also measured :math:`\|x\|^2`).
    """
    xp, x = prepared.xp, prepared.x
    dask = dask_backend(prepared)
    if dask is not None:
        prepared, pairs = dask.spectra(prepared, vectors)
        return prepared, [ModeSpectrum(values, v) for values, v in pairs]
    if x.ndim == 2:
        s = matrix_spectrum(xp, x, method)
        return prepared, [ModeSpectrum(pad(xp, s, size)) for size in x.shape]
    if vectors or method == "svd":
        pairs = [
            _unfolding_spectrum(xp, fibre_matrix(xp, x, n), method, vectors=vectors)
            for n in range(x.ndim)
        ]
        return prepared, [ModeSpectrum(values, v) for values, v in pairs]
    return prepared, [ModeSpectrum(tensor_spectrum(xp, x, n)) for n in range(x.ndim)]


def sthosvd_relative_error(
    prepared: Prepared, ranks: Sequence[int], spectra: Sequence[ModeSpectrum] | None = None
) -> float:
    r""":math:`\lVert x - \hat{x} \rVert / \lVert x \rVert` of the ST-HOSVD of ``prepared.x``.

    From the discarded energies ([1]_ of :func:`~tuckerlib.sthosvd`, Thm.
    5.1), so errors below about ``sqrt(eps)`` are at rounding level. The
    first mode's step comes from ``spectra`` when its vectors are there,
    so its eigendecomposition (and, for Dask input, its pass) is not
    repeated; ``0.0`` for an all-zero tensor.
    """
    order = default_order(tuple(prepared.x.shape), ranks)
    first = None
    known = None if spectra is None else spectra[order[0]]
    if known is not None and known.vectors is not None:
        xp = get_namespace(known.vectors)
        first = FactorStep(sign_fix(xp, known.vectors[:, : ranks[order[0]]]), known.values)
    dask = dask_backend(prepared)
    if dask is not None:
        prepared, done = dask.truncated(prepared, order, ranks, None, "auto", first=first)
    else:
        cuts = truncations(prepared, ranks, None)
        done = sthosvd_steps(prepared.xp, prepared.x, order, cuts, "auto", first=first)
    if not prepared.norm2:
        return 0.0
    return math.sqrt(min(max(done.squared_error() / prepared.norm2, 0.0), 1.0))


def in_input_library(prepared: Prepared, values: Any) -> Any:
    """A spectrum of :func:`unfolding_spectra` in the input's units and library."""
    if prepared.scale != 1.0:
        values = values * (1.0 / prepared.scale)
    dask = dask_backend(prepared)
    return values if dask is None else dask.one_chunk(values)
