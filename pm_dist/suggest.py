"""The one "did you mean …?" of pm_dist: config keys, head and suite names, architectures."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, options: Iterable[str], list_all: bool = False) -> str:
    """`` (did you mean 'x'?)`` for the closest option; with ``list_all``, `` (valid: a, b)`` when
    nothing is close; else an empty string."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(sorted(options))})" if list_all else ""
