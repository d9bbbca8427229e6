"""Turn "a tensor or its mode spectra" into host spectra."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from tuckerlib._host import to_host
from tuckerlib.decompositions._api import prepare_tensor, unfolding_spectra

__all__ = ["check_energy", "check_spectrum", "host_spectra", "shape_of"]


def check_spectrum(s: Any, name: str) -> np.ndarray:
    """A validated float64 host copy of one spectrum, sorted descending."""
    host = to_host(s) if not isinstance(s, (list, tuple)) else np.asarray(s, dtype=np.float64)
    if host.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of singular values, got shape {host.shape}")
    if not np.all(np.isfinite(host)):
        raise ValueError(f"{name} contains NaN or infinity")
    if np.any(host < 0):
        raise ValueError(f"{name} must hold non-negative singular values, got min {host.min()}")
    return -np.sort(-host)


def host_spectra(x_or_spectra: Any) -> list[np.ndarray]:
    """Float64 host spectra, one per mode, from a tensor or a list of spectra.

    A ``list`` or ``tuple`` is always read as spectra (one 1-D array of
    length ``I_n`` per mode, e.g. from :func:`mode_spectra`); anything else
    as the tensor itself. The callers use only ratios of energies, so the
    spectra share one power-of-two scale that keeps their squares finite
    (spectra of 1e300 and more are common to overflow otherwise).
    """
    if isinstance(x_or_spectra, (list, tuple)):
        if not x_or_spectra:
            raise ValueError("x_or_spectra is an empty list; expected one spectrum per mode")
        host = [check_spectrum(s, f"x_or_spectra[{n}]") for n, s in enumerate(x_or_spectra)]
    else:
        _, spectra = unfolding_spectra(prepare_tensor(x_or_spectra, "x_or_spectra"))
        host = [to_host(s.values) for s in spectra]
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
