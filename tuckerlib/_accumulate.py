r"""Long contractions whose rounding error does not grow with their length.

A matrix product of single-precision arrays accumulates each entry in
single precision: summing ``L`` terms loses up to :math:`\sim L \cdot \varepsilon` of the
result (a Gram matrix, a projection onto a factor, :math:`\|x\|^2`), so a mode of
10⁸ entries gave an exactly rank-1 tensor a core 0.6% off. Here the
contracted axis is cut into blocks of :data:`BLOCK` entries; each block is
one product of the array library (BLAS, cuBLAS, XLA), whose error is that
of ``BLOCK`` terms, and the block products are added with Kahan's
compensated summation, whose error does not depend on how many there are.
The compensation runs in the arrays' own dtype, so it works on every
backend (JAX without 64-bit mode and Apple's MPS have no float64).

Double precision is left as one product: its rounding over any length
that fits in memory stays far below single precision's resolution.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._layout import memory_order

__all__ = ["BLOCK", "gram", "matmul", "squared_norm", "tensordot", "vector_norm"]

#: Contracted entries per block product: the error within a block is at
#: most ``~BLOCK · eps / 2`` (3e-5 for float32 in the worst, all-positive
#: case; 1e-7 measured with BLAS kernels, whose SIMD lanes sum separately);
#: a product over 10⁸ entries takes ~100,000 blocks.
BLOCK = 1024


def _blocked(xp: ModuleType, a: Any, length: int) -> bool:
    """Whether a contraction of ``length`` entries of ``a``'s dtype needs blocks."""
    return length > BLOCK and xp.isdtype(a.dtype, "real floating") and xp.finfo(a.dtype).bits <= 32


def _kahan(parts: Any) -> Any:
    """The sum of the arrays ``parts`` yields, compensated (Kahan 1965)."""
    total = carry = None
    for part in parts:
        if total is None:
            total, carry = part, part * 0
            continue
        y = part - carry
        t = total + y
        carry = (t - total) - y
        total = t
    return total - carry


def matmul(xp: ModuleType, a: Any, b: Any) -> Any:
    """``a @ b`` (``matmul`` semantics, ``b`` 1-D or batched too), accurate for a long contraction.

    Examples
    --------
    >>> import numpy as np

    from tuckerlib._layout import memory_order
    >>> from tuckerlib._accumulate import matmul
    >>> x = np.full((1, 10**6), 0.1, np.float32)
    >>> exact = 10**6 * float(x[0, 0]) ** 2
    >>> abs(float(matmul(np, x, x.T)[0, 0]) / exact - 1) < 1e-7
    True
    """
    length = a.shape[-1]
    if not _blocked(xp, a, length):
        return xp.matmul(a, b)
    # Stops within the axis: the array API leaves out-of-bounds slices unspecified.
    blocks = [(s, min(s + BLOCK, length)) for s in range(0, length, BLOCK)]
    if b.ndim == 1:
        return _kahan(xp.matmul(a[..., s:e], b[s:e]) for s, e in blocks)
    return _kahan(xp.matmul(a[..., s:e], b[..., s:e, :]) for s, e in blocks)


def gram(xp: ModuleType, a: Any) -> Any:
    """``a @ a.T`` of a 2-D ``a``, accurate for many columns; each block a symmetric product."""
    return matmul(xp, a, a.T)


def _total(xp: ModuleType, values: Any) -> Any:
    """The sum of a 1-D array in blocks of :data:`BLOCK`, the block sums summed the same way."""
    while values.shape[0] > BLOCK:
        whole = values.shape[0] - values.shape[0] % BLOCK
        sums = xp.sum(xp.reshape(values[:whole], (-1, BLOCK)), axis=1)
        values = xp.concat([sums, xp.reshape(xp.sum(values[whole:]), (1,))])
    return xp.sum(values)


def squared_norm(xp: ModuleType, flat: Any) -> Any:
    """``flat @ flat`` of a 1-D array as a 0-D array, accurate for a long vector.

    One pass: the dot product of each block of :data:`BLOCK` entries (no
    temporary the size of ``flat``), then the block sums in a tree.
    """
    length = flat.shape[0]
    if not _blocked(xp, flat, length):
        return flat @ flat
    whole = length - length % BLOCK
    head = xp.reshape(flat[:whole], (-1, BLOCK))
    tail = flat[whole:]
    return _total(xp, xp.concat([xp.linalg.vecdot(head, head), xp.reshape(tail @ tail, (1,))]))


def vector_norm(xp: ModuleType, a: Any) -> Any:
    """The Frobenius norm of an array of any shape as a 0-D array, accurate for many entries.

    Dask sums chunk by chunk in a tree already (pairwise), so it keeps its own.
    """
    if array_api_compat.is_dask_array(a) or not _blocked(xp, a, math.prod(a.shape)):
        return xp.linalg.vector_norm(a)
    flat = xp.reshape(xp.permute_dims(a, memory_order(a)), (-1,))
    return xp.sqrt(squared_norm(xp, flat))


def tensordot(xp: ModuleType, a: Any, b: Any, axes: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
    """``xp.tensordot(a, b, axes)``, accurate for a long contraction; Dask arrays chunk by chunk."""
    if array_api_compat.is_dask_array(a) or array_api_compat.is_dask_array(b):
        return _dask_tensordot(a, b, axes)
    left = tuple(k % a.ndim for k in axes[0])
    right = tuple(k % b.ndim for k in axes[1])
    length = math.prod(a.shape[k] for k in left)
    if not _blocked(xp, a, length):
        return xp.tensordot(a, b, axes=(left, right))
    keep_a = [k for k in range(a.ndim) if k not in left]
    keep_b = [k for k in range(b.ndim) if k not in right]
    a2 = xp.reshape(xp.permute_dims(a, (*keep_a, *left)), (-1, length))
    b2 = xp.reshape(xp.permute_dims(b, (*right, *keep_b)), (length, -1))
    shape = (*(a.shape[k] for k in keep_a), *(b.shape[k] for k in keep_b))
    return xp.reshape(matmul(xp, a2, b2), shape)


def _chunk_tensordot(a: Any, b: Any, axes: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
    """One pair of chunks contracted, the contracted axes kept with length 1 for the sum."""
    xp = array_api_compat.array_namespace(a, b)
    product = tensordot(xp, a, b, axes)
    for k in sorted(axes[0]):
        product = xp.expand_dims(product, axis=k)
    return product


def _dask_tensordot(a: Any, b: Any, axes: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
    """``dask.array.tensordot`` with each chunk pair's product from :func:`tensordot`.

    As Dask does it: one product per pair of chunks that meet, then a tree
    sum over the contracted chunks (pairwise, so its error grows with the
    logarithm of their count only).
    """
    import dask.array as da

    a, b = da.asarray(a), da.asarray(b)
    left = tuple(k % a.ndim for k in axes[0])
    right = tuple(k % b.ndim for k in axes[1])
    left_index = list(range(a.ndim))
    right_index = list(range(a.ndim, a.ndim + b.ndim))
    out_index = left_index + right_index
    for k, m in zip(left, right, strict=True):
        out_index.remove(right_index[m])
        right_index[m] = left_index[k]
    partial = da.blockwise(
        _chunk_tensordot,
        out_index,
        a,
        left_index,
        b,
        right_index,
        dtype=np.result_type(a.dtype, b.dtype),
        concatenate=False,
        adjust_chunks={left_index[k]: lambda _: 1 for k in left},
        axes=(left, right),
        meta=a._meta,
    )
    return partial.sum(axis=left)
