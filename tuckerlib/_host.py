"""Where values leave their array library: the one home of host transfers.

Everything that turns an array into Python or NumPy numbers on the host (a
rank chosen from a spectrum, a stopping rule, an error) goes through here,
and so does the decision about arrays whose values are not at hand:

* Dask arrays are lazy: their values are computed here, several at once
  (:func:`compute`), so the tensor is read once per pass, never once per
  number.
* Arrays traced by ``jax.jit`` have no values while the function is traced:
  asking for one raises a :class:`TypeError` that says what needed it and
  what to do instead, never JAX's ``ConcretizationTypeError`` from deep
  inside.

No framework is imported here: Dask and JAX are only consulted when an
array of theirs is already at hand (and so already imported).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "compute",
    "host_bool",
    "host_float",
    "is_dask",
    "is_traced",
    "persist",
    "require_values",
    "to_host",
]


def is_dask(x: Any) -> bool:
    """Whether ``x`` is a (lazy) Dask array."""
    return array_api_compat.is_dask_array(x)


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (inside ``jax.jit``, ``jax.vmap``, ...)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def require_values(x: Any, purpose: str) -> None:
    """Raise a clear ``TypeError`` if ``x`` is traced, so ``purpose`` cannot read its values.

    ``purpose`` completes "... needs the values of the tensor", e.g.
    ``"choosing ranks from tol"``.
    """
    if is_traced(x):
        raise TypeError(
            f"{purpose} needs the values of the tensor, which jax.jit does not have while "
            "it traces the function; call it outside jax.jit, or inside with fixed integer "
            "ranks where the function supports that"
        )


def compute(*arrays: Any) -> tuple[Any, ...]:
    """The values of ``arrays`` in their own (chunk) library, Dask ones in one pass.

    Dask arrays are computed together with :func:`dask.compute`, so tasks
    they share (reading a chunk of the tensor) run once; other arrays come
    back as they are.
    """
    lazy = [i for i, a in enumerate(arrays) if is_dask(a)]
    if not lazy:
        return arrays
    import dask

    with _one_blas_thread_per_dask_thread(arrays[lazy[0]]):
        values = dask.compute(*(arrays[i] for i in lazy), optimize_graph=_OPTIMIZE)
    result = list(arrays)
    for i, value in zip(lazy, values, strict=True):
        result[i] = value
    return tuple(result)


# Dask's graph optimization fuses the chunk loader into every task that
# uses the chunk: a Gram matrix (each chunk paired with every chunk of its
# mode-n fibre group) would then read each chunk 2 c_n times from disk, not
# once. Unoptimized graphs keep one loading task per chunk.
_OPTIMIZE = False


def persist(a: Any) -> Any:
    """A Dask array computed into memory (the workers', on a cluster), each chunk read once."""
    import dask

    with _one_blas_thread_per_dask_thread(a):
        (kept,) = dask.persist(a, optimize_graph=_OPTIMIZE)
    return kept


@contextlib.contextmanager
def _one_blas_thread_per_dask_thread(collection: Any) -> Iterator[None]:
    """Limit BLAS to one thread while Dask's local thread pool computes.

    The pool already runs one task per core; a multi-threaded BLAS call in
    each would oversubscribe the cores (a Gram pass ran 3x slower on two
    cores). Worker processes of ``dask.distributed`` get one BLAS thread
    from their nanny already, so only the local threaded scheduler needs it.
    """
    import dask
    import dask.threaded

    if dask.base.get_scheduler(collections=[collection]) is not dask.threaded.get:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def host_float(a: Any, purpose: str = "a Python float") -> float:
    """A 0-D array as a Python float: detached from autograd, computed if lazy."""
    require_values(a, purpose)
    (a,) = compute(a)
    if array_api_compat.is_torch_array(a):
        a = a.detach()
    return float(a)


def host_bool(a: Any, purpose: str = "a Python bool") -> bool:
    """A 0-D boolean array as a Python bool: computed if lazy, a clear TypeError if traced."""
    require_values(a, purpose)
    (a,) = compute(a)
    return bool(a)


def to_host(a: Any, purpose: str = "a host copy") -> np.ndarray:
    """A float64 NumPy copy of an array of any library (detached, computed if lazy)."""
    require_values(a, purpose)
    (a,) = compute(a)
    if array_api_compat.is_torch_array(a):
        # float64 on the torch side: NumPy has no bfloat16.
        a = a.detach().cpu().double()
    elif array_api_compat.is_cupy_array(a):
        a = a.get()
    try:
        host = np.from_dlpack(a)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        host = np.asarray(a)
    return np.asarray(host, dtype=np.float64)
