r"""The cost model behind ``forward="auto"``: a roofline estimate per op.

Each op of a branch is an :class:`Op`: its multiply-adds and the tensor elements it reads and writes
(inputs, weight, output). Its time is taken as
:math:`\max(\text{macs}, \text{MACHINE_BALANCE} \cdot \text{elements}) + \text{OP_OVERHEAD}` in
units of one multiply-add: an op is bound either by arithmetic or by memory traffic, whichever is
slower, plus a fixed cost per op. Thin matmuls and few-channel convolutions, which a plain flop
count makes look nearly free, are memory-bound here and cost what moving their activations costs;
ops without arithmetic (gathers, sums) stream their elements at ``STREAM_BALANCE``.

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

import torch

from flora._tucker import mode_order

__all__ = [
    "MACHINE_BALANCE",
    "OP_OVERHEAD",
    "STREAM_BALANCE",
    "Op",
    "chain_cost",
    "choose",
    "grouped_weight_grad",
    "product",
    "reconstruction_ops",
    "roofline",
]

# Multiply-adds per tensor element read or written (float32: 8 per byte) at
# which an op turns from memory-bound to compute-bound. An effective balance,
# not a datasheet one: thin matmuls and few-channel convolutions run below
# peak. Ops without multiply-adds (gathers, sums, copies) stream their
# elements at STREAM_BALANCE instead, and every op pays OP_OVERHEAD on top
# (dispatch, allocation, autograd bookkeeping): the ops of a small branch cost
# more than their arithmetic. Chosen with benchmarks/bench_auto_rule.py by
# replaying its 30 timed cases over a grid of the three constants, on two
# machines' timings: these pick the faster path, or either where the two are
# within noise, in 30 and 29 of 30 cases (the balance alone: 27 and 26).
MACHINE_BALANCE = 32
STREAM_BALANCE = 8
OP_OVERHEAD = 4_000_000


class Op(NamedTuple):
    """One op: multiply-adds, and tensor elements read plus written."""

    macs: int
    elements: int


def roofline(op: Op) -> int:
    r"""Time of ``op`` in multiply-adds: :math:`\max(\text{macs}, \beta \cdot \text{elements}) + c`.

    :math:`\beta` is :data:`MACHINE_BALANCE`, or :data:`STREAM_BALANCE` for an op
    without multiply-adds.

    Examples
    --------
    >>> from flora._cost import Op, roofline
    >>> roofline(Op(macs=10**9, elements=10**6))  # a large matmul: compute-bound
    1004000000
    >>> roofline(Op(macs=10**6, elements=10**6))  # a thin matmul: memory-bound
    36000000
    >>> roofline(Op(macs=0, elements=10**6))  # a sum: streams its elements
    12000000
    """
    balance = MACHINE_BALANCE if op.macs else STREAM_BALANCE
    return max(op.macs, balance * op.elements) + OP_OVERHEAD


def product(rows: int, inner: int, cols: int) -> Op:
    r"""The op :math:`(\text{rows} \times \text{inner}) @ (\text{inner} \times \text{cols})`.

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
    r"""``"factorized"`` or ``"dense"``: whichever the roofline model finds cheaper.

    Only what differs from the base layer's own step is counted.

    Parameters
    ----------
    factorized : sequence of Op
        The factorized branch, first op on the layer input (weights that
        are only built from the core, such as a convolution's kernel core,
        go in as ops of their own).
    dense_op : Op
        The base op run with :math:`\Delta W` as its weight.
    build : sequence of Op
        Building :math:`\Delta W` (:func:`reconstruction_ops`).
    weight_elements : int
        Entries of :math:`\Delta W`.
    in_elements, out_elements : int
        Entries of the layer input and output.
    fused : bool
        Whether the dense branch runs as one base op on :math:`W + \Delta W`: it then
        adds :math:`W + \Delta W` and, with gradients, the weight gradient of the
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


def grouped_weight_grad(
    x: torch.Tensor, weight_shape: Sequence[int], groups: int, dilation: Sequence[int]
) -> str:
    """How a grouped convolution's weight gradient runs fastest: a method of ``grouped_conv``.

    Only the CPU has a choice: oneDNN runs a grouped weight gradient in
    NCHW with a direct kernel for depthwise kernels of at most 3 taps an
    axis and for groups of at least 8 input and 8 output channels, and as
    im2col plus one small GEMM per group otherwise, several times slower.
    A depthwise kernel (one input channel a group) takes ``"swapped"``, one
    forward depthwise convolution with the output gradient as its kernels,
    which oneDNN runs directly for any kernel size and which beat the
    native kernel even where that is direct (3×3: 0.69 of its step time);
    other undilated groups outside the direct NCHW cases take
    ``"channels_last"``, where oneDNN's backward kernel is direct (a dilated
    one runs as im2col there too, and slower, so it stays ``"native"``).
    ``benchmarks/bench_auto_rule.py`` times every method on a set of shapes
    against this rule.

    Parameters
    ----------
    x : torch.Tensor
        The convolution's batched input (only its device is read).
    weight_shape : sequence of int
        ``(out, in/groups, *kernel)``, two or three kernel axes.
    groups : int
        The convolution's groups.
    dilation : sequence of int
        The convolution's dilation, one per kernel axis.

    Returns
    -------
    str
        ``"native"``, ``"channels_last"`` or ``"swapped"``.

    Examples
    --------
    >>> import torch
    >>> from flora._cost import grouped_weight_grad
    >>> x = torch.empty(8, 96, 56, 56)
    >>> grouped_weight_grad(x, (96, 1, 7, 7), 96, (1, 1))  # depthwise 7×7
    'swapped'
    >>> grouped_weight_grad(x, (96, 16, 3, 3), 6, (1, 1))  # direct in NCHW
    'native'
    >>> grouped_weight_grad(x, (96, 4, 3, 3), 24, (1, 1))  # 4 channels a group
    'channels_last'
    """
    out_channels, in_per_group, *kernel = weight_shape
    if x.device.type != "cpu" or groups == 1 or math.prod(kernel) == 1:
        return "native"
    if in_per_group == 1:
        return "swapped"
    if max(dilation) == 1 and not (in_per_group >= 8 and out_channels // groups >= 8):
        return "channels_last"
    return "native"
