"""Hugging Face models with adapters: ``save_pretrained`` writes the adapter, as PEFT's does.

While a model holds FLoRA adapters, ``model.save_pretrained(directory)``
writes the active adapter (:func:`flora.save_adapter`'s two files) and, in
``model.safetensors``, the adapters' and saved modules' tensors under the
model's own keys: ``transformers.Trainer`` resumes from that file
(``load_state_dict(..., strict=False)``) and loads its best checkpoint from
it, so checkpoints and resume work without a ``Trainer`` subclass. The base
weights are not written; the folder has no ``config.json``, so
``from_pretrained`` cannot take it for a full model. A full-weights save
needs ``state_dict=flora.merged_state_dict(model)``; a state dict in the
adapted layout (``base_layer``, ``adapters`` keys), which ``from_pretrained``
would silently re-initialize, is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from flora.layers import AdaptedWeight, ModulesToSave

__all__ = [
    "TRAINING_STATE_NAME",
    "guard_save_pretrained",
    "release_save_pretrained",
    "training_state",
]

#: The file ``transformers.Trainer`` resumes from: the adapters' tensors under the model's keys.
TRAINING_STATE_NAME = "model.safetensors"
#: ``save_pretrained`` keywords that change nothing for an adapter folder.
_IGNORED = ("safe_serialization", "max_shard_size", "variant", "save_original_format")


def _state_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the adapters' and saved copies' entries of ``model.state_dict()``."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    modules = list(model.modules())
    prefixes = [names[id(m.adapters)] + "." for m in modules if isinstance(m, AdaptedWeight)]
    prefixes += [names[id(m.copies)] + "." for m in modules if isinstance(m, ModulesToSave)]
    return tuple(prefixes)


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' and saved copies' entries of ``model.state_dict()`` (no base weights)."""
    prefixes = _state_prefixes(model)
    return {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in model.state_dict().items()
        if key.startswith(prefixes)
    }


class _TrainingStateLoad:
    """Load hooks: loading a whole training state does not report the base as missing.

    ``Trainer`` resumes with ``model.load_state_dict(state, strict=False)``
    and warns about every missing key; the base weights are missing from
    the training state by design. A state dict whose keys are exactly the
    model's training-state keys (what ``save_pretrained`` wrote) reports
    no missing base weights, also with ``strict=True`` (torch does not tell
    the hooks which); any other state dict reports as before.
    """

    def __init__(self, model: nn.Module):
        self.partial = False
        self.handles = [
            model.register_load_state_dict_pre_hook(self.before),
            model.register_load_state_dict_post_hook(self.after),
        ]

    def before(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any
    ) -> None:
        prefixes = _state_prefixes(module)
        state = {k for k in module.state_dict() if k.startswith(prefixes)}
        keys = {key[len(prefix) :] for key in state_dict if key.startswith(prefix)}
        self.partial = bool(state) and keys == state

    def after(self, module: nn.Module, incompatible: Any) -> None:
        if self.partial:
            prefixes = _state_prefixes(module)
            kept = [key for key in incompatible.missing_keys if key.startswith(prefixes)]
            incompatible.missing_keys[:] = kept
        self.partial = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _SavePretrainedGuard:
    """Stands in for a Hugging Face model's ``save_pretrained`` while it holds FLoRA adapters."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.loading = _TrainingStateLoad(model)

    def __call__(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        if not _has_adapters(self.model):
            return type(self.model).save_pretrained(self.model, save_directory, **kwargs)
        state_dict = kwargs.get("state_dict")
        if state_dict is not None:
            _check_plain(self.model, state_dict)
            return type(self.model).save_pretrained(self.model, save_directory, **kwargs)
        unknown = sorted(set(kwargs) - {"state_dict", "is_main_process", *_IGNORED})
        if unknown:
            raise TypeError(
                f"save_pretrained of a model with FLoRA adapters writes the adapter folder and "
                f"takes no {unknown}; push a saved folder with huggingface_hub.upload_folder"
            )
        if kwargs.get("is_main_process", True):
            save_adapter_folder(self.model, Path(save_directory))
        return None


def save_adapter_folder(model: nn.Module, directory: Path) -> None:
    """Write the active adapter and the training state into ``directory`` (other files stay)."""
    from flora._apply import current_active
    from flora.io import save_adapter

    active = list(current_active(model))
    if len(active) != 1:
        raise ValueError(
            f"save_pretrained writes the active adapter, and adapters {active} are active; "
            "activate one with flora.set_adapter(model, name), or save each with "
            "flora.save_adapter(model, directory, adapter_name=name)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".flora-save-", dir=directory))
    try:
        save_adapter(model, staging / "adapter")
        save_file(
            training_state(model),
            str(staging / TRAINING_STATE_NAME),
            metadata={"format": "pt", "flora": "adapter training state; load the adapter"},
        )
        # The training state first: a folder that has the new adapter config has its state.
        os.replace(staging / TRAINING_STATE_NAME, directory / TRAINING_STATE_NAME)
        for path in sorted((staging / "adapter").iterdir(), key=lambda p: p.suffix == ".json"):
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_plain(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Refuse a state dict in the adapted layout: ``from_pretrained`` would misread it."""
    from flora.model import merged_state_dict

    adapted = set(model.state_dict()) - set(merged_state_dict(model))
    found = sorted(key for key in state_dict if key in adapted)
    if found:
        raise ValueError(
            f"state_dict holds the adapted layout ({found[:3]}{' ...' if len(found) > 3 else ''}),"
            " which from_pretrained would silently re-initialize; pass "
            "state_dict=flora.merged_state_dict(model) for a full checkpoint, or call "
            "model.save_pretrained(directory) without state_dict for the adapter folder"
        )


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the adapter folder (Hugging Face models)."""
    guarded = isinstance(model.__dict__.get("save_pretrained"), _SavePretrainedGuard)
    if callable(getattr(type(model), "save_pretrained", None)) and not guarded:
        model.save_pretrained = _SavePretrainedGuard(model)


def release_save_pretrained(model: nn.Module) -> None:
    """Undo :func:`guard_save_pretrained` once no adapter is left."""
    guard = model.__dict__.get("save_pretrained")
    if isinstance(guard, _SavePretrainedGuard) and not _has_adapters(model):
        guard.loading.remove()
        del model.__dict__["save_pretrained"]


def _has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (AdaptedWeight, ModulesToSave)) for m in model.modules())
