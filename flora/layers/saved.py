"""Whole modules trained and saved with an adapter (``FLoRAConfig.modules_to_save``).

:class:`~flora.ModulesToSave` takes a module's place in the model and keeps the
original next to one trainable copy per adapter. A call runs the copy of the
active adapter, or the original when no active adapter has a copy or inside
:func:`flora.disable_adapter`. At most one active adapter may have a copy in
a given wrapper.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flora.layers._route import Route, routed
from flora.layers.base import check_adapter_name

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """A module replaced by per-adapter trainable copies; the original stays frozen.

    Parameters
    ----------
    original_module : torch.nn.Module
        The module to wrap, kept as ``self.original_module``.

    Attributes
    ----------
    copies : torch.nn.ModuleDict
        Adapter name to that adapter's copy of the module.
    active_adapters : tuple of str
        As in :class:`flora.AdaptedWeight`.
    disabled : bool
        Inside :func:`flora.disable_adapter`: the original module runs.

    Notes
    -----
    Attributes the wrapper does not have are read from the module that runs
    (``wrapper.weight`` is the active copy's weight), as code written for
    the original module expects.

    Examples
    --------
    >>> import torch
    >>> from flora.layers.saved import ModulesToSave
    >>> head = torch.nn.Linear(4, 2)
    >>> wrapper = ModulesToSave(head)
    >>> wrapper.add_copy("default")
    >>> wrapper.set_adapter("default")
    >>> wrapper.weight is wrapper.copies["default"].weight, wrapper.weight.requires_grad
    (True, True)
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.trainable: dict[str, bool] = {}
        # Per-sample routes of the forwards running now, by thread (flora._routing).
        self._routes: dict[int, tuple[Route, str]] = {}

    def add_copy(
        self, name: str, module: nn.Module | None = None, *, trainable: bool = True
    ) -> None:
        """Add adapter ``name``'s copy (default: a deep copy of the original module).

        Raises
        ------
        ValueError
            If the name is invalid or already has a copy.
        """
        check_adapter_name(name)
        if name in self.copies:
            raise ValueError(f"this module already has a copy for adapter {name!r}")
        self.copies[name] = copy.deepcopy(self.original_module) if module is None else module
        self.trainable[name] = bool(trainable)
        self.copies[name].requires_grad_(bool(trainable) and name in self.active_adapters)

    def remove_copy(self, name: str) -> nn.Module:
        """Take adapter ``name``'s copy out and return it."""
        module = self.copies[name]
        del self.copies[name]
        del self.trainable[name]
        return module

    def active_name(self, names: Sequence[str] | None = None) -> str | None:
        """The adapter among ``names`` (default: the active ones) that has a copy here.

        Raises
        ------
        ValueError
            If more than one of them has a copy.
        """
        names = self.active_adapters if names is None else names
        present = [n for n in names if n in self.copies]
        if len(present) > 1:
            raise ValueError(
                f"adapters {present} each have a copy of this module; at most one of them "
                "can be active at a time"
            )
        return present[0] if present else None

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` active: their copy runs and, if trainable, requires gradients."""
        names = (names,) if isinstance(names, str) else tuple(names)
        self.active_name(names)
        self.active_adapters = names
        for name, module in self.copies.items():
            module.requires_grad_(self.trainable[name] and name in names)

    def running_module(self) -> nn.Module:
        """The module a call runs now: the active copy, else the original."""
        name = None if self.disabled else self.active_name()
        return self.original_module if name is None else self.copies[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call :meth:`running_module` with the arguments.

        In a forward routed per sample (``model(..., adapter_names=[...])``)
        each sample's adapter copy (the original for adapters without one
        and ``"__base__"``) runs on its samples of the first argument.
        """
        route = routed(self._routes)
        if route is None:
            return self.running_module()(*args, **kwargs)
        route, where = route
        copies = dict(self.copies.items())
        keys = [copies.get(n, self.original_module) for n, _ in route.groups]
        if len(set(map(id, keys))) == 1:
            return keys[0](*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(
                f"module {where!r} is called without a tensor as its first argument; "
                "per-sample routing splits the first argument by sample"
            )
        rest = args[1:]
        return route.run(where, args[0], keys, lambda module, xs: module(xs, *rest, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "copies" not in modules:
                raise
        return getattr(self.running_module(), name)

    def extra_repr(self) -> str:
        """Active adapters, for ``repr``."""
        return f"active={list(self.active_adapters)}"
