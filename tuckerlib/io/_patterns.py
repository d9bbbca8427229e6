r"""Match module names against patterns read from files, in time linear in the name.

PEFT matches a ``rank_pattern`` or ``alpha_pattern`` key ``k`` against a
module name ``n`` as ``re.match(rf"(.*\.)?({k})$", n)``. Python's ``re``
backtracks, so a crafted key such as ``(a+)+`` against a long name of
``a`` characters runs for minutes. A key read from a file is therefore matched with
RE2 (the ``google-re2`` package, installed with the ``cli`` and ``torch``
extras), which runs in time linear in the name and refuses the few
constructs that need backtracking (backreferences, lookaround). Without
RE2, keys without repetition or alternation (``*``, ``+``, ``?``, ``{``,
``|``: nothing that can backtrack) still match with ``re``; any other key is
refused with a message saying to install ``google-re2``. Patterns given in
code are the caller's own and keep Python's ``re`` semantics.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["PatternError", "suffix_matcher"]

_BACKTRACKING = frozenset("*+?{|")


class PatternError(ValueError):
    """A pattern read from a file that cannot be matched safely, or is not a regex."""


def _re2() -> Any:
    try:
        import re2
    except ImportError:
        return None
    return re2


def suffix_matcher(key: str) -> Callable[[str], bool]:
    r"""A test of whether a dotted suffix of a module name matches the pattern ``key``.

    ``matcher(name)`` is true when ``re.match(rf"(.*\.)?({key})$", name)``
    would be (PEFT's rule for ``rank_pattern`` keys), computed in time
    linear in ``name``.

    Raises
    ------
    PatternError
        If ``key`` is not a regular expression, needs backtracking
        (backreferences, lookaround), or, without ``google-re2``, repeats or
        alternates.

    Examples
    --------
    >>> from tuckerlib.io._patterns import suffix_matcher
    >>> matches = suffix_matcher("q_proj")
    >>> matches("model.layers.0.q_proj"), matches("model.layers.0.k_proj")
    (True, False)
    >>> suffix_matcher("(a+)+")("a" * 34 + "!")  # linear time, no hang
    False
    """
    expression = rf"(.*\.)?({key})$"
    re2 = _re2()
    if re2 is not None:
        options = re2.Options()
        options.log_errors = False
        try:
            compiled = re2.compile(expression, options)
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
            raise PatternError(
                f"pattern {key!r} is not a regular expression RE2 can match in linear time "
                f"({reason})"
            ) from None
        return lambda name: compiled.match(name) is not None
    if _BACKTRACKING.intersection(key):
        raise PatternError(
            f"pattern {key!r} repeats or alternates, which Python's re may match in "
            "exponential time: install google-re2 (pip install google-re2) to use it"
        )
    try:
        compiled = re.compile(expression)
    except re.error as exc:
        raise PatternError(f"pattern {key!r} is not a regular expression ({exc})") from None
    return lambda name: compiled.match(name) is not None
