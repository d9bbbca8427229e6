r"""FLoRA in the LoRA ecosystem: exact export to, and import from, PEFT LoRA adapters.

Every FLoRA update is a LoRA update of rank ``R_0`` (the rank of mode 0,
after clipping to what a Tucker tensor can use), for Linear, Conv1d/2d/3d
(grouped included) and Embedding layers and for 2-D parameters, and every
LoRA update of those layers is a Tucker tensor; see :doc:`/lora_adapters`
for the formulas. Bias updates :math:`\Delta b` are PEFT's ``lora_bias``, both ways.
:func:`export_lora` writes a flora adapter as a directory that
``peft.PeftModel.from_pretrained`` loads; :func:`import_lora` reads such a
directory into FLoRA adapters. Input they refuse raises
:class:`LoraConversionError`.
"""

from __future__ import annotations

import json
import math
from os import PathLike, fspath
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from flora._apply import check_enabled
from flora._atomic import check_not_input, check_target, replace_directory
from flora._files import writing
from flora._lora_errors import LoraConversionError
from flora._lora_export import Source, model_source, peft_config, peft_tensors, read_source
from flora._lora_import import grouped, lora_adapters
from flora.layers.base import check_adapter_name
from flora.model import attach_adapter

__all__ = ["LoraConversionError", "export_lora", "import_lora"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: What a re-export may overwrite in an existing output directory.
_REPLACEABLE = frozenset({CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin", "README.md"})


def _source(
    source: object, adapter_name: str | None, base_model: nn.Module | None
) -> tuple[Source, str]:
    if isinstance(source, nn.Module):
        if base_model is not None:
            raise LoraConversionError(
                "base_model is for directory sources; a model source gives its own layers"
            )
        return model_source(source, adapter_name), "the model"
    if isinstance(source, (str, PathLike)):
        path = Path(fspath(source))
        return read_source(path, adapter_name, base_model), str(path)
    raise TypeError(
        "source must be an adapted model or a flora adapter directory (str or path), got "
        f"{type(source).__name__}"
    )


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _check_finite(source: Source, where: str) -> None:
    """Refuse layers whose update (core, factors, scale, bias) holds NaN or infinite values."""
    bad = [
        layer.name
        for layer in source.layers
        if not math.isfinite(layer.scale)
        or not all(_finite(t) for t in (layer.core, *layer.factors))
        or (layer.bias is not None and not _finite(layer.bias))
    ]
    bad += [
        f"{module}.{key}"
        for module, state in source.saved.items()
        for key, value in state.items()
        if value.is_floating_point() and not _finite(value)
    ]
    if bad:
        raise LoraConversionError(
            f"{where}: {bad} hold NaN or infinite values; a LoRA adapter of them would too, "
            "so nothing was written"
        )


def _check_output(target: Path) -> None:
    try:
        check_target(target, _REPLACEABLE)
    except ValueError as exc:
        raise LoraConversionError(str(exc)) from None


def export_lora(
    source: nn.Module | str | PathLike[str],
    directory: str | PathLike[str],
    *,
    adapter_name: str | None = None,
    base_model: nn.Module | None = None,
) -> Path:
    r"""Write a flora adapter as a PEFT LoRA adapter with the same update, exactly.

    Each layer's update :math:`\Delta W = s \cdot G \times_0 U_0 \dots \times_{N-1} U_{N-1}` becomes
    a
    LoRA pair of rank ``R_0`` (after clipping the ranks to what a Tucker
    tensor can use) with ``lora_alpha = r``, so
    ``peft.PeftModel.from_pretrained(base, directory)`` gives the outputs of
    the FLoRA-adapted model to float32 rounding. Bias updates :math:`\Delta b` become
    PEFT's ``lora_bias``: :math:`\texttt{lora_B.bias} = \Delta b`. The formulas are in
    :doc:`/lora_adapters`.

    Parameters
    ----------
    source : torch.nn.Module or str or path-like
        An adapted model, or a flora adapter directory
        (:func:`flora.save_adapter`).
    directory : str or path-like
        The PEFT adapter directory to write (``adapter_config.json`` and
        ``adapter_model.safetensors``), created with its parents. An
        existing one may hold only adapter files, which are replaced as a
        whole (written beside it, then renamed into place).
    adapter_name : str, optional
        The adapter to export. A model: default the active one (exactly one
        must be active). A directory: if given, it must be the saved name.
    base_model : torch.nn.Module, optional
        Only for a directory that does not record its layers' geometry
        (written by :func:`flora.extract` or by an earlier release): the
        base model (before adaptation), for the layer properties PEFT's
        layout depends on (a convolution's ``groups``, ``dilation`` and
        ``padding_mode``, an embedding's ``padding_idx`` and ``max_norm``).
        Any directory: given, it also checks that PEFT's name matching
        loads each saved module (``modules_to_save``) alone; without it the
        saved modules are exported from the directory, and a name that
        ends another module's name (``"head"`` and ``"lm_head"``) makes
        PEFT refuse the adapter when it loads it, by that key. Its weights
        are not read (a model on the ``meta`` device will do; the command
        line's ``--base`` builds one from a Hugging Face ``config.json``).
        Checked against every layer's kind, shape and recorded geometry
        when given.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    TypeError
        If ``source`` is neither a model nor a path.
    LoraConversionError
        A ``ValueError``, if any layer or saved module has no exact LoRA
        form (the message lists each and why): a dilated convolution, a
        non-zero ``padding_mode`` with padding, an embedding with
        ``max_norm``, a parameter that is not 2-D or shares its module with
        another, an Embedding layer or a parameter in an adapter with bias
        updates (PEFT's ``lora_bias`` is one setting for all layers and
        PEFT refuses it for those), a Conv or Embedding layer whose geometry
        is neither recorded nor given by ``base_model``, a saved module
        PEFT's name matching would not load alone (checked with
        ``base_model``; without it, one that holds an adapted layer), layers with different
        dropouts. Also if a directory source holds a PEFT adapter or
        another adapter than ``adapter_name``, ``base_model`` comes with a
        model source, or ``directory`` is the source, holds it or a file of
        it (compared resolved and by inode: symlinks and hard links count),
        or holds other files. Also if a layer's core, factors, scale or bias
        update, a saved tensor, or an exported LoRA tensor holds NaN or
        infinite values, or a model source's adapter tensors are meta
        tensors. Nothing is written then.
    ValueError
        If a model source has no such adapter, or several are active and
        none is named.
    tuckerlib.io.AdapterError
        If the source directory is missing or malformed.
    OSError
        If ``directory`` cannot be written (it is a file, a full disk):
        the error names the file; ``directory`` is then as it was.

    See Also
    --------
    import_lora : The inverse.
    flora.save_adapter : Writes a source directory.
    tuckerlib.io.open_adapter : Reads either kind of directory as Tucker updates.

    Notes
    -----
    An adapter made with ``init="hosvd"`` changes the pretrained weight by
    :math:`\Delta W - \Delta W_\text{init}` (its base holds :math:`W_0 - \Delta W_\text{init}`);
    that difference is exported, as one Tucker tensor with both cores on its block diagonal, so its
    LoRA rank is up to :math:`2 R_0` and the PEFT adapter applies to the original ``W0``. A grouped
    convolution exports exactly at rank
    :math:`\text{groups} \cdot \min(R_0, \text{out} / \text{groups})`, with ``lora_A`` zero across
    groups. Saved modules (``modules_to_save``) are written as PEFT saves its own; PEFT wraps every
    module whose name ends with a listed name, so one that would catch another module too is
    refused.

    PEFT adds :math:`\text{scaling} \cdot \texttt{lora_B.bias}` to a layer's output, and the
    export's scaling is 1, so a bias update is written as
    :math:`\texttt{lora_B.bias} = \Delta b`. ``lora_bias`` is one setting for the whole PEFT
    adapter: the layers without a bias update get a zero ``lora_B.bias``,
    which changes nothing. PEFT refuses to merge such an adapter into a
    layer that has no bias of its own (the outputs are exact either way).

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    >>> config = flora.FLoRAConfig(ranks=3, init="gaussian", target_modules=["0"])
    >>> model = flora.inject(model, config)
    >>> with torch.no_grad():
    ...     _ = model[0].core.normal_()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = flora.export_lora(model, f"{tmp}/lora")
    ...     sorted(p.name for p in out.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    target = Path(directory)
    _check_output(target)  # first: it refuses directories holding more than an adapter
    try:
        check_not_input(target, [source], "source adapter")
    except ValueError as exc:
        raise LoraConversionError(str(exc)) from None
    found, where = _source(source, adapter_name, base_model)
    _check_finite(found, where)
    keys, ranks, refused = peft_tensors(found, base_model)
    if refused:
        raise LoraConversionError(f"{where}: no exact LoRA form for {grouped(refused)}")
    overflow = sorted(k for k, v in keys.items() if v.is_floating_point() and not _finite(v))
    if overflow:
        raise LoraConversionError(
            f"{where}: the LoRA tensors {overflow} overflow to infinite values in "
            f"{keys[overflow[0]].dtype}; nothing was written"
        )
    config = peft_config(found, ranks)

    def fill(staging: Path) -> None:
        with writing(staging / CONFIG_NAME) as config_file:
            config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        with writing(staging / WEIGHTS_NAME) as weights:
            save_file(keys, str(weights), metadata={"format": "pt"})

    return replace_directory(target, fill, allowed=_REPLACEABLE)


def import_lora(
    model: nn.Module,
    directory: str | PathLike[str],
    *,
    adapter_name: str = "default",
    trainable: bool = False,
) -> nn.Module:
    r"""Add a PEFT LoRA adapter directory to ``model`` as FLoRA adapters with the same outputs.

    Every LoRA pair is a Tucker tensor exactly: Linear :math:`\text{scaling} \cdot B A`
    (core ``I_r``, factors ``B`` and :math:`A^\top`), Embedding :math:`\text{scaling} \cdot A^\top
    B^\top`,
    ConvNd ``lora_A``'s kernel as the core with ``B`` on the output mode;
    the ranks are brought to what a Tucker tensor can use without changing
    the update. ``scaling`` is PEFT's: ``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``, per layer from
    ``rank_pattern`` and ``alpha_pattern``. With ``lora_bias``, each Linear
    and ConvNd layer that has a bias also gets the bias update
    :math:`\Delta b = \text{scaling} \cdot \texttt{lora_B.bias}`.

    Everything is read, converted and checked before the model is touched:
    a failure raises and leaves the model exactly as it was.

    Parameters
    ----------
    model : torch.nn.Module
        The base model the LoRA was trained on, with or without FLoRA
        adapters (the LoRA becomes one more named adapter).
    directory : str or path-like
        A PEFT LoRA adapter directory (``adapter_config.json`` and
        ``adapter_model.safetensors`` or ``adapter_model.bin``, read
        without unpickling code).
    adapter_name : str, optional
        The new adapter's name. The first adapter of a model is active;
        further ones are added inactive (see :func:`flora.set_adapter`).
    trainable : bool, optional
        Whether the adapter (and its saved modules) require gradients when
        active; by default it is for inference, as
        ``PeftModel.from_pretrained`` loads.

    Returns
    -------
    torch.nn.Module
        ``model``, with the adapter; the base frozen.

    Raises
    ------
    tuckerlib.io.AdapterError
        A ``ValueError`` naming the file, if the directory is missing or
        malformed, or uses an option without an exact FLoRA form (naming
        the option: ``use_dora``, ``bias``, initializations that rewrite the
        base weights, ...).
    LoraConversionError
        A ``ValueError``, if the directory holds a flora adapter, or a
        layer or saved tensor has no exact FLoRA form (every one named,
        with why): a module the model lacks or has with another type or
        shape, a dilated convolution or a non-zero ``padding_mode`` with
        padding (PEFT runs ``lora_A`` with dilation 1 and zero padding), an
        embedding with ``max_norm``, or whose LoRA updates its
        ``padding_idx`` row (FLoRA's Embedding leaves that row unchanged), a
        grouped LoRA conv mixing groups, a non-zero ``lora_bias`` on a layer
        without a bias or on transformers' ``Conv1D`` (FLoRA's bias update
        changes the bias of a Linear or ConvNd layer), an Embedding pair of
        a ``lora_bias`` adapter, a full tensor outside ``modules_to_save``.
    ValueError
        If ``adapter_name`` is invalid or taken, or a saved module does not
        match the model's.
    RuntimeError
        Inside :func:`flora.disable_adapter`.

    See Also
    --------
    export_lora : The inverse.
    flora.load_adapter : Adds a flora adapter directory.

    Notes
    -----
    PEFT's LoRA branch of a Linear pair computes :math:`x \mapsto \text{scaling} \cdot B A x`;
    on a ``torch.nn.Linear`` that is the weight update ``B A``, on
    transformers' ``Conv1D`` (weight stored ``(in, out)``, the case of
    ``fan_in_fan_out``) the update :math:`(B A)^\top` of its weight, which FLoRA
    adapts as a parameter (:class:`flora.TuckerParametrization`, which has
    no input dropout: with ``lora_dropout`` such layers import only with
    ``trainable=False``). PEFT's ``modules_to_save`` copies become the
    adapter's saved modules, under the module names PEFT's suffix matching
    finds in ``model``.

    PEFT's ``lora_bias`` adds :math:`\text{scaling} \cdot \texttt{lora_B.bias}` to a layer's output
    (even on a layer without a bias); FLoRA's bias update :math:`\Delta b` adds to
    the layer's bias. A zero ``lora_B.bias`` on a layer without a bias (or
    on a ``Conv1D``) changes nothing and is left out; a non-zero one is
    refused.

    Examples
    --------
    >>> import copy, tempfile, warnings
    >>> import torch
    >>> import flora
    >>> import peft
    >>> torch.manual_seed(0) and None
    >>> base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
    ...                          init_lora_weights=False)
    >>> lora = peft.get_peft_model(copy.deepcopy(base), config)
    >>> tmp = tempfile.mkdtemp()
    >>> lora.save_pretrained(tmp)
    >>> model = flora.import_lora(base, tmp)
    >>> flora.adapted_layers(model)["0"].ranks
    (4, 4)
    >>> x = torch.randn(3, 8)
    >>> with torch.no_grad():
    ...     bool((model(x) - lora(x)).abs().max() < 1e-5)
    True
    """
    check_adapter_name(adapter_name)
    check_enabled(model)
    imported = lora_adapters(model, Path(directory), trainable=trainable)
    return attach_adapter(
        model,
        adapter_name,
        imported.adapters,
        modules_to_save=imported.saved,
        trainable=trainable,
    )
