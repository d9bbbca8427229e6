"""The rank structure of each ΔW = tuned − base: the numbers ``analyze`` reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuckerlib import (
    effective_rank,
    energy_ranks,
    mode_spectra,
    relative_error,
    sthosvd,
    tucker_vs_matrix,
)
from tuckerlib.analysis import lora_budget_ranks, tensor_kind

__all__ = [
    "JSON_VERSION",
    "AnalyzeOptions",
    "Report",
    "TensorReport",
    "analyze_delta",
]

JSON_VERSION = 1


@dataclass(frozen=True)
class AnalyzeOptions:
    """What to compute for each tensor.

    Attributes
    ----------
    energies : tuple of (str, float)
        Energy fractions, each with the text it was given as (the JSON key).
    lora_rank : int
        The LoRA rank that sets each tensor's parameter budget.
    fixed_kernel_rank : int or None
        If set, the kernel modes of convolutions are pinned to this rank
        (clipped to the kernel size) in the recommended ranks.
    """

    energies: tuple[tuple[str, float], ...] = (("0.9", 0.9), ("0.99", 0.99))
    lora_rank: int = 8
    fixed_kernel_rank: int | None = None


@dataclass(frozen=True)
class TensorReport:
    """The analysis of one ΔW (field names are the JSON keys, plus extras)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    delta_norm: float
    relative_delta: float | None
    energy_ranks: dict[str, list[int]]
    effective_ranks: list[float]
    tucker_error: float
    matrix_error: float
    recommended_ranks: list[int]
    budget: int
    base_norm: float
    spectra: list[np.ndarray] = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The tensor's entry of the version-1 JSON schema."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "kind": self.kind,
            "delta_norm": self.delta_norm,
            "relative_delta": self.relative_delta,
            "energy_ranks": self.energy_ranks,
            "effective_ranks": self.effective_ranks,
            "tucker_error": self.tucker_error,
            "matrix_error": self.matrix_error,
            "recommended_ranks": self.recommended_ranks,
        }


@dataclass
class Report:
    """Everything ``analyze`` found about a pair of checkpoints."""

    base: str
    tuned: str
    options: AnalyzeOptions
    tensors: list[TensorReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    description: str | None = None

    def heading(self) -> tuple[str, list[tuple[str, str]]]:
        """What dW is, for the title, and the labelled inputs it came from."""
        return "dW = tuned - base", [("base", self.base), ("tuned", self.tuned)]

    def notes(self) -> tuple[str, ...]:
        """Legend lines about what dW is (and any extra columns)."""
        return ("dW = tuned - base; rel. dW = ||dW|| / ||W0||.",)

    def extra_columns(self) -> list[tuple[str, Callable[[TensorReport], str]]]:
        """Table columns after the standard ones: (title, cell of a tensor)."""
        return []

    def to_json(self) -> dict[str, Any]:
        """The version-1 JSON object, as documented on the command line reference page."""
        return {
            "version": JSON_VERSION,
            "base": self.base,
            "tuned": self.tuned,
            "tensors": [t.to_json() for t in self.tensors],
            "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
        }


def _tucker_error(
    delta: np.ndarray, ranks: tuple[int, ...], budget: int, comparison: dict[str, Any]
) -> float:
    if tuple(comparison["tucker_ranks"]) == ranks:
        return float(comparison["tucker_error"])
    # Pinned kernel ranks differ from the unconstrained optimum that
    # tucker_vs_matrix searched: report the error at the ranks recommended.
    return relative_error(delta, sthosvd(delta, ranks))


def analyze_delta(
    name: str, delta: np.ndarray, base_norm: float, options: AnalyzeOptions
) -> TensorReport:
    """Analyze one ΔW of at least two dimensions, not all zero and finite."""
    shape = tuple(int(d) for d in delta.shape)
    kind = tensor_kind(name, shape)
    spectra = [np.asarray(s, dtype=np.float64) for s in mode_spectra(delta)]
    ranks, budget = lora_budget_ranks(
        spectra, kind, options.lora_rank, kernel_rank=options.fixed_kernel_rank
    )
    comparison = tucker_vs_matrix(delta, budget, spectra=spectra)
    # Every unfolding holds all entries: one spectrum's energy is ‖ΔW‖².
    delta_norm = math.sqrt(float(np.sum(spectra[0] ** 2)))
    return TensorReport(
        name=name,
        shape=shape,
        kind=kind,
        delta_norm=delta_norm,
        relative_delta=delta_norm / base_norm if base_norm > 0 else None,
        energy_ranks={key: list(energy_ranks(spectra, e)) for key, e in options.energies},
        effective_ranks=[effective_rank(s) for s in spectra],
        tucker_error=_tucker_error(delta, ranks, budget, comparison),
        matrix_error=float(comparison["matrix_error"]),
        recommended_ranks=list(ranks),
        budget=budget,
        base_norm=base_norm,
        spectra=spectra,
    )
