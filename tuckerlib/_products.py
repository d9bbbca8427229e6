"""Mode-n products: each one is a single matrix multiplication in disguise."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import array_api_compat

from tuckerlib._accumulate import matmul, tensordot
from tuckerlib._layout import inverse, memory_order
from tuckerlib._namespace import get_namespace, is_numpy, is_torch
from tuckerlib._validation import as_list, as_numeric_array, check_bool, check_mode, check_ndim

__all__ = ["mode_product", "multi_mode_product"]


def _as_operator(matrix: Any, size: int, mode: int, transpose: bool, name: str) -> Any:
    """Return ``matrix`` as a 2-D ``(J, size)`` operator (a view, never a copy)."""
    check_ndim(matrix, (1, 2), name)
    if matrix.ndim == 1:
        if matrix.shape[0] != size:
            raise ValueError(
                f"{name} is a vector of length {matrix.shape[0]}, but mode {mode} has size {size}"
            )
        return matrix[None, :]
    rows, cols = matrix.shape
    if transpose:
        if rows != size:
            raise ValueError(
                f"{name} must have shape ({size}, J) to multiply mode {mode} of size {size} "
                f"with transpose=True, got {tuple(matrix.shape)}"
            )
        return matrix.T
    if cols != size:
        raise ValueError(
            f"{name} must have shape (J, {size}) to multiply mode {mode} of size {size}, "
            f"got {tuple(matrix.shape)}"
        )
    return matrix


def _promoted(xp: ModuleType, arrays: list[Any], names: list[str]) -> list[Any]:
    """``arrays`` in their common dtype: PyTorch's matmul does not promote by itself."""
    if all(a.dtype == arrays[0].dtype for a in arrays):
        return arrays
    try:
        dtype = xp.result_type(*arrays)
    except TypeError:
        given = ", ".join(f"{name} ({a.dtype})" for name, a in zip(names, arrays, strict=True))
        raise TypeError(
            f"the dtypes of {given} do not promote together in this array library; "
            "convert them with astype to one dtype"
        ) from None
    return [a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays]


def _last_mode(xp: ModuleType, x2: Any, op: Any) -> Any:
    """``x2 @ op.T``, the single GEMM of a last-mode product, in its faster orientation."""
    on_cpu_blas = is_numpy(xp) or (is_torch(xp) and x2.device.type == "cpu")
    if on_cpu_blas and x2.dtype == xp.float64:
        # The CPU double-precision GEMM kernels of NumPy and PyTorch run
        # 10-30% faster writing the (J, P) product than the (P, J) one;
        # single precision is the other way round (bench_primitives.py).
        # ``.T`` is a free view, and the caller's reshape only splits its
        # leading axis: no copy.
        return (op @ x2.T).T
    return matmul(xp, x2, op.T)


def _apply(xp: ModuleType, x: Any, op: Any, mode: int) -> Any:
    r""":math:`x \times_m \text{op}`, 2-D ``op`` of shape ``(J, I_mode)``, in ``x``'s memory layout.

    A transposed view (a Fortran-ordered array, the result of a product in
    another orientation) is multiplied along its memory order, where the
    reshapes below are views, and the result comes back in the same layout.
    """
    if array_api_compat.is_dask_array(x):
        # A blocked contraction: reshaping a chunked tensor would rechunk it.
        return xp.moveaxis(tensordot(xp, op, x, ((1,), (mode,))), 0, mode)
    order = memory_order(x)
    if order == tuple(range(x.ndim)):
        return _apply_c_order(xp, x, op, mode)
    y = _apply_c_order(xp, xp.permute_dims(x, order), op, order.index(mode))
    return xp.permute_dims(y, inverse(order))


def _apply_c_order(xp: ModuleType, x: Any, op: Any, mode: int) -> Any:
    r""":math:`x \times_m \text{op}` as one (batched) GEMM on views of a C-ordered ``x``."""
    shape = tuple(x.shape)
    before = math.prod(shape[:mode])
    after = math.prod(shape[mode + 1 :])
    out_shape = (*shape[:mode], op.shape[0], *shape[mode + 1 :])
    if after == 1:
        y = _last_mode(xp, xp.reshape(x, (before, shape[mode])), op)
    elif before == 1:
        y = matmul(xp, op, xp.reshape(x, (shape[mode], after)))
    else:
        y = matmul(xp, op, xp.reshape(x, (before, shape[mode], after)))
    return xp.reshape(y, out_shape)


def mode_product(x: Any, matrix: Any, mode: int, *, transpose: bool = False) -> Any:
    r"""Mode-``n`` product :math:`x \times_n M` of a tensor and a matrix (or vector).

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Tensor of any array API library.
    matrix : array of shape (J, I_n), or (I_n, J) with ``transpose=True``, or (I_n,)
        The operator applied to every mode-``n`` fibre. A 1-D vector
        contracts mode ``n`` away.
    mode : int
        The mode ``n``. Negative values count from the end.
    transpose : bool, optional
        Use ``matrix.T``: with a factor ``U`` of shape ``(I_n, R_n)`` this
        projects onto its columns. Ignored for vectors.

    Returns
    -------
    array
        ``y`` with ``unfold(y, n) == M @ unfold(x, n)``: shape ``x.shape``
        with ``I_n`` replaced by ``J`` (or removed, for a vector), in the
        library, device and promoted dtype of the inputs (integer inputs
        give an integer result, as ``matmul`` does).

    Raises
    ------
    ValueError
        If ``mode`` is out of range or ``matrix`` is not 1-D/2-D or does not
        match mode ``n``'s size.
    TypeError
        If ``x`` and ``matrix`` come from different array libraries, either
        is a boolean (or non-numeric) array, their dtypes do not promote
        together, ``mode`` is not an integer or ``transpose`` is not a bool.

    See Also
    --------
    multi_mode_product : Several modes at once, in the cheapest order.

    Notes
    -----
    No unfolding is materialized. With :math:`P = \prod(I_0..I_{n-1})` and
    :math:`Q = \prod(I_{n+1}..)`, ``x`` is viewed as ``(P, I_n, Q)``: the first
    and last modes are a single GEMM on a reshaped view, a middle mode a
    batched GEMM (``matmul`` broadcasting ``M`` over ``P``). A strided
    input that is a transposed view of a contiguous buffer (e.g.
    Fortran-ordered) is handled in its memory order instead, and the result
    keeps that layout, so no copy of ``x`` is made either.

    Examples
    --------
    Kolda & Bader's example 2.1 multiplied in mode 0 by
    ``U = [[1, 3, 5], [2, 4, 6]]`` (their §2.5):

    >>> import numpy as np
    >>> from tuckerlib import mode_product
    >>> x = np.arange(1, 25).reshape(2, 4, 3).transpose(2, 1, 0)
    >>> u = np.array([[1, 3, 5], [2, 4, 6]])
    >>> y = mode_product(x, u, 0)
    >>> y[:, :, 0]
    array([[ 22,  49,  76, 103],
           [ 28,  64, 100, 136]])
    >>> y[:, :, 1]
    array([[130, 157, 184, 211],
           [172, 208, 244, 280]])
    >>> mode_product(x, np.ones(4), 1).shape
    (3, 2)
    """
    xp = get_namespace(x, matrix)
    x, matrix = as_numeric_array(x, xp, "x"), as_numeric_array(matrix, xp, "matrix")
    transpose = check_bool(transpose, "transpose")
    check_ndim(x, 1, "x")
    mode = check_mode(mode, x.ndim)
    op = _as_operator(matrix, x.shape[mode], mode, transpose, "matrix")
    x, op = _promoted(xp, [x, op], ["x", "matrix"])
    y = _apply(xp, x, op, mode)
    if matrix.ndim == 1:
        y = xp.reshape(y, tuple(s for k, s in enumerate(y.shape) if k != mode))
    return y


@functools.lru_cache(maxsize=256)
def _cheapest_order(
    shape: tuple[int, ...], targets: tuple[tuple[int, int], ...]
) -> tuple[int, ...]:
    """Order of the products ``(mode, J)`` in ``targets`` that costs fewest flops.

    Applying mode ``n`` costs ``J_n * I_n * prod(current other sizes)``
    multiply-adds; a dynamic program over the subsets already applied finds
    the exact optimum (``O(2^k k)`` for ``k`` products).
    """
    k = len(targets)
    best: dict[int, tuple[int, tuple[int, ...]]] = {0: (0, ())}
    for subset in range(1 << k):
        if subset not in best:
            continue
        cost, order = best[subset]
        current = list(shape)
        for i, (mode, size) in enumerate(targets):
            if subset >> i & 1:
                current[mode] = size
        for i, (_, size) in enumerate(targets):
            if subset >> i & 1:
                continue
            step = size * math.prod(current)
            candidate = (cost + step, (*order, i))
            nxt = subset | 1 << i
            if nxt not in best or candidate[0] < best[nxt][0]:
                best[nxt] = candidate
    return tuple(targets[i][0] for i in best[(1 << k) - 1][1])


def _as_modes(modes: Iterable[int] | int | None, ndim: int, name: str) -> list[int]:
    if modes is None:
        return []
    try:
        return [check_mode(modes, ndim, name)]
    except TypeError:
        entries = as_list(modes, name, "a mode or a sequence of modes")
    return [check_mode(m, ndim, name) for m in entries]


def multi_mode_product(
    x: Any,
    matrices: Sequence[Any],
    modes: Sequence[int] | None = None,
    *,
    skip: int | Sequence[int] | None = None,
    transpose: bool = False,
) -> Any:
    r"""Products of a tensor with several matrices, one per mode.

    Computes :math:`x \times_{m_0} M_0 \times_{m_1} M_1 \dots`. Products in different modes
    commute, so they are applied in the order that costs the fewest flops.

    Parameters
    ----------
    x : array of shape (I_0, ..., I_{N-1})
        Tensor of any array API library.
    matrices : sequence of arrays
        ``matrices[i]`` acts on mode ``modes[i]``, with the shapes accepted by
        :func:`mode_product` (1-D vectors contract their mode away). Any
        iterable, a generator included, is read once.
    modes : sequence of int, optional
        Distinct modes, one per matrix. Defaults to ``0, 1, ..., len(matrices) - 1``.
    skip : int or sequence of int, optional
        Modes (not list positions) whose matrix is left out, e.g. to project
        onto all factors but one in HOOI.
    transpose : bool, optional
        Use every matrix transposed, e.g. :math:`x \times_n U_n^\top` to project onto
        factors ``U_n`` of shape ``(I_n, R_n)``.

    Returns
    -------
    array
        The product, in the library and device of the inputs. Modes
        contracted by vectors are removed; the others keep their position.

    Raises
    ------
    ValueError
        If ``modes`` and ``matrices`` differ in length (or, without
        ``modes``, there are more matrices than modes), a mode repeats or is
        out of range, a ``skip`` mode is not among ``modes``, or a matrix
        does not match its mode's size.
    TypeError
        If the inputs come from different array libraries, an input is a
        boolean (or non-numeric) array, their dtypes do not promote
        together, ``matrices`` is not a sequence, or ``transpose`` is not a
        bool.

    See Also
    --------
    mode_product : A single mode.
    tucker_to_tensor : :math:`\text{core} \times_0 U_0 \dots \times_{N-1} U_{N-1}`.

    Notes
    -----
    Applying mode ``n`` first costs :math:`J_n I_n \prod_{k \ne n} I_k`
    multiply-adds and shrinks the tensor for the products that follow, so
    the order matters by orders of magnitude when the ``J_n`` differ from
    the ``I_n``. The optimal order is found by a dynamic program over the
    subsets of modes already applied and cached per shape.

    Examples
    --------
    >>> import numpy as np
    >>> from tuckerlib import multi_mode_product
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((6, 5, 4))
    >>> mats = [rng.standard_normal((2, 6)), rng.standard_normal((3, 5))]
    >>> multi_mode_product(x, mats).shape
    (2, 3, 4)
    >>> multi_mode_product(x, mats, skip=0).shape
    (6, 3, 4)
    """
    matrices = as_list(matrices, "matrices", "a sequence of arrays, one per mode")
    xp = get_namespace(x, *matrices)
    x = as_numeric_array(x, xp, "x")
    matrices = [as_numeric_array(m, xp, f"matrices[{i}]") for i, m in enumerate(matrices)]
    transpose = check_bool(transpose, "transpose")
    check_ndim(x, 1, "x")
    if modes is None and len(matrices) > x.ndim:
        raise ValueError(
            f"matrices has {len(matrices)} entries but x has only {x.ndim} modes "
            f"(shape {tuple(x.shape)}); pass modes= to say which mode each matrix acts on"
        )
    modes = list(range(len(matrices))) if modes is None else _as_modes(modes, x.ndim, "modes")
    if len(modes) != len(matrices):
        raise ValueError(f"modes has {len(modes)} entries but {len(matrices)} matrices were given")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct, got {modes}")
    skipped = set(_as_modes(skip, x.ndim, "skip"))
    if not skipped <= set(modes):
        raise ValueError(f"skip={sorted(skipped)} names modes not in modes={modes}")
    ops = {
        mode: _as_operator(m, x.shape[mode], mode, transpose, f"matrices[{i}]")
        for i, (mode, m) in enumerate(zip(modes, matrices, strict=True))
        if mode not in skipped
    }
    names = {mode: f"matrices[{i}]" for i, mode in enumerate(modes)}
    promoted = _promoted(xp, [x, *ops.values()], ["x", *(names[m] for m in ops)])
    x, ops = promoted[0], dict(zip(ops, promoted[1:], strict=True))
    targets = tuple((mode, op.shape[0]) for mode, op in ops.items())
    for mode in _cheapest_order(tuple(x.shape), targets):
        x = _apply(xp, x, ops[mode], mode)
    contracted = {
        mode for mode, m in zip(modes, matrices, strict=True) if m.ndim == 1 and mode in ops
    }
    if contracted:
        x = xp.reshape(x, tuple(s for k, s in enumerate(x.shape) if k not in contracted))
    return x
