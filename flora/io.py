r"""Adapter-only files: ``adapter_model.safetensors`` + ``adapter_config.json``.

An adapter directory holds one named adapter in two files (format version 2):

``adapter_config.json``
    A JSON object::

        {"format": "flora", "format_version": 2, "adapter_name": "default",
         "config": {...FLoRAConfig fields (FLoRAConfig.to_dict())...},
         "layers": {NAME: {"kind": KIND, "shape": [I_0, ...], "ranks": [R_0, ...],
                           "scale": s, "init": INIT, "forward": MODE, "dropout": p,
                           "bias": true, "geometry": {...}}},
         "modules_to_save": [MODULE, ...],
         "base_model_name_or_path": "org/model" | null, "library_version": "0.1.0",
         "peft_type": "FLORA (...)"}

    ``adapter_name`` is the adapter's name in the model it was saved from.
    ``NAME`` is the adapted module's name in the model (``"blocks.0.fc1"``)
    or, for kinds ``"Parameter"`` and ``"MultiheadAttention"``, the
    parameter's full name (``"blocks.0.experts.weight"``,
    ``"attn.in_proj_weight"``). ``KIND`` is a registered layer kind
    (:doc:`/layer_kinds`): ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``,
    ``"Conv3d"``, ``"Embedding"``, ``"Conv1D"`` (the module must be of a type
    the kind matches), ``"MultiheadAttention"`` (a projection weight of a
    ``torch.nn.MultiheadAttention``), ``"Parameter"`` (any parameter,
    adapted with :class:`flora.TuckerParametrization`) or a kind added with
    :func:`flora.register_layer_kind`. Each layer entry is
    :meth:`flora.LayerSpec.to_record`: ``shape`` is the weight's shape and
    ``ranks`` the usable ranks (:math:`R_n \le I_n` and :math:`R_n \le \prod_{m \ne n} R_m`). The
    per-layer entries are authoritative; ``config`` records how
    the adapter was made. ``"bias": true`` (optional, only written when
    true) marks an adapter that carries a bias update. ``modules_to_save``
    (optional) lists the modules saved whole with the adapter.
    ``base_model_name_or_path`` (optional) is the base model's Hugging Face
    name or path when the model's config has one (where PEFT records it, so
    ``transformers`` finds the base model), ``library_version`` (optional)
    the version of the library that wrote the folder, and ``peft_type``
    (optional) a fixed text that names flora and the ``flora export-lora``
    command: PEFT, which knows no ``FLORA`` method and has no way to
    register one from outside, raises it as its error when asked to load a
    flora folder. Folders written before these keys existed load as before.
    Every other top-level key is refused when read, as a newer format's
    field that this reader would otherwise drop.

    ``geometry`` (optional, Conv and Embedding layers only) records what the
    update a layer applies depends on beyond the weight's shape. A
    convolution: ``{"groups": g, "stride": [...], "padding": [...] | "same"
    | "valid", "dilation": [...], "padding_mode": MODE}``; an embedding:
    ``{"padding_idx": int | null, "max_norm": float | null}`` (the
    ``padding_idx`` row gets no update). :func:`~flora.save_adapter` writes it from
    the model's layers and :func:`~flora.load_adapter` checks it against the model
    it loads into. Directories without it (those of earlier releases, and
    those of :func:`flora.extract`, which sees only checkpoint names and
    shapes) load as before, unchecked.

``adapter_model.safetensors``
    For each layer ``NAME``: ``NAME.core`` of shape ``ranks`` and
    ``NAME.factors.n`` of shape ``(shape[n], ranks[n])``; with
    ``init == "hosvd"`` also ``NAME.initial_core`` and
    ``NAME.initial_factors.n`` (the adapter at initialization, which the
    base gave up: loading subtracts it from the fresh base weight); with
    ``"bias": true`` in the layer's entry also ``NAME.bias`` of shape
    ``(shape[0],)``, the bias update :math:`\Delta b` (the entry is left out for
    adapters without one, so a reader that does not know bias updates
    refuses the directory instead of dropping them). For each
    saved module ``MODULE``: ``modules_to_save.MODULE.KEY`` for every entry
    ``KEY`` of that module's ``state_dict()``. Nothing else. Files are read
    with ``safetensors`` only, never unpickled.

Version 1 directories (written by earlier releases) have no
``modules_to_save`` and may leave out ``forward`` and ``dropout``
(``"auto"``, ``0.0``); ranks above the usable ones are compressed exactly
when they are loaded.

Saving writes a new directory beside the target and swaps it into place,
so a failed save leaves the previous adapter complete, never a mix of old
and new files; a failed write is an :class:`OSError` naming the file. What
holds when a save is interrupted or runs alongside others:

* **Atomic replace.** On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``:
  at every instant the directory is the complete old or the complete new
  adapter, whenever the process is killed or the power fails (after the
  file system's own journal replay). Where the system or file system has no
  exchange, the swap is two renames, and a writer killed between them
  leaves the old adapter under a hidden name ``.NAME.<id>.old``.
* **Recovery.** The next :func:`~flora.read_adapter`, :func:`~flora.load_adapter` or save
  of that directory renames such a left-over old copy back, and a save
  removes the hidden ``.NAME.<id>.tmp``/``.old`` directories of writers that
  died. Each writer holds a lock on ``.NAME.<id>.lock`` while its hidden
  directory exists, so a live writer's files are never touched.
* **Concurrent saves** into one directory all succeed, one after the other;
  the last to swap wins.
* **Consistent reads.** A reader opens the directory once and reads both
  files through that handle, so a save that swaps the directory meanwhile
  cannot give it one adapter's config with another's weights. The weights
  file also records the sha256 of the config written with it (metadata key
  ``flora_config_sha256``); files paired otherwise are read again (a config
  edited by hand is accepted; files of earlier releases carry no digest
  and load as before).
* **Targets.** A target that is a symbolic link to a directory is followed
  (the directory it points to is replaced, the link stays); ``.``, the
  current directory, a dangling link, and a read-only target or parent are
  refused with an error naming the full path before anything is written.

Reading refuses anything that does not match this description with a
:class:`tuckerlib.io.CheckpointError` (a ``ValueError``) whose message
starts with the file at fault. The keys, kinds, record checks and the
:math:`\Delta W - \Delta W_\text{init}` rule are :mod:`tuckerlib.io.flora_format`'s, which
:func:`tuckerlib.io.open_adapter` shares: both refuse the same directories
with the same message. :func:`~flora.write_adapter` writes such a directory from plain
tensors, e.g. for adapters computed outside a model; :func:`~flora.read_adapter`
reads and validates one without a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from flora._apply import (
    check_layer_name,
    current_active,
    find_adapted,
    find_saved,
    walk,
)
from flora._args import check_flag, check_model
from flora._atomic import recover, replace_directory
from flora._files import check_tensor_values, read_json, read_tensors, read_together, writing
from flora._geometry import geometry_mismatch, module_geometry
from flora._hub import resolve_hub_id
from flora._tucker import to_usable_ranks
from flora.config import FLoRAConfig
from flora.layers import AdaptedWeight, FLoRALayer, TuckerDelta
from flora.layers.base import check_adapter_name
from flora.model import attach_adapter
from flora.spec import LayerSpec
from tuckerlib import __version__
from tuckerlib.io import CheckpointError
from tuckerlib.io.flora_format import (
    CONFIG_NAME,
    DIGEST_KEY,
    FORMAT_VERSION,
    PEFT_TYPE,
    SAVED_PREFIX,
    WEIGHTS_NAME,
    AdapterDocument,
    LayerRecord,
    bias_key,
    check_base_name,
    check_document,
    check_layer,
    check_modules,
    check_tensors,
    core_key,
    factor_key,
    saved_key,
    saved_owner,
    tensor_shapes,
)

__all__ = [
    "CONFIG_NAME",
    "DIGEST_KEY",
    "FORMAT_VERSION",
    "PEFT_TYPE",
    "SAVED_PREFIX",
    "WEIGHTS_NAME",
    "SavedAdapter",
    "adapter_state_dict",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]

#: How often a reader reads a directory whose files another save replaced meanwhile.
_READ_ATTEMPTS = 5


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; a state dict must hold whole tensors.
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach()


def _resolve_name(model: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    names = [n for host in find_adapted(check_model(model)).values() for n in host.adapters]
    if not names:
        raise ValueError("the model has no FLoRA adapters; call flora.inject first")
    if adapter_name is None:
        active = list(current_active(model))
        if len(active) != 1:
            raise ValueError(f"adapters {active} are active; pass adapter_name to pick one")
        return active[0]
    if adapter_name not in names:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(set(names))}")
    return adapter_name


def _adapter_layers(model: nn.Module, name: str) -> dict[str, TuckerDelta]:
    return {
        layer_name: host.adapters[name]
        for layer_name, host in find_adapted(model).items()
        if name in host.adapters
    }


def adapter_state_dict(
    model: nn.Module, *, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """One adapter's tensors, under the keys of the adapter file format.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters. Parameters sharded by FSDP2 are gathered
        (a collective call: run it on every rank).
    adapter_name : str, optional
        Default: the active adapter (exactly one must be active).

    Returns
    -------
    dict of str to torch.Tensor
        Detached tensors, see the module docstring for the keys.

    Raises
    ------
    ValueError
        If the model has no adapters, the name is unknown, or it is None
        and several adapters are active.

    Examples
    --------
    >>> import torch
    >>> import flora
    >>> config = flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 3)), config)
    >>> {k: tuple(v.shape) for k, v in flora.adapter_state_dict(model).items()}
    {'0.core': (2, 2), '0.factors.0': (3, 2), '0.factors.1': (4, 2)}
    """
    name = _resolve_name(model, adapter_name)
    state = {}
    for layer_name, adapter in _adapter_layers(model, name).items():
        tuckers = [(False, (adapter.core, adapter.factors))]
        if adapter.initial is not None:
            tuckers.append((True, adapter.initial))
        for initial, (core, factors) in tuckers:
            state[core_key(layer_name, initial=initial)] = _full(core)
            for n, factor in enumerate(factors):
                state[factor_key(layer_name, n, initial=initial)] = _full(factor)
        if adapter.bias is not None:
            state[bias_key(layer_name)] = _full(adapter.bias)
    for module_name, wrapper in find_saved(model).items():
        if name in wrapper.copies:
            for key, value in wrapper.copies[name].state_dict().items():
                state[saved_key(module_name, key)] = _full(value)
    return state


def _check_tensors(
    layers: Mapping[str, tuple[LayerSpec, Sequence[int]]],
    modules: Sequence[str],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """The tensors against the layers (specs and stored ranks) and saved modules."""
    expected = {
        name: tensor_shapes(name, spec.shape, ranks, init=spec.init, bias=spec.bias)
        for name, (spec, ranks) in layers.items()
    }
    found = {k: (tuple(v.shape), str(v.dtype), v.is_floating_point()) for k, v in tensors.items()}
    check_tensors(expected, modules, found)


def _spec_and_geometry(
    name: str, layer: LayerSpec | Mapping[str, Any]
) -> tuple[LayerSpec, dict[str, Any] | None]:
    """A layer's spec and its optional geometry, from a spec or a record."""
    if isinstance(layer, LayerSpec):
        check_layer_name(name)
        return layer, None
    record = check_layer(name, layer)
    geometry = None if record.geometry is None else dict(record.geometry)
    return _spec(record), geometry


def _spec(record: LayerRecord) -> LayerSpec:
    """The spec of a checked layer record, at its usable ranks."""
    return LayerSpec(
        record.kind,
        record.shape,
        record.ranks,
        record.scale,
        record.init,
        record.forward,
        record.dropout,
        record.bias,
    )


def _record(spec: LayerSpec, geometry: Mapping[str, Any] | None) -> dict[str, Any]:
    record = spec.to_record()
    if geometry is not None:
        record["geometry"] = dict(geometry)
    return record


def write_adapter(
    directory: str | PathLike[str],
    config: FLoRAConfig,
    layers: Mapping[str, LayerSpec | Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    *,
    adapter_name: str = "default",
    modules_to_save: Sequence[str] = (),
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write an adapter directory from a config, layer specs and tensors.

    Parameters
    ----------
    directory : str or path-like
        Created if missing; an existing directory must be empty or hold an
        adapter only, and is replaced as a whole (the files are written
        into a new directory beside it that is then renamed into place).
    config : FLoRAConfig
        Recorded as ``"config"``.
    layers : dict
        Layer name to :class:`flora.LayerSpec` or its record (``kind``,
        ``shape``, ``ranks``, ``scale``, ``init``, optional ``forward``,
        ``dropout``, ``bias`` and ``geometry``), see the module docstring.
    tensors : dict of str to torch.Tensor
        Exactly the keys the layers and saved modules need, with their
        shapes; dense tensors with values, finite where floating.
    adapter_name : str, optional
        Recorded as ``"adapter_name"``.
    modules_to_save : sequence of str, optional
        Modules saved whole; their tensors are under ``modules_to_save.MODULE.``.
    base_model_name_or_path : str, optional
        The base model's Hugging Face name or path, recorded as
        ``"base_model_name_or_path"``.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    ValueError
        If a record is invalid, the tensors' keys or shapes do not match
        the records, a tensor holds NaN or infinite values (a reader would
        refuse the file) or is a meta or sparse tensor, or ``directory``
        holds other files (nothing is written then).
    TypeError
        If ``config`` is not a :class:`flora.FLoRAConfig`, ``layers`` or
        ``tensors`` is not a dict, or a value of ``tensors`` is not a
        ``torch.Tensor`` (the message names its key).
    FileExistsError
        If ``directory`` is a file.
    OSError
        If writing fails (a full disk, a file too large): the error names
        the file that could not be written; ``directory`` is then as it was.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> from flora import FLoRAConfig, LayerSpec
    >>> from flora.io import write_adapter
    >>> spec = LayerSpec("Linear", (3, 4), (1, 1))
    >>> tensors = {"fc.core": torch.ones(1, 1), "fc.factors.0": torch.ones(3, 1),
    ...            "fc.factors.1": torch.ones(4, 1)}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = write_adapter(f"{tmp}/adapter", FLoRAConfig(), {"fc": spec}, tensors)
    ...     sorted(p.name for p in path.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    if not isinstance(directory, str | PathLike):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    if not isinstance(config, FLoRAConfig):
        raise TypeError(f"config must be a FLoRAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    check_base_name(base_model_name_or_path)
    for name, value in (("layers", layers), ("tensors", tensors)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict keyed by name, got {type(value).__name__}")
    check_tensor_values(tensors)
    specs, geometry = {}, {}
    for name, layer in layers.items():
        specs[name], found = _spec_and_geometry(name, layer)
        if found is not None:
            geometry[name] = found
    if not specs:
        raise ValueError("an adapter needs at least one layer")
    modules = check_modules(list(modules_to_save))
    _check_tensors({n: (s, s.ranks) for n, s in specs.items()}, modules, tensors)
    document: dict[str, Any] = {
        "format": "flora",
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "layers": {name: _record(spec, geometry.get(name)) for name, spec in specs.items()},
    }
    if modules:
        document["modules_to_save"] = modules
    document["base_model_name_or_path"] = base_model_name_or_path
    document["library_version"] = __version__
    document["peft_type"] = PEFT_TYPE
    # safetensors refuses tensors that share storage; a clone owns its memory.
    files = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    text = json.dumps(document, indent=2) + "\n"
    # One metadata key: safetensors writes several in a random order, and a save is reproducible.
    metadata = {DIGEST_KEY: hashlib.sha256(text.encode("utf-8")).hexdigest()}

    def fill(path: Path) -> None:
        with writing(path / WEIGHTS_NAME) as weights:
            save_file(files, str(weights), metadata=metadata)
        with writing(path / CONFIG_NAME) as config_file:
            config_file.write_text(text, encoding="utf-8")

    return replace_directory(Path(directory), fill, allowed=(CONFIG_NAME, WEIGHTS_NAME))


def save_adapter(
    model: nn.Module,
    directory: str | PathLike[str],
    *,
    adapter_name: str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save one adapter of ``model`` (not the base weights) to ``directory``.

    Parameters
    ----------
    model : torch.nn.Module
        A model with adapters.
    directory : str or path-like
        Receives ``adapter_model.safetensors`` and ``adapter_config.json``
        (format in :mod:`flora.io`); created if missing. An existing
        directory must be empty or hold an adapter, which is replaced as a
        whole: a failed save leaves it as it was.
    adapter_name : str, optional
        The adapter to save, one per directory; default: the active adapter
        (exactly one must be active).
    state_dict : dict of str to torch.Tensor, optional
        The adapter tensors to write, as returned by
        :func:`adapter_state_dict` (default: computed here). Under FSDP2
        gathering the shards is a collective call that every rank must make,
        so gather on every rank and save from one::

            sd = flora.adapter_state_dict(model)  # every rank
            if torch.distributed.get_rank() == 0:
                flora.save_adapter(model, directory, state_dict=sd)

        Its keys and shapes must match the adapter's layers.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    ValueError
        If the model has no adapters, the name is unknown (or None with
        several active adapters), ``state_dict`` does not match the adapter
        (missing or unexpected keys, wrong shapes, tensors still sharded,
        NaN or infinite values), or ``directory`` holds other files;
        nothing is written then.
    TypeError
        If ``model`` is not a module, ``state_dict`` is not a mapping or
        holds a value that is not a ``torch.Tensor`` (named by its key).
    FileExistsError
        If ``directory`` is a file.
    OSError
        If writing fails: the error names the file; ``directory`` is then
        as it was.

    See Also
    --------
    load_adapter : The inverse.
    adapter_state_dict : The tensors saved.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> fresh.load_state_dict(model.state_dict())
    <All keys matched successfully>
    >>> model = flora.inject(model, flora.FLoRAConfig(ranks=2, target_modules=["0"]))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = flora.save_adapter(model, tmp)
    ...     fresh = flora.load_adapter(fresh, tmp)
    >>> x = torch.randn(2, 4)
    >>> torch.equal(fresh(x), model(x))
    True
    """
    name = _resolve_name(model, adapter_name)
    adapters = _adapter_layers(model, name)
    if state_dict is None:
        state_dict = adapter_state_dict(model, adapter_name=name)
    elif not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict of tensors from flora.adapter_state_dict, "
            f"got {type(state_dict).__name__}"
        )
    else:
        sharded = sorted(key for key, value in state_dict.items() if hasattr(value, "full_tensor"))
        if sharded:
            raise ValueError(
                f"state_dict holds sharded DTensors {sharded}; pass the gathered tensors "
                "that flora.adapter_state_dict(model) returns"
            )
    specs = {layer_name: adapter.spec for layer_name, adapter in adapters.items()}
    config = next(iter(adapters.values())).config or FLoRAConfig.for_layers(specs)
    saved = [m for m, wrapper in find_saved(model).items() if name in wrapper.copies]
    hosts = find_adapted(model)
    records = {
        layer_name: _record(spec, _host_geometry(hosts[layer_name]))
        for layer_name, spec in specs.items()
    }
    return write_adapter(
        directory,
        config,
        records,
        state_dict,
        adapter_name=name,
        modules_to_save=saved,
        base_model_name_or_path=_base_model_name(model),
    )


def _base_model_name(model: nn.Module) -> str | None:
    """The Hugging Face name or path of ``model`` (its ``config.name_or_path``), if it has one."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _host_geometry(host: AdaptedWeight) -> dict[str, Any] | None:
    return module_geometry(host.base_layer) if isinstance(host, FLoRALayer) else None


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter directory, read and validated (:func:`~flora.read_adapter`).

    Parameters
    ----------
    name : str
        The saved adapter's name.
    config : FLoRAConfig
        How it was made.
    layers : dict of str to LayerSpec
        Layer name to spec (usable ranks).
    tensors : dict of str to torch.Tensor
        Under the file's keys, at the specs' ranks (version 1 tensors of
        larger ranks are compressed exactly).
    modules_to_save : list of str
        Modules saved whole.
    geometry : dict of str to dict, optional
        Layer name to its recorded geometry (Conv and Embedding layers of
        directories that record it; see :mod:`flora.io`).
    base_model_name_or_path : str, optional
        The base model's Hugging Face name or path, if recorded.
    library_version : str, optional
        The version of the library that wrote the folder, if recorded.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    >>> config = flora.FLoRAConfig(ranks=2, target_modules=["0"], modules_to_save=["1"])
    >>> _ = flora.inject(model, config)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     saved = flora.read_adapter(flora.save_adapter(model, tmp))
    >>> core, factors = saved.tucker("0")
    >>> tuple(core.shape), sorted(saved.saved_state("1"))
    ((2, 2), ['bias', 'weight'])
    """

    #: The saved adapter's name.
    name: str
    #: How it was made.
    config: FLoRAConfig
    #: Layer name to spec.
    layers: dict[str, LayerSpec]
    #: Tensors under the file's keys.
    tensors: dict[str, torch.Tensor]
    #: Modules saved whole.
    modules_to_save: list[str]
    #: Layer name to its recorded geometry.
    geometry: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The base model's Hugging Face name or path, if recorded.
    base_model_name_or_path: str | None = None
    #: The version of the library that wrote the folder, if recorded.
    library_version: str | None = None

    def tucker(
        self, layer: str, *, initial: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The (initial) core and factors of ``layer``."""
        rank = len(self.layers[layer].shape)
        factors = [self.tensors[factor_key(layer, n, initial=initial)] for n in range(rank)]
        return self.tensors[core_key(layer, initial=initial)], factors

    def bias(self, layer: str) -> torch.Tensor | None:
        r"""The bias update :math:`\Delta b` of ``layer``, or None if it has none."""
        return self.tensors.get(bias_key(layer)) if self.layers[layer].bias else None

    def saved_state(self, module: str) -> dict[str, torch.Tensor]:
        """The ``state_dict`` of saved module ``module``."""
        prefix = saved_key(module, "")
        mine = [k for k in self.tensors if saved_owner(k, self.modules_to_save) == module]
        return {k[len(prefix) :]: self.tensors[k] for k in mine}


def read_adapter(directory: str | PathLike[str]) -> SavedAdapter:
    """Read and validate an adapter directory (either format version) without a model.

    Parameters
    ----------
    directory : str or path-like
        Written by :func:`save_adapter` or :func:`write_adapter`.

    Returns
    -------
    SavedAdapter

    Raises
    ------
    tuckerlib.io.CheckpointError
        A ``ValueError`` whose message starts with the file at fault: the
        directory or a file is missing or unreadable; the config is not
        valid JSON, not a flora adapter config of a known version, lacks a
        key or has an unknown one, or holds an invalid value; the weights
        file is not a valid safetensors file, or its tensors do not match
        the layer records (keys, shapes, floating dtype) or hold NaN or
        infinite values.
    TypeError
        If ``directory`` is not a path.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> config = flora.FLoRAConfig(ranks=2, target_modules="all-linear")
    >>> model = flora.inject(torch.nn.Sequential(torch.nn.Linear(4, 3)), config)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     saved = flora.read_adapter(flora.save_adapter(model, tmp))
    >>> saved.name, saved.layers["0"].ranks
    ('default', (2, 2))
    """
    directory = _directory(directory)
    return _validated(directory, *_snapshot(directory))


def _snapshot(directory: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """The config and the tensors of one save, even while other saves replace ``directory``.

    Both files are read through one open handle of the directory (saves
    swap whole directories, never change files in place). The weights file
    records the sha256 of the config written with it: files paired
    otherwise (copied in by hand while reading) are read again; the same
    pair twice is a config edited by hand and accepted (its records are
    checked against the tensors next). Files without a digest (earlier
    releases) are not checked.
    """
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    previous = None
    for _ in range(_READ_ATTEMPTS):
        files = read_together(directory, (CONFIG_NAME, WEIGHTS_NAME))
        if files is None:  # a missing file, or a replaced directory's removed copy
            continue
        document, config_bytes = read_json(config, files[CONFIG_NAME])
        tensors, metadata = read_tensors(weights, files[WEIGHTS_NAME])
        recorded = metadata.get(DIGEST_KEY)
        if recorded is None or recorded == hashlib.sha256(config_bytes).hexdigest():
            return document, tensors
        if previous == (config_bytes, recorded):
            return document, tensors
        previous = (config_bytes, recorded)
    if previous is None:  # read by path: the error names the file at fault
        document, _ = read_json(config)
        return document, read_tensors(weights)[0]
    raise CheckpointError(
        f"{weights}: written with another {CONFIG_NAME} than the one beside it in "
        f"{_READ_ATTEMPTS} reads (its {DIGEST_KEY!r} differs): the files keep changing; read "
        "the directory when its writers are done"
    )


def _validated(directory: Path, document: object, tensors: dict[str, torch.Tensor]) -> SavedAdapter:
    path = directory / CONFIG_NAME
    checked, config = _checked_document(path, document)
    stored = {n: (_spec(r), list(r.stored_ranks)) for n, r in checked.layers.items()}
    weights = directory / WEIGHTS_NAME
    try:
        _check_tensors(stored, checked.modules_to_save, tensors)
        check_tensor_values(tensors)
    except ValueError as exc:
        raise CheckpointError(f"{weights}: {exc} (config {path})") from None
    for layer, (spec, ranks) in stored.items():
        if list(spec.ranks) != ranks:
            _compress_layer(tensors, layer, spec)
    geometry = {n: dict(r.geometry) for n, r in checked.layers.items() if r.geometry is not None}
    return SavedAdapter(
        checked.adapter_name,
        config,
        {n: spec for n, (spec, _) in stored.items()},
        tensors,
        checked.modules_to_save,
        geometry,
        checked.base_model_name_or_path,
        checked.library_version,
    )


def _read_document(
    directory: str | PathLike[str],
) -> tuple[Path, Path, dict[str, Any], AdapterDocument, FLoRAConfig]:
    """An adapter folder (or hub id), its config file, document, checked document and config."""
    directory = _directory(directory)
    path = directory / CONFIG_NAME
    document, _ = read_json(path)
    return directory, path, document, *_checked_document(path, document)


def _checked_document(path: Path, document: object) -> tuple[AdapterDocument, FLoRAConfig]:
    """The document read from ``path``, checked by the format, and its recorded config."""
    try:
        checked = check_document(document)
        check_adapter_name(checked.adapter_name)  # and not a name a model cannot hold
        return checked, _recorded_config(checked.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _directory(directory: object) -> Path:
    if not isinstance(directory, str | PathLike):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    path = resolve_hub_id(directory)
    recover(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise CheckpointError(
            f"{path}: {what} (an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    return path


def _recorded_config(data: object) -> FLoRAConfig:
    try:
        return FLoRAConfig.from_dict(data)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config: {exc}") from None


def _compress_layer(tensors: dict[str, torch.Tensor], layer: str, spec: LayerSpec) -> None:
    for initial in (False, True) if spec.init == "hosvd" else (False,):
        keys = [factor_key(layer, n, initial=initial) for n in range(len(spec.shape))]
        core = tensors[core_key(layer, initial=initial)]
        core, factors = to_usable_ranks(core, [tensors[k] for k in keys])
        tensors[core_key(layer, initial=initial)] = core
        for key, factor in zip(keys, factors, strict=True):
            tensors[key] = factor


def load_adapter(
    model: nn.Module,
    directory: str | PathLike[str],
    *,
    adapter_name: str | None = None,
    trainable: bool = False,
) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` and load its tensors.

    Every layer name, kind, shape and recorded geometry, every tensor key,
    shape, dtype and value (finite) and every saved module is checked before
    the model is touched: a failed load raises and leaves the model exactly
    as it was.

    Parameters
    ----------
    model : torch.nn.Module
        The base model the adapter was trained on, with or without other
        adapters.
    directory : str or path-like
        A directory written by :func:`save_adapter` or :func:`write_adapter`.
    adapter_name : str, optional
        Name of the adapter in ``model``; default: the saved name. The first
        adapter of a model is active; further ones are added inactive (see
        :func:`flora.set_adapter`).
    trainable : bool, optional
        Whether the adapter (and its saved modules) require gradients when
        active. Loading is for inference by default, as with PEFT's
        ``PeftModel.from_pretrained``.

    Returns
    -------
    torch.nn.Module
        ``model``, with the adapter; the base frozen.

    Raises
    ------
    tuckerlib.io.CheckpointError
        A ``ValueError`` naming the file, if the directory or a file is
        missing, unreadable or invalid (see :func:`read_adapter`).
    ValueError
        If the adapter names a module or parameter the model lacks or has
        with another kind or shape (or as a meta tensor), records a geometry
        the model's layer does not have (another ``groups``,
        ``padding_idx``, ...; the message names the layer), the adapter name
        is taken, or a saved module does not match.
    TypeError
        If ``model`` is not a module, ``adapter_name`` not a string or
        ``trainable`` not a bool (checked before the files are read).
    RuntimeError
        Inside :func:`flora.disable_adapter`.

    See Also
    --------
    save_adapter : Writes the directory.
    flora.attach_adapter : Adds an adapter built from tensors.

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> import flora
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> for name in ("a", "b"):
    ...     config = flora.FLoRAConfig(ranks=2, target_modules=["0"])
    ...     _ = flora.inject(model, config, adapter_name=name)
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for name in ("a", "b"):
    ...         _ = flora.save_adapter(model, f"{tmp}/{name}", adapter_name=name)
    ...         _ = flora.load_adapter(base, f"{tmp}/{name}")
    >>> flora.adapter_names(base), flora.active_adapters(base), flora.trainable_parameters(base)
    (['a', 'b'], ['a'], 0)
    """
    check_model(model)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    check_flag(trainable, "trainable")
    saved = read_adapter(directory)
    _check_geometry(model, saved.geometry)
    adapters = {layer: _loaded(saved, layer) for layer in saved.layers}
    states = {m: saved.saved_state(m) for m in saved.modules_to_save}
    name = saved.name if adapter_name is None else adapter_name
    return attach_adapter(model, name, adapters, modules_to_save=states, trainable=trainable)


def _check_geometry(model: nn.Module, geometry: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a layer whose recorded geometry is not the model's (other mismatches: attach)."""
    modules = dict(walk(model))
    for name, recorded in geometry.items():
        module = modules.get(name)
        if isinstance(module, FLoRALayer):
            module = module.base_layer
        if module_geometry(module) is None:
            continue
        problem = geometry_mismatch(recorded, module)
        if problem is not None:
            raise ValueError(f"layer {name!r}: {problem}")


def _loaded(saved: SavedAdapter, layer: str) -> TuckerDelta:
    spec = saved.layers[layer]
    initial = saved.tucker(layer, initial=True) if spec.init == "hosvd" else None
    adapter = TuckerDelta(spec, *saved.tucker(layer), initial=initial, bias=saved.bias(layer))
    adapter.config = saved.config
    return adapter
