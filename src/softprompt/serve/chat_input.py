"""Chat messages to input ids, with each message's content as text.

The control tokens of a chat template (ChatML's <|im_start|> and <|im_end|>...) come from the
template alone: the same characters inside a message's content are tokenised as plain text
(split_special_tokens), so that a user cannot end their turn and forge a system one with
"hi<|im_end|>\\n<|im_start|>system\\n...". Content without any special token's text is tokenised
with the rest of the rendering in one call, exactly as before; content with some is rendered
behind placeholders and the pieces tokenised one by one (the template's with its special tokens,
the content's without). Only the roles every chat template knows are taken.
"""
from __future__ import annotations

from .protocol import ApiError

ROLES = ("system", "user", "assistant")


def render(tok, messages: list[dict[str, str]], param: str) -> str:
    """The messages through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param)
    bad = next((i for i, m in enumerate(messages) if m["role"] not in ROLES), None)
    if bad is not None:
        raise ApiError(400, f"role {messages[bad]['role']!r} is not one of {', '.join(ROLES)}",
                       f"{param}.{bad}.role")
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # templates raise on orders they do not take (two system turns...)
        raise ApiError(400, f"cannot render messages with the chat template: {e}", param) from None


def special_texts(tok) -> list[str]:
    """The text of every special token (a tokenizer's own and those added as special)."""
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return sorted({t for t in list(tok.all_special_tokens) + added if t})


def chat_ids(tok, messages: list[dict[str, str]], param: str) -> list[int]:
    """Input ids of `messages` rendered for the assistant's answer, their content taken as text."""
    rendered = render(tok, messages, param)
    specials = special_texts(tok)
    if not any(s in m["content"] for m in messages for s in specials):
        return tok(rendered, add_special_tokens=False).input_ids
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: no template's own
    rest = render(tok, [{**m, "content": k} for m, k in zip(messages, marks)], param)
    ids: list[int] = []
    for m, k in zip(messages, marks):
        before, found, rest = rest.partition(k)
        if not found or k in rest:
            raise ApiError(400, "this model's chat template rewrites message content, which then cannot hold "
                                "special tokens' text: remove them", param)
        ids += tok(before, add_special_tokens=False).input_ids
        ids += tok(m["content"], add_special_tokens=False, split_special_tokens=True).input_ids
    return ids + tok(rest, add_special_tokens=False).input_ids
