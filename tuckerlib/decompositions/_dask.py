r"""The Dask path: decompositions of chunked tensors, in memory or larger than it.

Every pass over the tensor is a blocked contraction that Dask runs chunk by
chunk where the chunks live, followed by a tree reduction of the small
partial results; the tensor is never reshaped to an unfolding nor rechunked:

* the Gram matrix of mode ``n``: ``tensordot`` of ``x`` with itself over all
  other modes (:math:`I_n \times I_n`; for a mode larger than all the others
  together, the Gram matrix of the columns instead);
* a projection :math:`x \times_n U^\top`: ``tensordot`` with the small factor;
* a range sketch :math:`A \Omega`: ``einsum`` with one small Gaussian matrix per
  other mode (the Khatri-Rao test matrix is never formed).

Only small matrices come to the client, in the chunks' own library (NumPy,
or CuPy for CuPy chunks): Gram matrices, sketches, factors, and a core once
it fits in :data:`EAGER_BYTES`. The rest of the algorithm then runs on the
client exactly as for an in-memory tensor, so the results equal the
in-memory ones to rounding. The first pass also measures :math:`\|x\|^2` (the
first Gram matrix's trace, or a sum beside a sketch): it checks for
NaN/inf and decides the scaling without a pass of its own.

Passes over ``x``: ST-HOSVD 2, HOSVD 2, randomized ST-HOSVD ``2q + 1``,
HOOI its initialization plus ``N`` per sweep, mode spectra 1; a mode larger
than the product of all the others costs one more pass (``A V`` for its
factor), and a core larger than :data:`EAGER_BYTES` is kept on the workers
(persisted) and read once per remaining step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

import array_api_compat
import dask.array as da
import numpy as np

from tuckerlib._accumulate import gram, matmul
from tuckerlib._accumulate import tensordot as _tensordot
from tuckerlib._host import compute, persist
from tuckerlib._tucker import TuckerTensor
from tuckerlib.decompositions._factors import (
    FactorStep,
    Truncation,
    descending_sqrt,
    eigen_factor,
    truncations,
)
from tuckerlib.decompositions._kernels import HOOIInfo, Truncated, iterate, sthosvd_steps
from tuckerlib.decompositions._linalg import orthonormal, sign_fix
from tuckerlib.decompositions._prepare import Prepared, magnitude_scale
from tuckerlib.decompositions._sketch import Sketch, gaussian_draws, nystrom_coefficients
from tuckerlib.decompositions._spectra import pad
from tuckerlib.decompositions._truncation import default_order

__all__ = [
    "EAGER_BYTES",
    "hooi",
    "hosvd",
    "measure",
    "mode_grams",
    "one_chunk",
    "spectra",
    "sthosvd",
    "truncated",
]

# A core (or other intermediate) up to this size is computed to the client
# and finished there; a larger one stays on the workers.
EAGER_BYTES = 64 * 2**20


def chunk_namespace(x: da.Array) -> ModuleType:
    """The array namespace of ``x``'s chunks (NumPy or CuPy)."""
    return array_api_compat.array_namespace(x._meta)


def _others(ndim: int, mode: int) -> tuple[int, ...]:
    return tuple(k for k in range(ndim) if k != mode)


def _columns(shape: Sequence[int], mode: int) -> int:
    return math.prod(s for k, s in enumerate(shape) if k != mode)


def is_tall(shape: Sequence[int], mode: int) -> bool:
    """Whether mode ``n`` has more rows than its unfolding has columns."""
    return shape[mode] > _columns(shape, mode)


def mode_gram(x: da.Array, mode: int) -> da.Array:
    r"""Lazy Gram matrix of the smaller side of the mode-``mode`` unfolding.

    :math:`I_n \times I_n` (:func:`row_gram`), or for a tall mode the column Gram
    matrix, of shape ``(*others, *others)`` (``tensordot`` over mode ``n``).
    """
    if is_tall(x.shape, mode):
        return accurate_tensordot(x, x, axes=((mode,), (mode,)))
    return row_gram(x, mode)


def row_gram(x: da.Array, mode: int) -> da.Array:
    r"""Lazy :math:`A A^\top` of the mode-``n`` unfolding, block by block, using its symmetry.

    With ``c`` chunks along mode ``n``, the block ``(i, j)`` of the Gram
    matrix sums, over the fibre groups (the chunks that share their other
    modes' block indices), the product of chunk ``i`` with chunk ``j``;
    only ``j >= i`` are computed (``c (c + 1) / 2`` of :math:`c^2`: a plain
    ``tensordot`` of ``x`` with itself would compute both halves), the
    diagonal ones as :math:`B B^\top` (BLAS ``syrk``, half the flops again). Each
    block's partial sums are reduced in a tree of fan-in 4, as Dask's own
    reductions are; the blocks meet in one small task.
    """
    from dask import delayed

    chunks = np.moveaxis(x.to_delayed(optimize_graph=False), mode, 0)
    groups = chunks.reshape(chunks.shape[0], -1)
    blocks = {}
    for i in range(groups.shape[0]):
        for j in range(i, groups.shape[0]):
            products = [
                delayed(_block_gram, pure=True)(groups[i, g], groups[j, g], mode, i == j)
                for g in range(groups.shape[1])
            ]
            blocks[i, j] = _tree_sum(delayed, products)
    gram = delayed(_assemble, pure=True)(blocks, groups.shape[0])
    size = x.shape[mode]
    return da.from_delayed(gram, shape=(size, size), dtype=x.dtype, meta=x._meta)


def _block_gram(a: Any, b: Any, mode: int, same: bool) -> Any:
    xp = array_api_compat.array_namespace(a)
    a = xp.reshape(xp.moveaxis(a, mode, 0), (a.shape[mode], -1))
    if same:
        # ``a @ a.T`` on one buffer is what NumPy runs as a symmetric rank-k update.
        return gram(xp, a)
    return matmul(xp, a, xp.reshape(xp.moveaxis(b, mode, 0), (b.shape[mode], -1)).T)


def _tree_sum(delayed: Any, terms: list[Any]) -> Any:
    while len(terms) > 1:
        terms = [delayed(_sum, pure=True)(terms[k : k + 4]) for k in range(0, len(terms), 4)]
    return terms[0]


def _sum(terms: list[Any]) -> Any:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _assemble(blocks: dict[tuple[int, int], Any], count: int) -> Any:
    xp = array_api_compat.array_namespace(blocks[0, 0])
    rows = [
        xp.concat([blocks[i, j] if i <= j else blocks[j, i].T for j in range(count)], axis=1)
        for i in range(count)
    ]
    return xp.concat(rows, axis=0)


def square(gram: Any, shape: Sequence[int], mode: int) -> Any:
    """A computed :func:`mode_gram` as a square matrix."""
    size = shape[mode] if not is_tall(shape, mode) else _columns(shape, mode)
    return gram.reshape(size, size)


def mode_grams(prepared: Prepared, modes: Sequence[int]) -> tuple[Prepared, list[Any]]:
    """The square Gram matrices of ``modes`` (on the client), all in one measuring pass."""
    shape = prepared.x.shape
    prepared, values = measure(
        prepared,
        lambda x: [mode_gram(x, n) for n in modes],
        lambda values: float(square(values[0], shape, modes[0]).trace()),
    )
    return prepared, [square(g, shape, n) for g, n in zip(values, modes, strict=True)]


def _largest(x: da.Array) -> float:
    finite, top = compute(da.isfinite(x).all(), da.max(da.abs(x)))
    if not bool(finite):
        raise ValueError("x contains NaN or infinity")
    return float(top)


def measure(
    prepared: Prepared,
    build: Callable[[da.Array], Sequence[da.Array]],
    norm2_of: Callable[[Sequence[Any]], float] | None = None,
) -> tuple[Prepared, list[Any]]:
    r"""``build(x)`` and :math:`\lVert x \rVert^2` in one pass; rescale, redo if out of range.

    ``norm2_of`` reads :math:`\|x\|^2` off the computed values (a Gram matrix's
    trace); without it a sum of squares joins the same pass. The returned
    :class:`Prepared` knows ``norm2`` and ``scale``.
    """
    x = prepared.x
    lazy = list(build(x))
    extra = [] if norm2_of is not None else [da.sum(x * x)]
    values = compute(*lazy, *extra)
    norm2 = norm2_of(values) if norm2_of is not None else float(values[-1])
    scale = magnitude_scale(norm2, np.finfo(x.dtype), lambda: _largest(x))
    if scale != 1.0:
        x = x * scale
        values = compute(*build(x), *([da.sum(x * x)] if norm2_of is None else []))
        norm2 = norm2_of(values) if norm2_of is not None else float(values[-1])
    measured = replace(prepared, x=x, scale=prepared.scale * scale, norm2=norm2)
    return measured, list(values[: len(lazy)])


def accurate_tensordot(x: Any, y: Any, axes: tuple[Sequence[int], Sequence[int]]) -> da.Array:
    """``da.tensordot``, each chunk pair's product accurate however long (see ``_accumulate``)."""
    return _tensordot(np, x, y, (tuple(axes[0]), tuple(axes[1])))


def project(x: da.Array, factor: Any, mode: int) -> da.Array:
    r"""Lazy ``x ×_mode factorᵀ`` for a small (client) factor: one blocked contraction."""
    return da.moveaxis(accurate_tensordot(x, factor, axes=((mode,), (0,))), -1, mode)


def _times_columns(x: da.Array, mode: int, z: Any) -> da.Array:
    """Lazy ``A Z`` for a column-space array ``z`` of shape ``(*others, k)``."""
    others = _others(x.ndim, mode)
    return accurate_tensordot(x, z, axes=(others, tuple(range(len(others)))))


def _settle(core: da.Array) -> Any:
    """A small core on the client; a large one persisted on the workers."""
    if core.nbytes <= EAGER_BYTES:
        (value,) = compute(core)
        return value
    return persist(core)


def _gram_step(xp: ModuleType, x: da.Array, mode: int, gram: Any, cut: Truncation) -> FactorStep:
    """The factor of mode ``mode`` from its computed (square) Gram matrix."""
    size = x.shape[mode]
    if not is_tall(x.shape, mode):
        u, spectrum = eigen_factor(xp, gram, cut, size)
        return FactorStep(sign_fix(xp, u), spectrum)
    v, spectrum = eigen_factor(xp, gram, cut, size)
    others = _others(x.ndim, mode)
    columns = xp.reshape(v, (*(x.shape[k] for k in others), v.shape[1]))
    (av,) = compute(_times_columns(x, mode, columns))
    u = _completed(xp, orthonormal(xp, av), cut.rank_of(spectrum, size))
    return FactorStep(sign_fix(xp, u), spectrum)


def _completed(xp: ModuleType, q: Any, rank: int) -> Any:
    """``q`` extended by orthonormal columns to ``rank`` columns.

    Only a rank above the number of columns of the unfolding needs this;
    the added directions meet no data (the core is zero there), so any
    orthonormal completion is as good as another.
    """
    missing = rank - q.shape[1]
    if missing <= 0:
        return q
    drawn = np.random.default_rng(0).standard_normal((q.shape[0], missing))
    extra = xp.asarray(drawn, dtype=q.dtype)
    extra = extra - q @ (q.T @ extra)
    return xp.concat([q, orthonormal(xp, extra)], axis=1)


def _sketched(x: da.Array, mode: int, rank: int | None, method: str, sketch: Sketch | None) -> bool:
    rows, cols = x.shape[mode], _columns(x.shape, mode)
    return (
        method == "randomized"
        and rank is not None
        and sketch is not None
        and rank + sketch.oversample < min(rows, cols)
    )


def _range_sketch(x: da.Array, mode: int, draws: dict[int, np.ndarray]) -> da.Array:
    r"""Lazy :math:`A \Omega` for the Khatri-Rao :math:`\Omega` of ``draws`` (a matrix per mode)."""
    letters = "abcdefghijklmnopqrstuvwxy"[: x.ndim]
    others = _others(x.ndim, mode)
    subscripts = ",".join([letters, *(f"{letters[k]}z" for k in others)]) + f"->{letters[mode]}z"
    matrices = [np.asarray(draws[k], dtype=x.dtype) for k in others]
    return da.einsum(subscripts, x, *matrices, optimize=True)


def _sketch_step(
    xp: ModuleType, x: da.Array, mode: int, rank: int, sketch: Sketch, y: Any
) -> FactorStep:
    r"""The randomized factor step of :func:`~._sketch.randomized_factor`, on Dask.

    :math:`y = A \Omega` is already computed. The row sketches :math:`Z = A^\top Q` stay
    lazy with the shape ``(*others, k)``; each product with ``A`` is one pass.
    """
    rows, cols = x.shape[mode], _columns(x.shape, mode)
    q = orthonormal(xp, y)
    if sketch.power_iter == 0:
        b = persist(accurate_tensordot(x, q, axes=((mode,), (0,))))
        others = tuple(range(x.ndim - 1))
        if q.shape[1] <= cols:
            (gram,) = compute(accurate_tensordot(b, b, axes=(others, others)))
            _, v = xp.linalg.eigh(gram)
            ub = xp.flip(v, axis=1)
        else:
            (small,) = compute(b)
            ub = xp.linalg.svd(xp.reshape(small, (cols, -1)).T)[0]
        u = sign_fix(xp, q @ ub[:, :rank])
        projected = accurate_tensordot(b, (q.T @ u), axes=((x.ndim - 1,), (0,)))
        return FactorStep(u, None, da.moveaxis(projected, -1, mode))
    for _ in range(sketch.power_iter - 1):
        # Kept, not left lazy: computing A (Aᵀ Q) in one graph would hold
        # every chunk of x in memory until Aᵀ Q is complete.
        z = persist(accurate_tensordot(x, q, axes=((mode,), (0,))))
        if cols <= rows:
            (value,) = compute(z)
            z = xp.reshape(orthonormal(xp, xp.reshape(value, (cols, -1))), value.shape)
        (product,) = compute(_times_columns(x, mode, z))
        q = orthonormal(xp, product)
    z = persist(accurate_tensordot(x, q, axes=((mode,), (0,))))
    (y,) = compute(_times_columns(x, mode, z))
    u, coefficients = nystrom_coefficients(xp, q, y, rank)
    projected = accurate_tensordot(z, coefficients, axes=((x.ndim - 1,), (1,)))
    return FactorStep(u, None, da.moveaxis(projected, -1, mode))


def _step(
    xp: ModuleType,
    x: da.Array,
    mode: int,
    cut: Truncation,
    method: str,
    sketch: Sketch | None,
) -> FactorStep:
    """One factor step on a Dask tensor whose scale is already settled."""
    if _sketched(x, mode, cut.rank, method, sketch):
        draws = _draws(x, mode, cut.rank, sketch)
        (y,) = compute(_range_sketch(x, mode, draws))
        return _sketch_step(xp, x, mode, cut.rank, sketch, y)
    (gram,) = compute(mode_gram(x, mode))
    return _gram_step(xp, x, mode, square(gram, x.shape, mode), cut)


def _draws(x: da.Array, mode: int, rank: int, sketch: Sketch) -> dict[int, np.ndarray]:
    columns = [(k, x.shape[k]) for k in _others(x.ndim, mode)]
    return gaussian_draws(sketch.rng, columns, rank + sketch.oversample, x.dtype == np.float32)


def _first_step(
    prepared: Prepared,
    mode: int,
    ranks: Sequence[int] | None,
    tol: float | None,
    method: str,
    sketch: Sketch | None,
) -> tuple[Prepared, list[Truncation], FactorStep]:
    r"""The first step, whose pass also measures :math:`\|x\|^2` (and so the cuts of ``tol``)."""
    xp = chunk_namespace(prepared.x)
    rank = None if ranks is None else ranks[mode]
    if _sketched(prepared.x, mode, rank, method, sketch):
        draws = _draws(prepared.x, mode, rank, sketch)
        prepared, (y,) = measure(prepared, lambda x: [_range_sketch(x, mode, draws)])
        step = _sketch_step(xp, prepared.x, mode, rank, sketch, y)
        return prepared, truncations(prepared, ranks, tol), step
    prepared, (gram,) = mode_grams(prepared, [mode])
    cuts = truncations(prepared, ranks, tol)
    return prepared, cuts, _gram_step(xp, prepared.x, mode, gram, cuts[mode])


def truncated(
    prepared: Prepared,
    order: Sequence[int],
    ranks: Sequence[int] | None,
    tol: float | None,
    method: str,
    *,
    sketch: Sketch | None = None,
    first: FactorStep | None = None,
) -> tuple[Prepared, Truncated]:
    """ST-HOSVD of a Dask tensor in ``order``; a core that fits the client is finished there.

    With ``first`` (the step of ``order[0]``, from a measured ``prepared``)
    the first pass is skipped.
    """
    xp = chunk_namespace(prepared.x)
    if first is None:
        prepared, cuts, first = _first_step(prepared, order[0], ranks, tol, method, sketch)
    else:
        cuts = truncations(prepared, ranks, tol)
    factors: list[Any] = [None] * prepared.x.ndim
    steps: list[FactorStep] = []
    core = prepared.x
    for i, n in enumerate(order):
        if not isinstance(core, da.Array):
            rest = sthosvd_steps(xp, core, order[i:], cuts, method, sketch=sketch)
            factors = [f if r is None else r for f, r in zip(factors, rest.factors, strict=True)]
            return prepared, Truncated(rest.core, tuple(factors), (*steps, *rest.steps))
        step = first if i == 0 else _step(xp, core, n, cuts[n], method, sketch)
        core = _settle(project(core, step.factor, n) if step.projected is None else step.projected)
        factors[n] = step.factor
        steps.append(replace(step, projected=None))
    return prepared, Truncated(core, tuple(factors), tuple(steps))


def _as_dask(a: Any, rows: tuple[int, ...] | None = None) -> da.Array:
    if isinstance(a, da.Array):
        return a
    chunks = a.shape if rows is None else (rows, a.shape[1])
    return da.from_array(a, chunks=chunks)


def result(prepared: Prepared, core: Any, factors: Sequence[Any]) -> TuckerTensor:
    """The decomposition as Dask arrays: factors chunked along their mode as ``x`` is."""
    chunks = prepared.x.chunks
    return prepared.result(_as_dask(core), [_as_dask(f, chunks[n]) for n, f in enumerate(factors)])


def sthosvd(
    prepared: Prepared,
    order: Sequence[int],
    ranks: Sequence[int] | None,
    tol: float | None,
    method: str,
    *,
    sketch: Sketch | None = None,
) -> TuckerTensor:
    """:func:`~tuckerlib.sthosvd` and :func:`~tuckerlib.rhosvd` of a Dask tensor."""
    prepared, done = truncated(prepared, order, ranks, tol, method, sketch=sketch)
    return result(prepared, done.core, done.factors)


def project_all(x: da.Array, factors: Sequence[Any], skip: int | None = None) -> da.Array:
    """Lazy ``x`` projected onto every factor but ``skip``, largest reduction first."""
    ranks = [f.shape[1] for f in factors]
    for n in default_order(x.shape, ranks):
        if n != skip:
            x = project(x, factors[n], n)
    return x


def _hosvd_factors(
    prepared: Prepared, ranks: Sequence[int] | None, tol: float | None, method: str
) -> tuple[Prepared, list[Any]]:
    xp = chunk_namespace(prepared.x)
    ndim = prepared.x.ndim
    if method == "randomized":
        factors = []
        for n in range(ndim):
            sketch = Sketch(oversample=10, power_iter=1, rng=np.random.default_rng(0))
            prepared, _, step = _first_step(prepared, n, ranks, tol, method, sketch)
            factors.append(step.factor)
        return prepared, factors
    prepared, grams = mode_grams(prepared, range(ndim))
    cuts = truncations(prepared, ranks, tol)
    steps = [_gram_step(xp, prepared.x, n, grams[n], cuts[n]) for n in range(ndim)]
    return prepared, [step.factor for step in steps]


def hosvd(
    prepared: Prepared, ranks: Sequence[int] | None, tol: float | None, method: str
) -> TuckerTensor:
    """:func:`~tuckerlib.hosvd` of a Dask tensor: every Gram matrix in one pass, then the core."""
    prepared, factors = _hosvd_factors(prepared, ranks, tol, method)
    (core,) = compute(project_all(prepared.x, factors))
    return result(prepared, core, factors)


def hooi(
    prepared: Prepared, ranks: tuple[int, ...], init: Any, stop: tuple[int, float]
) -> tuple[TuckerTensor, HOOIInfo]:
    """:func:`~tuckerlib.hooi` of a Dask tensor: each mode of a sweep is one pass."""
    xp = chunk_namespace(prepared.x)
    if isinstance(init, TuckerTensor):
        factors = [
            sign_fix(xp, xp.linalg.qr(xp.astype(f, prepared.x.dtype))[0])
            for f in compute(*init.factors)
        ]
        prepared, (core,) = measure(prepared, lambda x: [project_all(x, factors)])
    elif init == "hosvd":
        prepared, factors = _hosvd_factors(prepared, ranks, None, "auto")
        (core,) = compute(project_all(prepared.x, factors))
    else:
        order = default_order(prepared.x.shape, ranks)
        prepared, done = truncated(prepared, order, ranks, None, "auto")
        core, factors = done.core, list(done.factors)
        (core,) = compute(core)
    x = prepared.x
    core, factors, info = iterate(
        xp,
        lambda factors, n: compute(project_all(x, factors, skip=n))[0],
        (core, list(factors)),
        prepared.norm2,
        default_order(x.shape, ranks),
        stop,
    )
    return result(prepared, core, factors), info


def spectra(prepared: Prepared, vectors: bool) -> tuple[Prepared, list[tuple[Any, Any]]]:
    """Every mode's singular values (and, when cheap, left singular vectors) in one pass.

    Returns ``(values, vectors_or_None)`` per mode on the client, values
    zero-padded to ``I_n``; vectors come for a mode whose row Gram matrix
    is the small one, and only with ``vectors=True``.
    """
    xp = chunk_namespace(prepared.x)
    shape = prepared.x.shape
    prepared, grams = mode_grams(prepared, range(len(shape)))
    out = []
    for n, matrix in enumerate(grams):
        if vectors and not is_tall(shape, n):
            w, v = xp.linalg.eigh(matrix)
            out.append((descending_sqrt(xp, w), xp.flip(v, axis=1)))
            continue
        out.append((pad(xp, descending_sqrt(xp, xp.linalg.eigvalsh(matrix)), shape[n]), None))
    return prepared, out


def one_chunk(values: Any) -> da.Array:
    """``values`` (a small in-memory result) as a Dask array of one chunk, for Dask input."""
    return _as_dask(values)
