"""Prompt engineering, compare's baselines: a written instruction (zero-shot), plus K training
examples with their answers (k-shot), before each held-out input, scored on the same tokens as
every other row (the target, the label word, or a chat row's own assistant turns).

On chat data the context is turns, not text: the instruction joins the row's own leading system
message as one system turn (templates refuse two), and each shot is a whole earlier conversation,
answers included, before the row's own turns.
"""
from __future__ import annotations

import json
import random

from ..data.batching import Example
from ..data.chat import chat_example, render
from ..data.formatting import Formatter
from .train import default_init_text

LONGEST = 1 << 30  # a row with its context is not cut: the row's own cut already chose its scored tokens


def default_instruction(fmt: Formatter) -> str:
    if fmt.task == "classify":
        return default_init_text(fmt)
    return "Write what follows each input, in the style of the examples."


def pick_shots(fmt: Formatter, train_ex: list[Example], k: int, seed: int) -> list[Example]:
    """K training examples, seeded; for classification taken round-robin over the labels, so that a
    small K does not show only one class (which would bias the model towards it), then shuffled."""
    order = list(range(len(train_ex)))
    random.Random(seed).shuffle(order)
    if fmt.task != "classify":
        return [train_ex[i] for i in order[:k]]
    buckets = [[i for i in order if train_ex[i].label == c] for c in range(len(fmt.label_words))]
    picked: list[int] = []
    while len(picked) < min(k, len(train_ex)):
        for b in buckets:
            if b and len(picked) < k:
                picked.append(b.pop(0))
    # Shuffled, so that the last shot (which small models tend to copy) is not always the same label.
    random.Random(seed + 1).shuffle(picked)
    return [train_ex[i] for i in picked]


def shot_text(fmt: Formatter, tok, ex: Example) -> str:
    """A training example rendered with the template and its gold answer, as the model should continue."""
    if fmt.task == "classify":
        return ex.text + fmt.label_text(ex.label, ex.text)
    if fmt.task == "target":
        tgt = ex.ids[ex.loss_start:]
        if tgt and tgt[-1] == tok.eos_token_id:
            tgt = tgt[:-1]
        return ex.text + tok.decode(tgt)
    return ex.text


def build_context(instruction: str, shots: list[str]) -> str:
    return "".join(part + "\n\n" for part in ([instruction] if instruction else []) + shots)


def with_context(fmt: Formatter, ex: Example, context: str) -> Example:
    """`ex` with `context` before its input; the supervised tokens (target or label) stay the same."""
    text = context + ex.text
    ids = fmt.tokenize_rendered(fmt.render_input(text))
    if fmt.task == "lm":  # score the text, not the context: supervise from where the ids leave the context's
        ctx = fmt.tokenize_rendered(fmt.render_input(context))
        n = next((i for i, (a, b) in enumerate(zip(ids, ctx)) if a != b), min(len(ids), len(ctx)))
        return Example(ids, n, ex.label, text)
    return Example(ids + ex.ids[ex.loss_start:], len(ids), ex.label, text)


def leading_system(turns: list[dict[str, str]]) -> tuple[list[str], list[dict[str, str]]]:
    """The contents of a conversation's opening system turns, and the turns after them."""
    n = next((i for i, t in enumerate(turns) if t["role"] != "system"), len(turns))
    return [t["content"] for t in turns[:n]], list(turns[n:])


def chat_context(instruction: str, shots: list[Example]) -> list[dict[str, str]]:
    """The context turns: the instruction as a system turn, then each shot's conversation (its own
    system turns left out: the row's apply)."""
    turns = [{"role": "system", "content": instruction}] if instruction else []
    return turns + [t for s in shots for t in leading_system(list(s.messages))[1]]


def chat_with_context(fmt: Formatter, ex: Example, context: list[dict[str, str]]) -> Example:
    """A chat row after `context`'s turns, scored on the tokens it was scored on alone: its own
    assistant turns as far as its cut reached (the shots' answers are context)."""
    system, rest = leading_system(context)
    own_system, own = leading_system(list(ex.messages))
    joined = "\n\n".join(system + own_system)
    turns = ([{"role": "system", "content": joined}] if joined else []) + rest + own
    full, _ = chat_example(fmt.tok, turns, LONGEST, "a compared row")
    mine = full.spans[len(full.spans) - sum(t["role"] == "assistant" for t in own):][:len(ex.spans)]
    spans = (*mine[:-1], (mine[-1][0], mine[-1][0] + ex.spans[-1][1] - ex.spans[-1][0]))
    return Example(full.ids[:spans[-1][1]], spans[0][0], -1, ex.text, spans, messages=tuple(turns))


def engineered(fmt: Formatter, tok, instruction: str, shots: list[Example],
               rows: list[Example]) -> tuple[str, list[Example], int]:
    """The context as saved (its whole artifact: text, or chat turns as JSON lines), `rows` after it,
    and its length in tokens."""
    if fmt.task != "chat":
        context = build_context(instruction, [shot_text(fmt, tok, e) for e in shots])
        size = len(tok(context, add_special_tokens=False).input_ids)
        return context, [with_context(fmt, e, context) for e in rows], size
    turns = chat_context(instruction, shots)
    saved = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in turns)
    size = len(tok(render(tok, turns), add_special_tokens=False).input_ids) if turns else 0
    return saved, [chat_with_context(fmt, e, turns) for e in rows], size
