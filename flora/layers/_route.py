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
    _indices: dict[tuple, tuple[torch.Tensor, slice | None]] = field(
        default_factory=dict, repr=False
    )
    _gathered: dict[str, tuple] = field(default_factory=dict, repr=False)

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

    def _rows(
        self, groups: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, slice | None]:
        """The samples of some groups: their indices on ``device``, and a slice if contiguous."""
        key = (groups, device)
        if key not in self._indices:
            rows = sorted(i for g in groups for i in self.groups[g][1])
            contiguous = rows[-1] - rows[0] + 1 == len(rows)
            span = slice(rows[0], rows[-1] + 1) if contiguous else None
            self._indices[key] = (torch.tensor(rows, device=device), span)
        return self._indices[key]

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
        runs: dict[object, list[int]] = {}
        for group, key in enumerate(keys):
            runs.setdefault(key, []).append(group)
        if len(runs) == 1:
            return call(keys[0], x)
        out = None
        for key, groups in runs.items():
            index, span = self._rows(tuple(groups), x.device)
            samples = x if lead == 1 else self._take(x, tuple(groups), index, span)
            result = call(key, samples)
            if not isinstance(result, torch.Tensor) or result.ndim == 0:
                raise ValueError(
                    f"module {where!r} returns a {type(result).__name__}; per-sample routing "
                    "gathers tensors with the samples first"
                )
            if lead == 1:
                result = result.expand(len(index), *result.shape[1:])
            if out is None:
                out = result.new_empty((self.batch, *result.shape[1:]))
            out.index_copy_(0, index, result)
        return out

    def _take(
        self, x: torch.Tensor, groups: tuple[int, ...], index: torch.Tensor, span: slice | None
    ) -> torch.Tensor:
        """Samples ``index`` of ``x``: a view when contiguous, else a gathered copy.

        The last gathers are kept for the input they came from: layers that
        read the same tensor (a block's query, key and value) share them.
        """
        if span is not None:
            return x[span]
        source, version, gathered = self._gathered.get("last", (None, -1, {}))
        if source is not x or version != x._version:
            gathered = {}
            self._gathered["last"] = (x, x._version, gathered)
        if groups not in gathered:
            gathered[groups] = x.index_select(0, index)
        return gathered[groups]


def routed(routes: dict[int, tuple[Route, str]]) -> tuple[Route, str] | None:
    """The route of the calling thread's forward, if it routes (``routes`` is a module's)."""
    return routes.get(threading.get_ident()) if routes else None
