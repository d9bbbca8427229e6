"""The rules by which a config's name lists name a model's modules and parameters.

A ``target_modules``, ``exclude_modules``, ``target_parameters`` or
``modules_to_save`` list names modules exactly or by a dotted suffix
(``"fc1"`` names ``"blocks.0.fc1"``); a string is a regular expression
matched against the whole name (:func:`matches`). ``rank_pattern`` keys
match exactly, by suffix or as a regex, the most specific first
(:func:`pattern_rank`). These are the only matchers: :class:`flora.FLoRAConfig`
picks ranks with them and :mod:`flora._targets` picks a model's targets.
"""

from __future__ import annotations

import re

__all__ = [
    "check_each_entry_matches",
    "inside",
    "matches",
    "name_matches",
    "pattern_rank",
]


def name_matches(name: str, entry: str, *, regex: bool = True) -> bool:
    """Whether ``entry`` names ``name``: exactly, as a dotted suffix or (``regex``) a full regex.

    Examples
    --------
    >>> from flora.config import name_matches
    >>> name_matches("blocks.0.query", "query"), name_matches("blocks.0.query", "blocks.*query")
    (True, True)
    >>> name_matches("blocks.0.query", "ery")
    False
    """
    if name == entry or name.endswith("." + entry):
        return True
    return regex and re.fullmatch(entry, name) is not None


def pattern_rank(pattern: str, name: str) -> int | None:
    """How specifically a ``rank_pattern`` key names ``name``: 0 exact, 1 suffix, 2 regex."""
    if name == pattern:
        return 0
    if name.endswith("." + pattern):
        return 1
    if re.fullmatch(pattern, name) is not None:
        return 2
    return None


def _entries(spec: list[str] | str) -> list[str]:
    return [spec] if isinstance(spec, str) else spec


def matches(name: str, spec: list[str] | str | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, entry, regex=False) for entry in spec)


def check_each_entry_matches(spec: list[str] | str | None, names: list[str], field: str) -> None:
    if spec is None:
        return
    for entry in _entries(spec):
        single: list[str] | str = [entry] if isinstance(spec, list) else entry
        if not any(matches(name, single) for name in names):
            raise ValueError(f"{field} entry {entry!r} matches no name in the model")


def inside(name: str, outer: list[str]) -> bool:
    return any(name == o or name.startswith(o + ".") for o in outer)
