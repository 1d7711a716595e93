"""OpenAI's `logprobs` answers: what each token reads as, and the completions and chat shapes.

The numbers come from classify.token_logprobs (a ScoreJob on the scheduler): one scoring pass
over [soft prompt ; input ; generated tokens] after generation, the forward every other scorer in
softprompt uses, rather than the decode step's logits. They are log_softmax of the raw logits, before
any temperature, top-p or repetition penalty, so a greedy token is the first of its position's
top_logprobs.

A token's text is what it adds to the text before it (the tokenizer's decode of a few tokens before
it, with and without it), so that leading spaces survive where a lone decode drops them. A token
that holds part of a multi-byte character has no text of its own: as OpenAI does, it reads as
`bytes:\\xf0\\x9f`, and chat's `bytes` carry the token's own bytes, which joined spell the
character (a byte-level BPE token's, or a byte-fallback token's such as <0xF0>).
"""
from __future__ import annotations

import codecs
import re
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

WINDOW = 4  # tokens of context decoded with each token; enough for byte-level BPE to join a character
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for one raw byte


class Pieces:
    """Token texts in context; the tokenizer's decode of the context is computed once per position."""

    def __init__(self, tok):
        self.tok = tok
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        # Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2...) spells each byte as one printable character.
        self.byte_of = ({c: b for b, c in bytes_to_unicode().items()} if type(decoder).__name__ == "ByteLevel"
                        else {})

    def raw(self, token_id: int) -> bytes | None:
        """The token's own bytes, where the vocabulary tells them; None where it does not."""
        piece = self.tok.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return None
        if m := BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        if self.byte_of and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        return None

    @staticmethod
    def shown(raw: bytes | None, text: str) -> tuple[str, list[int]]:
        """(token, bytes) as OpenAI gives them, from a token's own bytes (Pieces.raw) and its text in
        context: that text, or `bytes:\\x..` for part of a character."""
        if raw is None:
            return text, list(text.encode("utf-8"))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)
        return text, list(raw)

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
    chars = codecs.getincrementaldecoder("utf-8")(errors="replace")  # the characters each token completes
    for i in range(first, len(seq)):
        k = i - scored
        alts = tops[k] if k >= 0 else []
        texts = pieces.at(seq[:i], [seq[i]] + [t for t, _ in alts])
        raw = pieces.raw(seq[i])
        token = pieces.shown(raw, texts[0])[0]
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(chars.decode(raw) if raw is not None else texts[0])
        if k < 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lps[k])
        top: dict[str, float] = {}
        for text, (t, lp) in zip(texts[1:], alts):
            top.setdefault(pieces.shown(pieces.raw(t), text)[0], lp)  # two ids may read alike: keep the more probable
        top.setdefault(token, lps[k])  # OpenAI: the chosen token is always among them
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
        shown = [pieces.shown(pieces.raw(i), x) for i, x in zip([t] + [a for a, _ in alts], texts)]
        content.append({"token": shown[0][0], "logprob": lps[k], "bytes": shown[0][1],
                        "top_logprobs": [{"token": x, "logprob": lp, "bytes": b}
                                         for (x, b), (_, lp) in zip(shown[1:], alts)]})
    return {"content": content}
