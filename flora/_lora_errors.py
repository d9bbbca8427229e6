"""The error of the LoRA conversions: input they refuse, as one type the command line reports."""

from __future__ import annotations

__all__ = ["LoraConversionError"]


class LoraConversionError(ValueError):
    """An adapter that :func:`flora.export_lora` or :func:`flora.import_lora` cannot convert.

    Raised for well-typed input that cannot be used: layers or tensors
    without an exact form on the other side (every one named, with the
    reason), a directory of the wrong kind of adapter or holding another
    adapter than the one named, an output directory that cannot take the
    adapter. The command line reports it as exit status 2. A plain
    ``ValueError`` or ``TypeError`` from the conversions means an invalid
    argument value (an adapter name the model lacks, say); a malformed
    directory, or a PEFT option without an exact FLoRA form, is a
    :class:`tuckerlib.io.AdapterError`.

    Examples
    --------
    >>> import flora
    >>> issubclass(flora.LoraConversionError, ValueError)
    True
    """
