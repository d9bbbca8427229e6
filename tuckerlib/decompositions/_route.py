"""The one place that decides whether a decomposition runs in memory or on Dask."""

from __future__ import annotations

from types import ModuleType

from tuckerlib.decompositions._prepare import Prepared

__all__ = ["dask_backend"]


def dask_backend(prepared: Prepared) -> ModuleType | None:
    """The Dask implementations when ``prepared.x`` is a Dask array, else None (run in memory).

    Dask is imported only here and only for Dask input, so in-memory
    decompositions never import it; :mod:`tuckerlib.decompositions._dask`
    and the in-memory algorithms share their kernels through
    :mod:`tuckerlib.decompositions._kernels` and never import each other.
    """
    if not prepared.lazy:
        return None
    from tuckerlib.decompositions import _dask

    return _dask
