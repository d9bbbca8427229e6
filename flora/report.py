"""`summary`: a per-layer table of a model's adapters and PEFT's parameter line."""

from __future__ import annotations

from torch import nn

from flora._apply import adapter_names, current_active, find_adapted, find_saved
from flora._args import check_model
from flora.spec import LayerSpec

__all__ = ["parameter_counts", "summary"]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter entries, each shared parameter counted once.

    The same numbers as PEFT's ``get_nb_trainable_parameters``.

    Examples
    --------
    >>> import torch
    >>> from flora.report import parameter_counts
    >>> parameter_counts(torch.nn.Linear(3, 2))
    (8, 8)
    """
    trainable = total = 0
    for _, param in check_model(model).named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _ranks(spec: LayerSpec) -> str:
    return f"{spec.ranks}+b" if spec.bias else str(spec.ranks)


def summary(model: nn.Module) -> str:
    r"""A table of the adapted layers and saved modules, and PEFT's parameter line.

    One row per adapted layer: its name, kind, weight shape, the ranks of
    each adapter (a column per adapter; ``*`` marks the active ones, ``-``
    a layer without that adapter, ``+b`` an adapter that also carries a
    bias update :math:`\Delta b`) and the adapter parameters it holds (cores, factors
    and bias updates); then one row per saved module (``modules_to_save``).
    The last line is exactly what PEFT's ``print_trainable_parameters``
    prints: ``trainable params: N || all params: M || trainable%: P``.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    str
        The table, lines joined by newlines (no trailing newline).

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``.

    See Also
    --------
    flora.trainable_parameters : The first number alone.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = flora.inject(model, flora.FLoRAConfig(ranks=4, target_modules=["0"],
    ...                                           modules_to_save=["2"]))
    >>> print(flora.summary(model))
    layer  kind    shape    default*  params
    0      Linear  (8, 16)  (4, 4)    112
    2      saved   Linear   copy      18
    trainable params: 130 || all params: 284 || trainable%: 45.7746
    """
    names = adapter_names(check_model(model))
    active = set(current_active(model))
    rows = [
        ["layer", "kind", "shape", *(n + ("*" if n in active else "") for n in names), "params"]
    ]
    for layer_name, layer in find_adapted(model).items():
        ranks = [_ranks(layer.adapters[n].spec) if n in layer.adapters else "-" for n in names]
        params = sum(a.spec.n_params for a in layer.adapters.values())
        rows.append([layer_name, layer.kind, str(layer.shape), *ranks, str(params)])
    for module_name, wrapper in find_saved(model).items():
        copies = ["copy" if n in wrapper.copies else "-" for n in names]
        params = sum(p.numel() for m in wrapper.copies.values() for p in m.parameters())
        kind = type(wrapper.original_module).__name__
        rows.append([module_name, "saved", kind, *copies, str(params)])
    trainable, total = parameter_counts(model)
    percent = 100 * trainable / total if total else 0.0
    line = (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )
    return "\n".join([*_table(rows), line]) if len(rows) > 1 else line
