"""The one rule for a label word's tokens, shared by classification, training data, the `labels`
init and the server: a label word follows its input after a space ("Sentiment: positive"),
unless the input already ends in whitespace; its tokens therefore depend on the input's last
character. Kept apart from classify.py's scorer so that data and prompt code below the forward
pass can read it.
"""
from __future__ import annotations

from typing import Any

from ..core.utils import SoftpromptError


def label_text(word: str, rendered_input: str) -> str:
    """`word` as it follows `rendered_input`: " positive" after "Sentiment:", no extra space after
    a newline or a trailing space."""
    return word if (not rendered_input or rendered_input[-1].isspace()) else " " + word


def label_token_ids(tok, words: list[str], rendered_input: str) -> list[list[int]]:
    return [tok(label_text(w, rendered_input), add_special_tokens=False).input_ids for w in words]


def label_index(words: list[str], value: Any, where: str) -> int:
    """The class a label column's value names: one of `words` (the label values, where --labels maps
    VALUE=WORD), or an index into them (1 and 1.0 alike)."""
    s = str(value).strip()
    if s in words:
        return words.index(s)
    try:
        k = int(float(s))
    except (ValueError, OverflowError):  # not a number, or "inf"
        k = -1
    if 0 <= k < len(words) and float(s) == k:
        return k
    raise SoftpromptError(f"unknown label {value!r} at {where}: expected one of {words} "
                          f"or an index 0..{len(words) - 1}")
