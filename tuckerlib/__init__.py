"""tuckerlib: Tucker decompositions for any array API library.

The array library comes from the inputs (NumPy, PyTorch, CuPy, JAX, Dask,
``array_api_strict``); results stay in that library and on that device.
See the conventions page of the documentation for the unfolding order,
factor shapes and rank rules.
"""

from tuckerlib._metrics import relative_error
from tuckerlib._products import mode_product, multi_mode_product
from tuckerlib._ranks import resolve_rank, tucker_params
from tuckerlib._tucker import TuckerTensor, tucker_to_tensor
from tuckerlib._unfold import fold, unfold
from tuckerlib.analysis import (
    effective_rank,
    energy_ranks,
    mode_spectra,
    ranks_for_budget,
    stable_rank,
    tucker_vs_matrix,
)
from tuckerlib.decompositions import HOOIInfo, hooi, hosvd, rhosvd, sthosvd
from tuckerlib.io import open_checkpoint

__version__ = "0.1.0"

__all__ = [
    "HOOIInfo",
    "TuckerTensor",
    "effective_rank",
    "energy_ranks",
    "fold",
    "hooi",
    "hosvd",
    "mode_product",
    "mode_spectra",
    "multi_mode_product",
    "open_checkpoint",
    "ranks_for_budget",
    "relative_error",
    "resolve_rank",
    "rhosvd",
    "stable_rank",
    "sthosvd",
    "tucker_params",
    "tucker_to_tensor",
    "tucker_vs_matrix",
    "unfold",
]
