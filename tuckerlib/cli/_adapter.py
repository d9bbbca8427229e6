r"""``tuckerlib analyze --adapter``: the rank structure of an adapter's updates, from its factors.

An adapter stores each update as :math:`\Delta W = C \times_0 F_0 \dots \times_{N-1} F_{N-1}` with
a small core. With :math:`F_n = Q_n R_n` (``Q_n`` with orthonormal columns, as
in a QR factorization) and the core :math:`C' = C \times_n R_n`, :math:`\Delta W = C' \times_n Q_n`:
the unfoldings of :math:`\Delta W` are those of ``C'`` times matrices with orthonormal
columns, so :math:`\Delta W` has ``C'``'s norm and mode spectra (padded with zeros to
``I_n``), and a Tucker or low-rank approximation of :math:`\Delta W` has the error of
the same approximation of ``C'``. Every number of the report comes from
``C'`` exactly, without forming :math:`\Delta W`. Only ``R_n`` is needed: any matrix
with :math:`F_n^\top F_n = R_n^\top R_n` serves, here :math:`\Lambda^½ V^\top` from the
eigendecomposition of the small Gram matrix :math:`F_n^\top F_n = V \Lambda V^\top` (in
float64), or ``F_n`` itself when it is no taller than wide.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuckerlib import (
    effective_rank,
    energy_ranks,
    mode_product,
    relative_error,
    sthosvd,
    tucker_params,
    tucker_to_tensor,
    unfold,
)
from tuckerlib.analysis import lora_budget_ranks, tensor_kind
from tuckerlib.cli._report import AnalyzeOptions, Report, TensorReport
from tuckerlib.cli.common import UsageError
from tuckerlib.decompositions._truncation import default_order
from tuckerlib.io import Adapter, AdapterLayer
from tuckerlib.io.layer_kinds import known_tensor_class

__all__ = [
    "ADAPTER_JSON_VERSION",
    "AdapterReport",
    "AdapterTensorReport",
    "analyze_layer",
    "select_layers",
    "small_core",
]

ADAPTER_JSON_VERSION = 2


@dataclass(frozen=True)
class AdapterTensorReport(TensorReport):
    """One update of an adapter: the pair report's numbers plus the adapter's own."""

    adapter_ranks: list[int]
    adapter_params: int
    exact_ranks: list[int]
    exact_params: int
    #: Whether the layer also carries a bias update (not part of dW, not analysed).
    bias_update: bool = False

    def to_json(self) -> dict[str, Any]:
        """The tensor's entry of the version-2 JSON schema."""
        return {
            **super().to_json(),
            "adapter_ranks": self.adapter_ranks,
            "adapter_params": self.adapter_params,
            "exact_ranks": self.exact_ranks,
            "exact_params": self.exact_params,
            "bias_update": self.bias_update,
        }


@dataclass
class AdapterReport(Report):
    """``analyze --adapter``: ``base`` and ``tuned`` both hold the adapter directory."""

    adapter_format: str = "flora"

    def heading(self) -> tuple[str, list[tuple[str, str]]]:
        """The adapter's updates, from one directory."""
        label = "flora adapter" if self.adapter_format == "flora" else "LoRA adapter"
        return "the adapter's updates dW", [(label, self.base)]

    def notes(self) -> tuple[str, ...]:
        """What dW is for an adapter, and the adapter columns."""
        notes = (
            "dW: the update the adapter adds to each weight (a flora init='hosvd' adapter: its "
            "change to the pretrained weight), analysed from its factors without forming it; "
            "rel. dW needs the base weights (n/a).",
            "adapter: the ranks the adapter stores (LoRA: r) and its parameters; exact: the "
            "multilinear rank of dW, the smallest Tucker ranks that hold it exactly, and their "
            "parameters (fewer than the adapter's: the same update fits in fewer parameters).",
        )
        if any(getattr(t, "bias_update", False) for t in self.tensors):
            notes += (
                "+b: the layer also carries a bias update (flora bias, PEFT lora_bias), added "
                "to its bias; it is not part of dW: not analysed, not in adapter params.",
            )
        return notes

    def extra_columns(self) -> list[tuple[str, Callable[[TensorReport], str]]]:
        """Adapter ranks and parameters, exact ranks and parameters."""

        def ints(values: list[int]) -> str:
            return ",".join(str(v) for v in values)

        def ranks(t: TensorReport) -> str:
            text = ints(getattr(t, "adapter_ranks", []))
            return text + "+b" if getattr(t, "bias_update", False) else text

        return [
            ("adapter ranks", ranks),
            ("adapter params", lambda t: str(getattr(t, "adapter_params", ""))),
            ("exact ranks", lambda t: ints(getattr(t, "exact_ranks", []))),
            ("exact params", lambda t: str(getattr(t, "exact_params", ""))),
        ]

    def to_json(self) -> dict[str, Any]:
        """The version-2 JSON object: version 1's keys, base and tuned null, plus the adapter."""
        return {
            "version": ADAPTER_JSON_VERSION,
            "base": None,
            "tuned": None,
            "adapter": self.base,
            "adapter_format": self.adapter_format,
            "tensors": [t.to_json() for t in self.tensors],
            "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
        }


def _root(factor: np.ndarray) -> np.ndarray:
    r"""``R`` with ``FᵀF = RᵀR``, at most ``min(I, K)`` rows: ``F = Q R``, ``Q`` orthonormal."""
    factor = np.asarray(factor, dtype=np.float64)
    rows, cols = factor.shape
    if rows <= cols:
        return factor  # Q is the identity
    # The Gram square root Λ^½ Vᵀ: one matrix product on the thin factor,
    # where Householder QR runs memory-bound, column by column.
    values, vectors = np.linalg.eigh(factor.T @ factor)
    return np.sqrt(np.clip(values, 0.0, None))[:, None] * vectors.T


def small_core(layer: AdapterLayer) -> np.ndarray:
    r"""``C'`` in float64: :math:`\Delta W = C' \times_n Q_n`, ``Q_n`` orthonormal."""
    core = np.asarray(layer.core, dtype=np.float64) * layer.scale
    for n, factor in enumerate(layer.factors):
        if factor is not None:
            core = mode_product(core, _root(factor), n)
    return core


def _spectra(core: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    spectra = []
    for n, size in enumerate(shape):
        s = np.linalg.svd(unfold(core, n), compute_uv=False)
        spectra.append(np.concatenate([s, np.zeros(size - s.size)]))
    return spectra


def _exact_rank(s: np.ndarray, rows: int, cols: int, eps: float) -> int:
    # numpy.linalg.matrix_rank's tolerance for ΔW's unfolding, at the
    # precision the adapter stores (its rounding is all that blurs the rank).
    return int(np.sum(s > s[0] * max(rows, cols) * eps))


def _tail_error(spectrum: np.ndarray, rank: int) -> float:
    energy = spectrum**2
    total = float(np.sum(energy))
    return math.sqrt(min(max(float(np.sum(energy[rank:])) / total, 0.0), 1.0))


def _tucker_error(
    core: np.ndarray, shape: tuple[int, ...], ranks: tuple[int, ...], spectra: list[np.ndarray]
) -> float:
    if len(shape) == 2:
        # The best (R_0, R_1) approximation of a matrix is its rank-min(R) SVD.
        return _tail_error(spectra[0], min(ranks))
    # ST-HOSVD's order on ΔW (largest I_n / R_n first) applied to C' gives ΔW's ST-HOSVD.
    order = default_order(shape, ranks)
    clipped = [min(r, k) for r, k in zip(ranks, core.shape, strict=True)]
    approx = sthosvd(core, clipped, order=order)
    return float(relative_error(core, tucker_to_tensor(approx.core, approx.factors)))


def _kind(layer: AdapterLayer) -> str:
    return known_tensor_class(layer.kind) or tensor_kind(layer.name, layer.shape)


def analyze_layer(layer: AdapterLayer, options: AnalyzeOptions) -> AdapterTensorReport | str:
    """Analyze one adapter update from its factors; a string is why it is skipped."""
    if len(layer.shape) < 2:
        return f"{len(layer.shape)}-D update: no rank structure"
    core = small_core(layer)
    if not np.all(np.isfinite(core)):
        return "dW has NaN or infinite entries"
    if not np.any(core):
        return "unchanged (dW = 0)" + (
            "; its bias update is not analysed" if layer.bias is not None else ""
        )
    shape, kind = layer.shape, _kind(layer)
    spectra = _spectra(core, shape)
    ranks, budget = lora_budget_ranks(
        spectra, kind, options.lora_rank, kernel_rank=options.fixed_kernel_rank
    )
    rows, cols = shape[0], math.prod(shape[1:])
    matrix_rank = min(budget // (rows + cols), rows, cols)
    size, eps = math.prod(shape), float(np.finfo(layer.core.dtype).eps)
    exact = [_exact_rank(s, n, size // n, eps) for s, n in zip(spectra, shape, strict=True)]
    return AdapterTensorReport(
        name=layer.name,
        shape=shape,
        kind=kind,
        delta_norm=math.sqrt(float(np.sum(spectra[0] ** 2))),
        relative_delta=None,
        energy_ranks={key: list(energy_ranks(spectra, e)) for key, e in options.energies},
        effective_ranks=[effective_rank(s) for s in spectra],
        tucker_error=_tucker_error(core, shape, ranks, spectra),
        matrix_error=_tail_error(spectra[0], matrix_rank),
        recommended_ranks=list(ranks),
        budget=budget,
        base_norm=0.0,
        spectra=spectra,
        adapter_ranks=list(layer.stored_ranks),
        adapter_params=layer.stored_params,
        exact_ranks=exact,
        exact_params=tucker_params(shape, exact),
        bias_update=layer.bias is not None,
    )


def _selected(name: str, include: re.Pattern[str] | None, exclude: re.Pattern[str] | None) -> bool:
    return (include is None or include.search(name) is not None) and (
        exclude is None or exclude.search(name) is None
    )


def select_layers(
    adapter: Adapter,
    report: AdapterReport,
    include: re.Pattern[str] | None,
    exclude: re.Pattern[str] | None,
) -> list[str]:
    """The layers to analyze; what the adapter skips (after the filters) goes to ``report``."""
    report.skipped.extend(
        (name, why) for name, why in adapter.skipped if _selected(name, include, exclude)
    )
    names = [name for name in adapter if _selected(name, include, exclude)]
    if not names and not report.skipped:
        raise UsageError(f"no adapted layer of {adapter.path} matches --include/--exclude")
    return names
