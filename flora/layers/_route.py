"""One routed forward: which adapter each sample of the batch runs (``adapter_names=``).

:func:`flora._routing` builds a :class:`Route` when a model is called with
``adapter_names=[...]`` and hands it to every FLoRA layer and saved module
for the length of that call. A layer splits its input into the groups of
samples that share an adapter, runs each group as if that adapter alone were
active, and puts the outputs back in batch order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["BASE", "Route", "routed"]

#: The name that routes a sample to the base model (no adapter), as in PEFT.
BASE = "__base__"


@dataclass(frozen=True)
class Route:
    """The samples of each adapter in one batch.

    Attributes
    ----------
    names : tuple of str
        The adapter of each sample (:data:`BASE` for none).
    groups : tuple of (str, tuple of int)
        Each adapter named, in order of first appearance, with its sample
        indices.
    """

    names: tuple[str, ...]
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    _indices: dict[torch.device, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Route:
        """The route of a batch whose sample ``i`` runs adapter ``names[i]``.

        Examples
        --------
        >>> from flora.layers._route import Route
        >>> Route.from_names(["a", "__base__", "a"]).groups
        (('a', (0, 2)), ('__base__', (1,)))
        """
        members: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            members.setdefault(name, []).append(index)
        return cls(tuple(names), tuple((name, tuple(idx)) for name, idx in members.items()))

    @property
    def batch(self) -> int:
        """The batch size."""
        return len(self.names)

    def indices(self, device: torch.device) -> list[torch.Tensor]:
        """Each group's sample indices, then the order that undoes the grouping, on ``device``."""
        if device not in self._indices:
            tensors = [torch.tensor(idx, device=device) for _, idx in self.groups]
            grouped = torch.cat(tensors)
            order = torch.empty_like(grouped)
            order[grouped] = torch.arange(len(grouped), device=device)
            self._indices[device] = [*tensors, order]
        return self._indices[device]

    def run(
        self,
        where: str,
        x: torch.Tensor,
        keys: Sequence[object],
        call: Callable[[object, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``call(key, samples)`` per group, outputs gathered back in batch order.

        Parameters
        ----------
        where : str
            The module's name, for errors.
        x : torch.Tensor
            The input, batch first; a leading dimension of 1 is broadcast
            (position ids shared by the batch, say).
        keys : sequence
            One key per group (what the group runs); groups with equal keys
            run together, and a single key runs the whole input at once.
        call : callable
            Runs one key on some samples and returns a tensor, batch first.

        Raises
        ------
        ValueError
            If ``x``'s leading dimension is neither the batch size nor 1, or
            an output is not a tensor with the samples first.
        """
        lead = x.shape[0] if x.ndim else None
        if lead not in (self.batch, 1):
            raise ValueError(
                f"adapter_names routes a batch of {self.batch}, but module {where!r} got an "
                f"input of shape {list(x.shape)}: per-sample routing needs the batch first"
            )
        distinct = list(dict.fromkeys(keys))
        if len(distinct) == 1:
            return call(distinct[0], x)
        *tensors, order = self.indices(x.device)
        pairs = list(zip(keys, tensors, strict=True))
        runs = {key: [t for k, t in pairs if k == key] for key in distinct}
        outputs, used = [], []
        for key, parts in runs.items():
            index = parts[0] if len(parts) == 1 else torch.cat(parts)
            samples = x if lead == 1 else x.index_select(0, index)
            out = call(key, samples)
            if not isinstance(out, torch.Tensor) or out.ndim == 0:
                raise ValueError(
                    f"module {where!r} returns a {type(out).__name__}; per-sample routing "
                    "gathers tensors with the samples first"
                )
            outputs.append(out.expand(len(index), *out.shape[1:]) if lead == 1 else out)
            used.append(index)
        if len(runs) < len(tensors):
            # Groups that run together came out in run order: reorder by the runs' indices.
            grouped = torch.cat(used)
            order = torch.empty_like(grouped)
            order[grouped] = torch.arange(len(grouped), device=grouped.device)
        return torch.cat(outputs).index_select(0, order)


def routed(routes: dict[int, tuple[Route, str]]) -> tuple[Route, str] | None:
    """The route of the calling thread's forward, if it routes (``routes`` is a module's)."""
    return routes.get(threading.get_ident()) if routes else None
