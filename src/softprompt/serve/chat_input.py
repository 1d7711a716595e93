"""Chat messages to input ids for the server: data.chat's encoding (the one training and `generate`
use, each content's special-token text as plain text), its refusals as 400s naming the field."""
from __future__ import annotations

from ..core.utils import SoftpromptError
from ..data import chat
from .protocol import ApiError


def as_request_error(param: str, encode, tok, messages: list[dict[str, str]]):
    """encode(tok, messages), its refusals (no chat template, an order the template refuses) as 400s."""
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param)
    try:
        return encode(tok, messages)
    except SoftpromptError as e:
        raise ApiError(400, str(e), param) from None


def render(tok, messages: list[dict[str, str]], param: str) -> str:
    """The messages through the tokenizer's chat template, ready for the assistant's turn."""
    return as_request_error(param, lambda t, m: chat.render(t, m, True), tok, messages)


def chat_ids(tok, messages: list[dict[str, str]], param: str) -> list[int]:
    """Input ids of `messages` rendered for the assistant's answer, their content taken as text."""
    return as_request_error(param, chat.conversation_ids, tok, messages)
