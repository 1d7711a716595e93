"""Chat data: a row's `messages` (`[{"role": ..., "content": ...}, ...]`, as in OpenAI's fine-tuning
files) rendered through the tokenizer's own chat template, supervised on the assistant turns only.

Which characters of the rendering belong to assistant turn k is read off the template itself:
the rendering of the turns before it with the generation prompt (`<|im_start|>assistant\\n`) ends
where the answer starts, and the rendering up to and including turn k ends where it stops (its
end-of-turn marker included, so the prompt learns to stop). The rendering is tokenised piece by
piece at those borders, as it is met at inference (the generation prompt's tokens, then the
answer's), so each supervised token is exactly an assistant turn's.
"""
from __future__ import annotations

from typing import Any

from ..core.utils import SoftpromptError
from .batching import Example

ROLES = {"system", "user", "assistant", "tool", "developer"}


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


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise SoftpromptError(f"messages at {where}: expected a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and text_content(m.get("content")) is not None):
            raise SoftpromptError(f"messages at {where}, turn {i + 1}: expected {{\"role\": str, \"content\": str "
                                  "(or a list of {\"type\": \"text\", \"text\": str} parts)}")
        if m["role"] not in ROLES:
            raise SoftpromptError(f"messages at {where}, turn {i + 1}: unknown role {m['role']!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise SoftpromptError(f"messages at {where}: no assistant turn to learn from")
    if messages[0]["role"] == "assistant":  # chat templates render nothing before it to answer
        raise SoftpromptError(f"messages at {where}: the first turn is the assistant's: a conversation starts with a "
                              "system or user turn")
    return [{"role": m["role"], "content": text_content(m["content"])} for m in messages]


def render(tok, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tok, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's rendering and the [start, end) characters of each assistant turn in it."""
    if not getattr(tok, "chat_template", None):
        raise SoftpromptError("messages data needs a model whose tokenizer has a chat template")
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
    ids: list[int] = []
    supervised: list[tuple[int, int]] = []
    at = 0
    for s, e in spans + [(len(text), len(text))]:
        ids += tok(text[at:s], add_special_tokens=False).input_ids if s > at else []
        answer = tok(text[s:e], add_special_tokens=False).input_ids if e > s else []
        if answer:
            supervised.append((len(ids), len(ids) + len(answer)))
            ids += answer
        at = e
    cut = len(ids) > max_length
    ids = ids[:max_length]
    supervised = [(s, min(e, max_length)) for s, e in supervised if s < max_length]
    if not supervised:
        return None, cut
    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
    return Example(ids, supervised[0][0], -1, first_user, tuple(supervised)), cut
