"""The one rule for a label word's tokens, shared by classification, training data, the `labels`
init and the server: a label word follows its input after a space ("Sentiment: positive"),
unless the input already ends in whitespace; its tokens therefore depend on the input's last
character. Kept apart from classify.py's scorer so that data and prompt code below the forward
pass can read it.
"""
from __future__ import annotations


def label_text(word: str, rendered_input: str) -> str:
    """`word` as it follows `rendered_input`: " positive" after "Sentiment:", no extra space after
    a newline or a trailing space."""
    return word if (not rendered_input or rendered_input[-1].isspace()) else " " + word


def label_token_ids(tok, words: list[str], rendered_input: str) -> list[list[int]]:
    return [tok(label_text(w, rendered_input), add_special_tokens=False).input_ids for w in words]
