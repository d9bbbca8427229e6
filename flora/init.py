r"""How a FLoRA adapter starts: ``"balanced"``, ``"zero_core"``, ``"gaussian"`` or ``"hosvd"``.

* ``"balanced"``: the LoRA-equivalent start (see :doc:`/initialisation`).
  The mode-0 factor ``U_0`` is zero, the core is an identity between mode
  0 and the other modes (:math:`G_{(0)} = [I \; 0]`, shape :math:`R_0 \times \prod_{n>0} R_n`)
  and the other factors carry PEFT's ``lora_A`` draw. A Linear adapter
  :math:`U_0 G U_1^\top` is then PEFT's LoRA with :math:`U_0 = \texttt{lora_B} = 0`, ``G = I``
  and :math:`U_1^\top` = ``lora_A`` (``kaiming_uniform_(a=sqrt(5))`` drawn on the
  ``(R_1, in)`` matrix, the very draw PEFT makes); an Embedding's ``U_1``
  is PEFT's ``lora_embedding_B`` (standard normal) and ``U_0`` its zero
  ``lora_embedding_A``. With ``scale = 1`` such an adapter has LoRA's
  (``lora_alpha = r``) outputs and gradients, and LoRA's learning rate
  suits it. Weights of three or more modes take ``U_1`` the same way
  (its rows of norm about ``1/sqrt(3)``, as PEFT's ``lora_A``) and
  orthonormal factors on modes 2 and above.
* ``"zero_core"`` (the paper's): core zeros, each factor ``U_n`` of shape
  ``(I_n, R_n)`` Kaiming-normal as the reference code does it
  (``kaiming_normal_(U, a=sqrt(3))``, i.e. standard deviation
  :math:`1/\sqrt{2 R_n}`). :math:`\Delta W = 0`, so the adapted model equals the base.
* ``"gaussian"``: core zeros, factors :math:`\mathcal{N}(0, 1/R_n^2)`, the Tucker analogue
  of PEFT's ``init_lora_weights="gaussian"``; also starts at :math:`\Delta W = 0`.
* ``"hosvd"``: the adapter is the truncated HOSVD of the pretrained weight
  ``W0`` at the adapter's ranks (core divided by the scale ``s``), and the
  layer's base keeps the residual :math:`W_0 - \Delta W`: the output is unchanged at
  start up to rounding (the Tucker analogue of PiSSA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["balanced_init", "hosvd_init", "init_factors"]


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


def _orthonormal(size: int, rank: int, **options) -> torch.Tensor:
    """A random ``(size, rank)`` matrix with orthonormal columns (QR of a Gaussian draw)."""
    draw = torch.randn(size, rank, dtype=torch.float64, device=options["device"])
    return torch.linalg.qr(draw).Q.to(options["dtype"])


def _lora_a(size: int, rank: int, **options) -> torch.Tensor:
    """PEFT's ``lora_A`` draw on the ``(rank, size)`` matrix, transposed to ``(size, rank)``."""
    draw = torch.empty(rank, size, **options)
    torch.nn.init.kaiming_uniform_(draw, a=math.sqrt(5))
    return draw.T.contiguous()


def balanced_init(
    kind: str, shape: Sequence[int], ranks: Sequence[int], **options
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""Core and factors of ``init="balanced"`` (see the module); :math:`\Delta W = 0` exactly.

    Parameters
    ----------
    kind : str
        The layer kind: ``"Embedding"`` draws ``U_1`` standard normal (PEFT's
        ``lora_embedding_B``); every other kind draws it as PEFT's ``lora_A``.
    shape, ranks : sequence of int
        The weight's shape and the adapter's usable ranks (:math:`R_0 \le
        \prod_{n>0} R_n`); a 1-D weight gets :math:`U_0 = 0` and core ``[1]``.
    **options
        ``dtype`` and ``device`` of the tensors.

    Returns
    -------
    core : torch.Tensor
        :math:`G_{(0)} = [I \; 0]`.
    factors : list of torch.Tensor
        :math:`U_0 = 0`, ``U_1`` as above, orthonormal ``U_n`` for ``n >= 2``.

    Examples
    --------
    >>> import math
    >>> import torch
    >>> from flora.init import balanced_init
    >>> _ = torch.manual_seed(0)
    >>> core, factors = balanced_init("Linear", (4, 6), (2, 2), dtype=torch.float32, device="cpu")
    >>> core
    tensor([[1., 0.],
            [0., 1.]])
    >>> _ = torch.manual_seed(0)
    >>> lora_a = torch.empty(2, 6)
    >>> _ = torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    >>> bool(torch.equal(factors[1].T, lora_a)), bool(factors[0].eq(0).all())
    (True, True)
    """
    ranks = tuple(ranks)
    if options["device"] == torch.device("meta") or str(options["device"]) == "meta":
        core = torch.empty(ranks, **options)
        return core, [torch.empty(i, r, **options) for i, r in zip(shape, ranks, strict=True)]
    with torch.no_grad():
        core = torch.zeros(ranks[0], math.prod(ranks[1:]), **options)
        core.fill_diagonal_(1.0)
        factors = [torch.zeros(shape[0], ranks[0], **options)]
        if kind == "Embedding":
            factors.append(torch.empty(shape[1], ranks[1], **options).normal_())
        elif len(shape) > 1:
            factors.append(_lora_a(shape[1], ranks[1], **options))
        factors += [
            _orthonormal(i, r, **options) for i, r in zip(shape[2:], ranks[2:], strict=True)
        ]
        return core.reshape(ranks), factors


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
