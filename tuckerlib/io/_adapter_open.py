"""The public entry point for adapter directories: :func:`open_adapter`."""

from __future__ import annotations

import os
from pathlib import Path

from tuckerlib.io._adapter import CONFIG_NAME, Adapter, AdapterError, read_config
from tuckerlib.io._adapter_flora import open_flora
from tuckerlib.io._adapter_lora import open_lora

__all__ = ["open_adapter"]


def open_adapter(path: str | os.PathLike[str]) -> Adapter:
    r"""Open a flora or PEFT LoRA adapter directory as Tucker updates, one per layer.

    The update each layer adds to its weight ``W0`` is returned as a
    Tucker tensor over the weight's own axes, read from the stored factors
    without forming it:

    * flora: :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}` as stored; for
      ``init="hosvd"`` the change to the pretrained weight, :math:`\Delta W - \Delta W_\text{init}`
      (block-diagonal core, concatenated factors). Where the directory
      records an embedding's ``padding_idx``, that row is zero, as the
      layer applies it; the recorded geometry is ``AdapterLayer.geometry``.
    * PEFT LoRA, with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
      ``use_rslora``; ``r`` and ``lora_alpha`` per layer from
      ``rank_pattern`` and ``alpha_pattern``): Linear :math:`\text{scaling} \cdot B A`
      (:math:`(B A)^\top` with ``fan_in_fan_out``, read as a ``"Parameter"`` of
      shape ``(in, out)``); ConvNd :math:`\text{scaling} \cdot A \times_0 B` with ``lora_A``'s
      kernel as the core; Embedding :math:`\text{scaling} \cdot A^\top B^\top`; a grouped conv
      whose ``lora_A`` keeps every group to its own input channels becomes
      a block-diagonal factor over the grouped weight; a 2-D parameter of
      ``target_parameters`` as Linear.

    A bias update :math:`\Delta b` beside the weight update (flora ``"bias": true``,
    PEFT ``lora_bias``: :math:`\text{scaling} \cdot \texttt{lora_B.bias}`) is read as the
    ``bias`` of :class:`AdapterLayer`; it is no part of :math:`\Delta W`.

    Parameters
    ----------
    path : path-like
        A directory holding ``adapter_config.json`` and
        ``adapter_model.safetensors`` (or a PEFT ``adapter_model.bin``, read
        with ``torch.load(weights_only=True)``).

    Returns
    -------
    Adapter
        A lazy mapping from layer name to :class:`AdapterLayer`; also a
        context manager that closes the weight file.

    Raises
    ------
    AdapterError
        If a file is missing or malformed, the config is neither a flora
        nor a PEFT adapter config, or the adapter is not one whose update is
        a low-rank tensor: a PEFT ``peft_type`` other than ``"LORA"``, or an
        option that changes the update's form (``use_dora``, ``bias`` other
        than ``"none"``, an initialization that rewrites the base weights
        such as PiSSA or LoftQ, and any other option not left at its
        default); the message names the option. Also a PEFT adapter with
        ``lora_bias`` whose Linear or ConvNd pair has no ``lora_B.bias``.

    Notes
    -----
    What a directory holds besides low-rank updates, or holds in a form
    with no Tucker equivalent, is listed in ``Adapter.skipped``: PEFT
    ``modules_to_save`` copies and other full tensors, a grouped LoRA conv
    whose ``lora_A`` mixes channels across groups, a 3-D
    ``target_parameters`` tensor (its axis order depends on the module),
    an Embedding or ``target_parameters`` pair of a ``lora_bias`` adapter
    (PEFT refuses that combination), a ``lora_B.bias`` without
    ``lora_bias`` (PEFT does not load it).

    Examples
    --------
    >>> import json, pathlib, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> from tuckerlib.io import open_adapter
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}
    >>> _ = (directory / "adapter_config.json").write_text(json.dumps(config))
    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal((2, 6)).astype(np.float32)  # lora_A: (r, in)
    >>> b = rng.standard_normal((5, 2)).astype(np.float32)  # lora_B: (out, r)
    >>> save_file({"base_model.model.fc.lora_A.weight": a,
    ...            "base_model.model.fc.lora_B.weight": b},
    ...           directory / "adapter_model.safetensors")
    >>> with open_adapter(directory) as adapter:
    ...     layer = adapter["fc"]
    >>> layer.kind, layer.shape, layer.scale, layer.stored_ranks
    ('Linear', (5, 6), 2.0, (2,))
    >>> bool(np.allclose(layer.to_tensor(), 2.0 * b @ a, rtol=1e-5))
    True
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: not a directory")
    config = read_config(directory)
    if config.get("format") == "flora":
        return open_flora(directory, config)
    if "peft_type" in config:
        return open_lora(directory, config)
    raise AdapterError(
        f"{directory / CONFIG_NAME}: neither a flora adapter config (format 'flora') nor a "
        "PEFT one (peft_type)"
    )
