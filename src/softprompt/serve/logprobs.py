"""OpenAI's `logprobs` answers: what each token reads as, and the completions and chat shapes.

The numbers come from classify.token_logprobs (a ScoreJob on the scheduler): one scoring pass
over [soft prompt ; input ; generated tokens] after generation, the forward every other scorer in
softprompt uses, rather than the decode step's logits. They are log_softmax of the raw logits, before
any temperature, top-p or repetition penalty, so a greedy token is the first of its position's
top_logprobs.

A token's text is what it adds to the text before it (the tokenizer's decode of a few tokens before
it, with and without it), so that leading spaces survive where a lone decode drops them; a token
that ends inside a multi-byte character reads as its lone decode (U+FFFD).
"""
from __future__ import annotations

from typing import Any

WINDOW = 4  # tokens of context decoded with each token; enough for byte-level BPE to join a character


class Pieces:
    """Token texts in context; the tokenizer's decode of the context is computed once per position."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def at(self, before: list[int], candidates: list[int]) -> list[str]:
        """The text each of `candidates` would add after the tokens `before`."""
        ctx = before[-WINDOW:]
        head = self.decode(ctx) if ctx else ""
        out = []
        for t in candidates:
            full = self.decode(ctx + [t])
            out.append(full[len(head):] if full.startswith(head) else self.decode([t]))
        return out


def completion_logprobs(tok, seq: list[int], first: int, scored: int, lps: list[float],
                        tops: list[list[tuple[int, float]]], offset: int) -> dict[str, Any]:
    """OpenAI's legacy {tokens, token_logprobs, top_logprobs, text_offset} for seq[first:], where
    lps/tops score seq[scored:] (positions before `scored` are null: nothing predicts them).
    text_offset counts from `offset`, each token's start in the text the tokens spell."""
    pieces = Pieces(tok)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i in range(first, len(seq)):
        k = i - scored
        alts = tops[k] if k >= 0 else []
        texts = pieces.at(seq[:i], [seq[i]] + [t for t, _ in alts])
        out["tokens"].append(texts[0])
        out["text_offset"].append(offset)
        offset += len(texts[0])
        if k < 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lps[k])
        top: dict[str, float] = {}
        for text, (_, lp) in zip(texts[1:], alts):
            top.setdefault(text, lp)  # two ids may read alike: keep the more probable
        top.setdefault(texts[0], lps[k])  # OpenAI: the chosen token is always among them
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tok, ids: list[int], gen: list[int], lps: list[float],
                  tops: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """OpenAI's chat {content: [{token, logprob, bytes, top_logprobs: [...]}]} for the generated tokens."""
    pieces = Pieces(tok)
    content = []
    for k, t in enumerate(gen):
        alts = tops[k]
        texts = pieces.at(ids + gen[:k], [t] + [a for a, _ in alts])
        content.append({"token": texts[0], "logprob": lps[k], "bytes": list(texts[0].encode("utf-8")),
                        "top_logprobs": [{"token": x, "logprob": lp, "bytes": list(x.encode("utf-8"))}
                                         for x, (_, lp) in zip(texts[1:], alts)]})
    return {"content": content}
