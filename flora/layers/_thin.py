r"""Products with a thin factor whose gradient comes out as a wide product.

The factorized forward multiplies many tokens by thin factors ``U`` of shape
``(I, R)`` with ``R`` small. Autograd forms the factor's gradient as
:math:`x^\top g`, an ``(I, R)`` product of two tall operands; BLAS runs the same
numbers several times faster as the wide product :math:`(g^\top x)^\top` of shape
``(R, I)`` (measured on MKL for a 2048-token batch of a 1024×1024 Linear at
rank 8: 14 ms against 6 ms for a training step of the branch). These
functions compute exactly the plain products and their gradients, only in
that orientation, with the factor kept contiguous as ``(I, R)``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["thin_matmul", "thin_matmul_t"]


def _flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, a.shape[-1])


class _ThinMatmul(torch.autograd.Function):
    r"""``x @ u``; ``u``'s gradient as :math:`(g^\top x)^\top`."""

    @staticmethod
    def forward(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x @ u

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, u = ctx.saved_tensors
        # Under autocast the product ran in g's dtype: differentiate in it too.
        grad_x = (g @ u.to(g.dtype).T).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = (_flat(g).T @ _flat(x).to(g.dtype)).T.to(u.dtype)
        return grad_x, grad_u


class _ThinMatmulT(torch.autograd.Function):
    r""":math:`h @ u^\top`; ``u``'s gradient as :math:`(h^\top g)^\top`."""

    @staticmethod
    def forward(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return h @ u.T

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, u = ctx.saved_tensors
        grad_h = (g @ u.to(g.dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = (_flat(h).to(g.dtype).T @ _flat(g)).T.to(u.dtype)
        return grad_h, grad_u


def thin_matmul(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x @ u`` for a thin ``u`` of shape ``(I, R)``; ``x`` of shape ``(..., I)``.

    Examples
    --------
    >>> import torch
    >>> from flora.layers._thin import thin_matmul
    >>> x, u = torch.randn(5, 3, 8), torch.randn(8, 2, requires_grad=True)
    >>> torch.equal(thin_matmul(x, u), x @ u)
    True
    """
    if torch.compiler.is_compiling():
        # The compiler picks its own layouts; a custom autograd.Function only
        # costs it tracing time.
        return x @ u
    return _ThinMatmul.apply(x, u)


def thin_matmul_t(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r""":math:`h @ u^\top` for a thin ``u`` of shape ``(O, R)``; ``h`` of shape ``(..., R)``.

    Examples
    --------
    >>> import torch
    >>> from flora.layers._thin import thin_matmul_t
    >>> h, u = torch.randn(5, 3, 2), torch.randn(8, 2, requires_grad=True)
    >>> torch.equal(thin_matmul_t(h, u), h @ u.T)
    True
    """
    if torch.compiler.is_compiling():
        return torch.nn.functional.linear(h, u)
    return _ThinMatmulT.apply(h, u)
