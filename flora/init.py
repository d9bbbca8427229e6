"""How a FLoRA adapter starts: ``"zero_core"``, ``"gaussian"`` or ``"hosvd"``.

* ``"zero_core"`` (the paper's): core zeros, each factor ``U_n`` of shape
  ``(I_n, R_n)`` Kaiming-normal as the reference code does it
  (``kaiming_normal_(U, a=sqrt(3))``, i.e. standard deviation
  ``1/sqrt(2 R_n)``). ``ΔW = 0``, so the adapted model equals the base.
* ``"gaussian"``: core zeros, factors ``N(0, 1/R_n²)``, the Tucker analogue
  of PEFT's ``init_lora_weights="gaussian"``; also starts at ``ΔW = 0``.
* ``"hosvd"``: the adapter is the truncated HOSVD of the pretrained weight
  ``W0`` at the adapter's ranks (core divided by the scale ``s``), and the
  layer's base keeps the residual ``W0 - ΔW``: the output is unchanged at
  start up to rounding (the Tucker analogue of PiSSA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["hosvd_init", "init_factors"]


def init_factors(factors: Sequence[torch.Tensor], init: str) -> None:
    """Fill the factors in place for ``init="zero_core"`` or ``"gaussian"``.

    Parameters
    ----------
    factors : sequence of torch.Tensor
        Factors of shape ``(I_n, R_n)``.
    init : {"zero_core", "gaussian"}
        The initialization; see the module docstring.

    Raises
    ------
    ValueError
        For any other ``init``.

    Examples
    --------
    >>> import torch
    >>> from flora.init import init_factors
    >>> _ = torch.manual_seed(0)
    >>> u = torch.empty(4096, 8)
    >>> init_factors([u], "zero_core")
    >>> round(u.std().item(), 2)  # 1 / sqrt(2 * 8)
    0.25
    """
    with torch.no_grad():
        for factor in factors:
            if init == "zero_core":
                torch.nn.init.kaiming_normal_(factor, a=math.sqrt(3))
            elif init == "gaussian":
                factor.normal_(0.0, 1.0 / factor.shape[1])
            else:
                raise ValueError(f"init must be 'zero_core' or 'gaussian' here, got {init!r}")


def hosvd_init(
    weight: torch.Tensor, ranks: Sequence[int], scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""Core and factors of the truncated HOSVD of ``weight``, core divided by ``scale``.

    Parameters
    ----------
    weight : torch.Tensor
        The pretrained weight ``W0``.
    ranks : sequence of int
        The adapter's ranks, one per mode.
    scale : float
        The adapter's ``s``: :math:`s \cdot \text{core} \times_n \text{factors}[n]` is the HOSVD
        approximation of ``W0``.
    dtype : torch.dtype
        The adapter's dtype; the decomposition runs in it (at least float32).

    Returns
    -------
    core : torch.Tensor
    factors : list of torch.Tensor
        Orthonormal, sign-fixed factors of shape ``(I_n, R_n)``.

    Examples
    --------
    >>> import torch
    >>> from flora.init import hosvd_init
    >>> w = torch.randn(6, 5, dtype=torch.float64)
    >>> core, factors = hosvd_init(w, (5, 5), 2.0, torch.float64)
    >>> bool(torch.allclose(2.0 * factors[0] @ core @ factors[1].T, w))
    True
    """
    from tuckerlib import hosvd

    with torch.no_grad():
        tucker = hosvd(weight.detach().to(dtype), tuple(ranks))
        core, factors = tucker
        return core / scale, [f.contiguous() for f in factors]
