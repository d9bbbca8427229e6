"""Turn "a tensor or its mode spectra" into host spectra."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from tuckerlib._host import to_host
from tuckerlib._validation import as_list
from tuckerlib.decompositions._for_analysis import prepare_tensor, unfolding_spectra

__all__ = ["check_energy", "check_sizes", "check_spectrum", "host_spectra", "shape_of"]

_REAL_KINDS = ("real floating", "signed integer", "unsigned integer")


def _host_values(s: Any, name: str) -> np.ndarray:
    """``s`` as a NumPy array of its own (real) dtype, or a TypeError naming ``name``."""
    if array_api_compat.is_array_api_obj(s):
        xp = array_api_compat.array_namespace(s)
        if not xp.isdtype(s.dtype, _REAL_KINDS):
            raise TypeError(
                f"{name} must hold real singular values, got an array of dtype {s.dtype}"
            )
        if xp.isdtype(s.dtype, "real floating") and xp.finfo(s.dtype).bits < 32:
            # bfloat16 has no NumPy dtype; half precision widens exactly.
            s = xp.astype(s, xp.float32)
        return to_host(s)
    values = as_list(s, name, "a 1-D array of singular values")
    try:
        host = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D array of singular values ({exc})") from None
    if host.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real singular values, got {host.dtype} values")
    return host


def check_spectrum(s: Any, name: str) -> np.ndarray:
    """A validated float64 host copy of one spectrum, sorted descending.

    Complex, boolean or non-numeric values are a TypeError naming ``name``
    (a complex spectrum must not lose its imaginary part to a warning).
    """
    host = np.asarray(_host_values(s, name), dtype=np.float64)
    if host.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of singular values, got shape {host.shape}")
    if not np.all(np.isfinite(host)):
        raise ValueError(f"{name} contains NaN or infinity")
    if np.any(host < 0):
        raise ValueError(f"{name} must hold non-negative singular values, got min {host.min()}")
    return -np.sort(-host)


def check_sizes(shape: Sequence[int], name: str) -> None:
    """Raise unless every mode has a size: a mode of size 0 has no rank to choose."""
    if 0 in shape:
        raise ValueError(
            f"{name} has a mode of size 0 (shape {tuple(shape)}): there is no rank to choose for it"
        )


def host_spectra(x_or_spectra: Any) -> list[np.ndarray]:
    """Float64 host spectra, one per mode, from a tensor or a sequence of spectra.

    An array is read as the tensor itself; any other iterable (a list, a
    tuple, a generator, read once) as spectra, one 1-D array of length
    ``I_n`` per mode (e.g. from :func:`mode_spectra`). The callers use only
    ratios of energies, so the spectra share one power-of-two scale that
    keeps their squares finite (spectra of 1e300 and more would overflow).
    """
    if array_api_compat.is_array_api_obj(x_or_spectra):
        check_sizes(tuple(x_or_spectra.shape), "x_or_spectra")
        _, spectra = unfolding_spectra(prepare_tensor(x_or_spectra, "x_or_spectra"))
        host = [to_host(s.values) for s in spectra]
    else:
        given = as_list(
            x_or_spectra, "x_or_spectra", "an array or a sequence of 1-D spectra, one per mode"
        )
        if not given:
            raise ValueError("x_or_spectra is an empty list; expected one spectrum per mode")
        host = [check_spectrum(s, f"x_or_spectra[{n}]") for n, s in enumerate(given)]
        check_sizes(shape_of(host), "x_or_spectra")
    top = max((float(s[0]) for s in host if s.size), default=0.0)
    if top == 0.0:
        return host
    scale = math.ldexp(1.0, -math.frexp(top)[1])
    return [s * scale for s in host]


def check_energy(energy: Any) -> float:
    """Return ``energy`` as a float in (0, 1]."""
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
        raise TypeError(f"energy must be a real number in (0, 1], got {type(energy).__name__}")
    value = float(energy)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    return value


def shape_of(spectra: Sequence[np.ndarray]) -> tuple[int, ...]:
    """The tensor shape that zero-padded spectra carry."""
    return tuple(len(s) for s in spectra)
