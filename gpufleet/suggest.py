"""'Did you mean' suggestions for misspelt keys and names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to `word`, or None when nothing is close enough to suggest."""
    options = sorted(set(choices))
    lowered = {c.lower(): c for c in options}
    if word.lower() in lowered:
        return lowered[word.lower()]
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def hint(word: str, choices: Iterable[str], what: str = "key") -> str:
    """A fix sentence: 'did you mean X?' when close, else the list of valid choices."""
    options = sorted(set(choices))
    guess = did_you_mean(word, options)
    if guess is not None:
        return f"did you mean {guess!r}? (valid {what}s: {', '.join(options)})"
    return f"use one of the valid {what}s: {', '.join(options)}"
