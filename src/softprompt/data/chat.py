"""Chat data: a row's `messages` (`[{"role": ..., "content": ...}, ...]`, as in OpenAI's fine-tuning
files) rendered through the tokenizer's own chat template, supervised on the assistant turns only;
and the one encoding of a conversation that training, `generate` and the server share.

Which characters of the rendering belong to assistant turn k is read off the template itself:
the rendering of the turns before it with the generation prompt (`<|im_start|>assistant\\n`) ends
where the answer starts, and the rendering up to and including turn k ends where it stops (its
end-of-turn marker included, so the prompt learns to stop). The rendering is tokenised piece by
piece at those borders, as it is met at inference (the generation prompt's tokens, then the
answer's), so each supervised token is exactly an assistant turn's.

The control tokens (ChatML's <|im_start|> and <|im_end|>...) come from the template alone: the same
characters inside a message's content are tokenised as plain text (split_special_tokens), so that a
user cannot end their turn and forge a system one, and a prompt trains on what it is served.
"""
from __future__ import annotations

from typing import Any

from ..core.utils import SoftpromptError
from .batching import Example

# The roles every chat template knows; OpenAI's `developer` (its newer name for instructions) is
# rendered as `system`, by every tool alike.
ROLES = ("system", "developer", "user", "assistant")
REWRITES = "this chat template rewrites message content, which then cannot hold special tokens' text: remove them"


def text_content(content: Any) -> str | None:
    """A turn's content as text: a string, or OpenAI's list of {"type": "text", "text": str} parts
    joined (as the server takes them: a file exported from an OpenAI chat log holds that form); None
    for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def turn_problem(m: Any) -> str | None:
    """What is wrong with one turn, or None."""
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and text_content(m.get("content")) is not None):
        return 'expected {"role": str, "content": str (or a list of {"type": "text", "text": str} parts)}'
    if m["role"] not in ROLES:
        return f"unknown role {m['role']!r} (the roles are {', '.join(ROLES)})"
    return None


def as_turns(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Checked turns as the chat template takes them: contents as text, `developer` as `system`."""
    return [{"role": "system" if m["role"] == "developer" else m["role"], "content": text_content(m["content"])}
            for m in messages]


def conversation_problem(messages: Any) -> str | None:
    """What is wrong with a conversation's turns, or None."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of {role, content} turns" + \
            ("" if isinstance(messages, list) else f", not a {type(messages).__name__}")
    return next((f"turn {i + 1}: {p}" for i, m in enumerate(messages) if (p := turn_problem(m))), None)


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A conversation to learn from: one that has an assistant turn, after a system or user one."""
    problem = conversation_problem(messages)
    if problem:
        raise SoftpromptError(f"messages at {where}: {problem}")
    turns = as_turns(messages)
    if not any(m["role"] == "assistant" for m in turns):
        raise SoftpromptError(f"messages at {where}: no assistant turn to learn from")
    if turns[0]["role"] == "assistant":  # chat templates render nothing before it to answer
        raise SoftpromptError(f"messages at {where}: the first turn is the assistant's: a conversation starts with a "
                              "system or user turn")
    return turns


def render(tok, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """Checked turns through the tokenizer's chat template; what it refuses is one error line."""
    if not getattr(tok, "chat_template", None):
        raise SoftpromptError("this model's tokenizer has no chat template, which messages need")
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # templates raise on orders they do not take (two system turns...)
        raise SoftpromptError(f"cannot render messages with the chat template: {e}") from None


def special_texts(tok) -> list[str]:
    """The text of every special token (a tokenizer's own and those added as special)."""
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return sorted({t for t in list(tok.all_special_tokens) + added if t})


def content_ranges(tok, messages: list[dict[str, str]], text: str, generation_prompt: bool) -> list[tuple[int, int]]:
    """The [start, end) characters of each turn's content in `text`, its rendering: found by rendering
    placeholders in their place; [] when no content holds a special token's text (nothing to keep apart)."""
    specials = special_texts(tok)
    if not any(s in m["content"] for m in messages for s in specials):
        return []
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: no template's own
    rest = render(tok, [{**m, "content": k} for m, k in zip(messages, marks)], generation_prompt)
    ranges, at = [], 0
    for m, k in zip(messages, marks):
        before, found, rest = rest.partition(k)
        if not found or k in rest or not text.startswith(before + m["content"], at):
            raise SoftpromptError(REWRITES)
        at += len(before)
        ranges.append((at, at + len(m["content"])))
        at += len(m["content"])
    if text[at:] != rest:
        raise SoftpromptError(REWRITES)
    return ranges


def encode_rendering(tok, text: str, cuts: list[int], contents: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """`text` tokenised piece by piece between `cuts` and the borders of `contents` (each content's
    special-token text as plain text); and the token offset of each cut."""
    borders = sorted({0, len(text), *cuts, *(b for r in contents for b in r)})
    ids: list[int] = []
    at: dict[int, int] = {0: 0}
    for a, b in zip(borders, borders[1:]):
        content = any(s <= a < e for s, e in contents)
        ids += tok(text[a:b], add_special_tokens=False, **({"split_special_tokens": True} if content else {})).input_ids
        at[b] = len(ids)
    return ids, [at[c] for c in cuts]


def conversation_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    """Input ids of checked turns rendered for the assistant's answer: `generate` and the server."""
    text = render(tok, messages, True)
    return encode_rendering(tok, text, [], content_ranges(tok, messages, text, True))[0]


def assistant_spans(tok, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's rendering and the [start, end) characters of each assistant turn in it."""
    full = render(tok, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(tok, messages[:k], True), render(tok, messages[:k + 1])
        if not (upto.startswith(before) and full.startswith(upto)) or len(upto) == len(before):
            raise SoftpromptError(f"messages at {where}: this chat template does not render turn {k + 1} after the "
                                  "turns before it (a template that rewrites earlier turns cannot be trained turn by turn)")
        spans.append((len(before), len(upto)))
    return full, spans


def chat_example(tok, messages: Any, max_length: int, where: str) -> tuple[Example | None, bool]:
    """The conversation as one Example (ids, supervised token spans), cut to `max_length` tokens; and
    whether it was cut. None when no assistant token is left within `max_length`."""
    messages = check_messages(messages, where)  # contents as text (text parts joined)
    text, spans = assistant_spans(tok, messages, where)
    cuts = [b for span in spans for b in span]
    ids, at = encode_rendering(tok, text, cuts, content_ranges(tok, messages, text, False))
    supervised = [(s, e) for s, e in zip(at[::2], at[1::2]) if e > s]
    cut = len(ids) > max_length
    ids = ids[:max_length]
    supervised = [(s, min(e, max_length)) for s, e in supervised if s < max_length]
    if not supervised:
        return None, cut
    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
    return Example(ids, supervised[0][0], -1, first_user, tuple(supervised), messages=tuple(messages)), cut
