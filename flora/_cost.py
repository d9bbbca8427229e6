"""The cost model behind ``forward="auto"``: a roofline estimate per op.

Each op of a branch is an :class:`Op`: its multiply-adds and the tensor
elements it reads and writes (inputs, weight, output). Its time is taken as
``max(macs, MACHINE_BALANCE · elements)`` in units of one multiply-add: an
op is bound either by arithmetic or by memory traffic, whichever is slower.
Thin matmuls and few-channel convolutions, which a plain flop count makes
look nearly free, are memory-bound here and cost what moving their
activations costs.

With gradients every op of a chain runs three times in this model (forward,
gradient of its input, gradient of its weight, each touching the same
tensors), except that the first op skips its input gradient when the
layer's input needs none. See :doc:`/flora_math` for the per-layer op lists
and ``benchmarks/bench_auto_rule.py`` for the measurements behind the constant.

Everything here is plain integer arithmetic on shapes; the layers cache its
answer per layer type, shape and mode, and ``torch.compile`` takes that
answer as a constant (``flora.layers.base``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from flora._tucker import mode_order

__all__ = [
    "MACHINE_BALANCE",
    "Op",
    "chain_cost",
    "choose",
    "product",
    "reconstruction_ops",
    "roofline",
]

# Multiply-adds per tensor element read or written (float32: 8 per byte) at
# which an op turns from memory-bound to compute-bound. An effective balance,
# not a datasheet one: thin matmuls and few-channel convolutions run below
# peak. Chosen with benchmarks/bench_auto_rule.py: on one thread 16 and 32
# both pick the faster path in 28 of 30 cases, 64 in 24.
MACHINE_BALANCE = 32


class Op(NamedTuple):
    """One op: multiply-adds, and tensor elements read plus written."""

    macs: int
    elements: int


def roofline(op: Op) -> int:
    """Time of ``op`` in multiply-add units: ``max(macs, MACHINE_BALANCE · elements)``.

    Examples
    --------
    >>> from flora._cost import Op, roofline
    >>> roofline(Op(macs=10**9, elements=10**6))  # a large matmul: compute-bound
    1000000000
    >>> roofline(Op(macs=10**6, elements=10**6))  # a thin matmul: memory-bound
    32000000
    """
    return max(op.macs, MACHINE_BALANCE * op.elements)


def product(rows: int, inner: int, cols: int) -> Op:
    """The op ``(rows × inner) @ (inner × cols)``.

    Examples
    --------
    >>> from flora._cost import product
    >>> product(2, 3, 4)
    Op(macs=24, elements=26)
    """
    return Op(rows * inner * cols, rows * inner + inner * cols + rows * cols)


def chain_cost(ops: Sequence[Op], *, training: bool, input_grad: bool) -> int:
    """Cost of ops run one after the other, each with a trainable weight.

    Parameters
    ----------
    ops : sequence of Op
        The chain; the first op reads the chain's input.
    training : bool
        Whether the backward pass runs: then every op also computes its
        weight gradient, and the gradient of its input except for the
        first op when ``input_grad`` is false.
    input_grad : bool
        Whether the chain's input needs a gradient.

    Returns
    -------
    int
        Sum of :func:`roofline` over ops and passes.
    """
    total = 0
    for index, op in enumerate(ops):
        passes = 1
        if training:
            passes += 1 + int(input_grad or index > 0)
        total += passes * roofline(op)
    return total


def reconstruction_ops(
    shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int] | None = None
) -> list[Op]:
    """The mode products of :func:`flora._tucker.reconstruct`, in its order.

    Examples
    --------
    >>> from flora._cost import reconstruction_ops
    >>> reconstruction_ops((8, 6), (2, 3))
    [Op(macs=36, elements=36), Op(macs=96, elements=76)]
    """
    modes = range(len(shape)) if modes is None else modes
    current = list(ranks)
    ops = []
    for n in mode_order(shape, ranks, modes):
        size = math.prod(current)
        ops.append(Op(shape[n] * size, size + shape[n] * ranks[n] + size // ranks[n] * shape[n]))
        current[n] = shape[n]
    return ops


def choose(
    factorized: Sequence[Op],
    dense_op: Op,
    build: Sequence[Op],
    *,
    weight_elements: int,
    in_elements: int,
    out_elements: int,
    fused: bool,
    training: bool,
    input_grad: bool,
) -> str:
    """``"factorized"`` or ``"dense"``: whichever the roofline model finds cheaper.

    Only what differs from the base layer's own step is counted.

    Parameters
    ----------
    factorized : sequence of Op
        The factorized branch, first op on the layer input (weights that
        are only built from the core, such as a convolution's kernel core,
        go in as ops of their own).
    dense_op : Op
        The base op run with ``ΔW`` as its weight.
    build : sequence of Op
        Building ``ΔW`` (:func:`reconstruction_ops`).
    weight_elements : int
        Entries of ``ΔW``.
    in_elements, out_elements : int
        Entries of the layer input and output.
    fused : bool
        Whether the dense branch runs as one base op on ``W + ΔW``: it then
        adds ``W + ΔW`` and, with gradients, the weight gradient of the
        merged weight, and needs no sum of branch and base outputs.
    training : bool
        Whether gradients flow to the adapter.
    input_grad : bool
        Whether the layer input needs a gradient.

    Returns
    -------
    str
        ``"factorized"`` when strictly cheaper, else ``"dense"``.
    """
    # A separate branch adds its output to the base's, and (backward) its
    # input gradient to the base's.
    branch_sum = roofline(Op(0, 3 * out_elements))
    if training and input_grad:
        branch_sum += roofline(Op(0, 3 * in_elements))
    factorized_cost = chain_cost(factorized, training=training, input_grad=input_grad)
    factorized_cost += branch_sum
    dense_cost = chain_cost(build, training=training, input_grad=True)
    if fused:
        dense_cost += roofline(Op(0, 3 * weight_elements)) + int(training) * roofline(dense_op)
    else:
        dense_cost += chain_cost([dense_op], training=training, input_grad=input_grad)
        dense_cost += branch_sum
    return "factorized" if factorized_cost < dense_cost else "dense"
