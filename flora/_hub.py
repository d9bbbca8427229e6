"""Adapter folders on the Hugging Face Hub: a hub id resolves to a local snapshot."""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

from tuckerlib.io import CheckpointError

__all__ = ["resolve_hub_id"]

#: ``org/name``: what the Hub calls a repository id, and no path that exists here.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
#: The files of an adapter folder (flora.io's ``CONFIG_NAME`` and ``WEIGHTS_NAME``).
_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def resolve_hub_id(directory: str | PathLike[str]) -> Path:
    """``directory`` itself when it exists or is no hub id; else its Hub snapshot.

    A local path always wins. A string ``"org/name"`` that is no local path
    is downloaded (only the two adapter files) with
    ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``
    and ``HF_HUB_CACHE``: offline, a snapshot already in the cache is used.

    Raises
    ------
    tuckerlib.io.CheckpointError
        If the id names no folder on the Hub or in the cache (offline), or
        ``huggingface_hub`` is not installed; the message names the id.
    """
    path = Path(directory)
    if path.exists() or not isinstance(directory, str) or not _HUB_ID.fullmatch(directory):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{directory}: no such directory; to read it as a Hugging Face Hub id, install "
            "huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(directory, allow_patterns=_FILES))
    except Exception as exc:  # the hub client raises many kinds; each means "not found"
        reason = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            f"{directory}: no such directory, and no adapter under this id on the Hugging Face "
            f"Hub or in its cache ({type(exc).__name__}: {reason})"
        ) from None
