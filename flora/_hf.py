"""Hugging Face models with adapters: keep ``save_pretrained`` from writing the adapted layout."""

from __future__ import annotations

from typing import Any

from torch import nn

from flora.layers import AdaptedWeight, ModulesToSave

__all__ = ["guard_save_pretrained", "release_save_pretrained"]


class _SavePretrainedGuard:
    """Stands in for a Hugging Face model's ``save_pretrained`` while it holds FLoRA adapters.

    Without an explicit ``state_dict`` the checkpoint would hold the adapted
    layout (``base_layer``, ``adapters`` keys), which ``from_pretrained``
    does not recognise: it initializes those weights randomly with only a
    logged warning.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _has_adapters(self.model) and kwargs.get("state_dict") is None:
            raise RuntimeError(
                "this model holds FLoRA adapters, so its state dict is not the plain model's "
                "and from_pretrained would silently re-initialize the adapted layers; save "
                "with model.save_pretrained(directory, state_dict=flora.merged_state_dict(model)) "
                "or call flora.unload(model) first (flora.save_adapter saves the adapter alone)"
            )
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` refuse to write the adapted layout (Hugging Face models)."""
    guarded = isinstance(model.__dict__.get("save_pretrained"), _SavePretrainedGuard)
    if callable(getattr(type(model), "save_pretrained", None)) and not guarded:
        model.save_pretrained = _SavePretrainedGuard(model)


def release_save_pretrained(model: nn.Module) -> None:
    """Undo :func:`guard_save_pretrained` once no adapter is left."""
    guarded = isinstance(model.__dict__.get("save_pretrained"), _SavePretrainedGuard)
    if guarded and not _has_adapters(model):
        del model.__dict__["save_pretrained"]


def _has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (AdaptedWeight, ModulesToSave)) for m in model.modules())
