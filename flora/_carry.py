r"""The fine-tune's 1-D tensors (biases, norms) carried into an extracted adapter.

Two homes, chosen so that every lifecycle operation can give the base back:

* the bias of an adapted Linear or ConvNd layer becomes the adapter's bias
  update :math:`\Delta b` (PEFT's ``lora_bias``): added to the output while the
  adapter runs, into the bias when it is merged, and never written into the
  base otherwise;
* a module whose tensors are all 1-D or scalars (a BatchNorm, LayerNorm or
  GroupNorm with its running statistics) is saved whole with the adapter
  (``modules_to_save``): the adapter runs its copy, the original stays.

Other changed 1-D tensors (the bias of a layer that is not adapted, a
vector parameter of a module with larger weights) have no home that leaves
the base untouched and are reported as not carried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flora.spec import BIAS_KINDS
from tuckerlib.io import Checkpoint

__all__ = ["CARRIED_BIAS", "CARRIED_MODULE", "Carried", "bias_delta", "carry"]

CARRIED_BIAS = "bias update of its adapted layer"
CARRIED_MODULE = "saved with its module (modules_to_save)"
_NOT_CARRIED = (
    "changed 1-D tensor that is neither the bias of an adapted layer nor part of a module "
    "of 1-D tensors: not carried"
)

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class Carried:
    """What :func:`carry` found: bias updates, saved module states, and the tensors' fate."""

    #: Adapted layer name to its bias update ``Δb``.
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Module name to the ``state_dict`` its saved copy holds (the tuned tensors).
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: ``(tensor, how)`` of every carried tensor.
    carried: list[tuple[str, str]] = field(default_factory=list)
    #: ``(tensor, reason)`` of the changed 1-D tensors that are not carried.
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """The tensor in its stored dtype (bfloat16 widened on read, narrowed back exactly)."""
    return torch.from_numpy(np.array(checkpoint.read(name))).to(
        _TORCH_DTYPES[checkpoint.info(name).dtype]
    )


def bias_delta(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    r""":math:`\Delta b = \text{tuned} - \text{base}`, in float64 for float64 biases, else float32.

    The difference of two float16 or bfloat16 numbers is a float32 number,
    so merging gives the tuned bias back bit for bit; for float32 biases it
    does wherever the difference is a float32 number (always when the bias
    kept its sign and at most doubled or halved, by Sterbenz's lemma), and
    is one rounding away elsewhere (a bias that shrank to almost zero).
    """
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    return tuned.to(dtype) - base.to(dtype)


def _comparable(base: Checkpoint, tuned: Checkpoint, name: str) -> bool:
    if name not in base or name not in tuned:
        return False
    info = tuned.info(name)
    return base.info(name).shape == info.shape and len(info.shape) <= 1


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def carry(
    base: Checkpoint,
    tuned: Checkpoint,
    layers: Mapping[str, str],
    candidates: Sequence[str],
) -> Carried:
    """Sort the 1-D tensors ``candidates`` into bias updates, saved modules and the rest.

    Parameters
    ----------
    base, tuned : Checkpoint
        The checkpoints.
    layers : dict of str to str
        Adapted layer name to its kind.
    candidates : sequence of str
        Tensor names that passed the name filters and are not adapted.
    """
    result = Carried()
    vectors = [n for n in candidates if _comparable(base, tuned, n)]
    for layer, kind in layers.items():
        name = f"{layer}.bias"
        if kind in BIAS_KINDS and name in vectors and tuned.info(name).is_floating:
            delta = bias_delta(_tensor(base, name), _tensor(tuned, name))
            if _finite(delta):
                result.biases[layer] = delta
                result.carried.append((name, CARRIED_BIAS))
            else:
                result.skipped.append((name, "bias change holds NaN or infinite values"))
    done = {name for name, _ in result.carried + result.skipped}
    owners: dict[str, list[str]] = {}
    for name in vectors:
        if name not in done:
            owners.setdefault(name.rpartition(".")[0], []).append(name)
    for module, names in owners.items():
        _carry_module(base, tuned, module, names, set(layers), result)
    return result


def _carry_module(
    base: Checkpoint,
    tuned: Checkpoint,
    module: str,
    names: list[str],
    layers: set[str],
    result: Carried,
) -> None:
    changed = [n for n in names if not torch.equal(_tensor(base, n), _tensor(tuned, n))]
    if not changed:
        return
    members = [n for n in tuned if n.startswith(f"{module}.")]
    plain = all(
        "." not in n[len(module) + 1 :]
        and _comparable(base, tuned, n)
        and tuned.info(n).dtype in _TORCH_DTYPES
        for n in members
    )
    if not module or module in layers or not plain:
        result.skipped += [(n, _NOT_CARRIED) for n in changed]
        return
    state = {n[len(module) + 1 :]: _tensor(tuned, n) for n in members}
    if not all(_finite(t) for t in state.values()):
        result.skipped += [(n, "holds NaN or infinite values") for n in changed]
        return
    result.modules[module] = state
    result.carried += [(n, CARRIED_MODULE) for n in members]
