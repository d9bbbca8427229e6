"""Rank analysis: mode spectra, energy and budget ranks, Tucker versus matrix.

The numbers behind "analyze ΔW rank structure": how fast the spectrum of
each unfolding decays, which ranks keep a given energy or fit a parameter
budget, and how a Tucker approximation compares with flattening to a
low-rank matrix at the same size.
"""

from tuckerlib.analysis._budget import ranks_for_budget
from tuckerlib.analysis._compare import tucker_vs_matrix
from tuckerlib.analysis._energy import effective_rank, energy_ranks, stable_rank
from tuckerlib.analysis._lora import TENSOR_KINDS, lora_budget, lora_budget_ranks, tensor_kind
from tuckerlib.analysis._spectra import mode_spectra

__all__ = [
    "TENSOR_KINDS",
    "effective_rank",
    "energy_ranks",
    "lora_budget",
    "lora_budget_ranks",
    "mode_spectra",
    "ranks_for_budget",
    "stable_rank",
    "tensor_kind",
    "tucker_vs_matrix",
]
