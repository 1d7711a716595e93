"""The server's wire protocol: OpenAI-shaped request bodies (pydantic, so the OpenAPI page
documents them) and OpenAI-shaped JSON errors, {"error": {"message", "type", "param", "code"}}.

Bodies are strict where leniency would hide a mistake. An unknown field is refused by name. So is
a field of OpenAI's API that this server does not implement (`logit_bias`, `tools`...), unless it
holds the value that means "off", which some clients always send. Types are strict (pydantic's
strict mode): "2", true and 1.0 are not integers, "yes" is not a boolean. Numbers must be finite
and sampling settings within the bounds past which they only overflow the scores. A chat message's
role is one the chat templates know (OpenAI's `developer` is their `system`). Fields OpenAI documents as
nullable take null as their default. Every string must be valid Unicode: a lone surrogate (JSON
allows "\\ud800") would fail the tokenizer.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from ..core.config import PENALTY_RANGE, REPETITION_PENALTY_RANGE


def _unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start})") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
TokenId = Annotated[int, Field(strict=True, ge=0)]  # strict: JSON's true and 1.0 are not token ids
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # OpenAI's seeds are 64-bit; torch's generators take these
# A chat template spends a few tokens on every message; past this many no server's input limit is near,
# and the list is refused before its messages are validated (`few_enough`): pydantic's max_length
# counts after validating every item, which for 4000 messages kept the event loop ~2 ms per request.
MAX_MESSAGES = 1024


def few_enough(messages: Any) -> Any:
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise ValueError(f"List should have at most {MAX_MESSAGES} items, not {len(messages)}")
    return messages


def null_is(default: Any) -> BeforeValidator:
    """JSON null as the field's default: OpenAI documents these fields as nullable, and clients that forward
    an unset option (`top_p=None`) send null."""
    return BeforeValidator(lambda v: default if v is None else v)


def unsupported(*off: Any) -> Any:
    """An OpenAI field this server does not implement: refused unless absent, null or one of `off`."""
    shown = " or ".join(json.dumps(v) for v in off)
    return Field(None, description=f"not supported: leave it out (or send {shown})",
                 json_schema_extra={"x-off": list(off)})


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def unsupported_field(self) -> tuple[str, list] | None:
        """The first unsupported field set to something other than 'off', with its 'off' values."""
        for name, f in type(self).model_fields.items():
            off = (f.json_schema_extra or {}).get("x-off")
            value = getattr(self, name)
            if off is not None and value is not None and value not in off:  # 0.0 and false count as 0
                return name, off
        return None


# ---------------------------------------------------------------- request shapes (documented by OpenAPI)

class StreamOptions(Body):
    include_usage: bool = Field(False, description="end the stream with a chunk holding the usage")


class Sampling(Body):
    """The decoding fields completions and chat share."""
    model: Text = Field(description="a loaded soft prompt's name, or the base model's name for no prompt")
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice (default 16; capped by the server)")
    temperature: float | None = Field(None, ge=0, le=10, allow_inf_nan=False,
                                      description="0 or absent: greedy; > 0: sampling")
    top_p: Annotated[float, null_is(1.0)] = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                                                  description="nucleus sampling threshold (sampling only; null: 1)")
    n: Annotated[int, null_is(1)] = Field(1, ge=1, description="choices per prompt (null: 1)")
    stop: Text | list[Text] | None = Field(None, description="up to 4 strings that end a choice (not included)")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="sampling seed (64-bit); choice k uses seed + k")
    stream: bool = Field(False, description="send server-sent events as tokens come, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                      allow_inf_nan=False, description="penalise tokens already present (1 = off)")
    # OpenAI's penalties (null, as OpenAI takes it, is 0: off).
    presence_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1], allow_inf_nan=False,
                                           description="subtracted from the logit of every token this choice "
                                                       "has generated already (0 = off)")
    frequency_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1], allow_inf_nan=False,
                                            description="times its count in this choice's generated tokens, "
                                                        "subtracted from each token's logit (0 = off)")
    user: Text | None = None
    logit_bias: Any = unsupported({})


class CompletionRequest(Sampling):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description="text to continue, or its token ids (taken as they are: no BOS, no chat template); "
                    "a list of texts or of id lists gives one choice set per prompt")
    max_tokens: int | None = Field(None, ge=0, description="new tokens per choice (default 16; capped by the "
                                                           "server); 0 with echo scores the prompt only")
    logprobs: Annotated[int, Field(strict=True)] | None = Field(
        None, ge=0, le=5, description="return each token's log-probability and the N most probable tokens at "
                                      "its position (OpenAI's legacy shape), as the soft prompt's model sees them")
    echo: bool | None = Field(None, description="return the prompt before the completion (with logprobs: its "
                                                "tokens' log-probabilities too, the first one null)")
    suffix: Any = unsupported("")
    best_of: Any = unsupported(1)


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="the roles chat templates know; OpenAI's developer role is their system role")
    content: Text | list[TextPart] = Field(description="text, or OpenAI's list of {type: 'text', text} parts")
    name: Text | None = Field(None, description="the participant's name: taken, not rendered (chat templates have "
                                                "no place for it)")


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], BeforeValidator(few_enough)] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="rendered with the tokenizer's chat template")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool | None = Field(None, description="return each generated token's log-probability")
    top_logprobs: Annotated[int, Field(strict=True)] | None = Field(
        None, ge=0, le=20, description="with logprobs: the N most probable tokens at each position")
    tools: Any = unsupported([])
    tool_choice: Any = unsupported("none")
    functions: Any = unsupported([])
    function_call: Any = unsupported("none")
    response_format: Any = unsupported({"type": "text"})
    parallel_tool_calls: bool | None = Field(None, description="taken, with nothing to do: no tools are served")


class ClassifyRequest(Body):
    task: Text = Field(description="a loaded soft prompt's name (or the base model's name)")
    text: Text | dict[str, Text] = Field(
        description="the input; a task whose prompt records a template of one column (e.g. 'Review: "
                    "{sentence}\\nSentiment:') takes the text of that column, which fills it; one of several columns "
                    "takes an object of them ({\"premise\": ..., \"hypothesis\": ...})")
    labels: list[Text] | None = Field(None, description="label words (default: the prompt's own, from its training)")
    template: Text | None = Field(None, description="a template that the text fills instead of the prompt's own "
                                  "(another task of a prompt trained on a mixture; a template for the base model): "
                                  "of one column for a string text, of the object's columns for an object; '' sends "
                                  "the text as it is")


class LoadPromptRequest(Body):
    name: Text = Field(description="the name clients will pass as `model`")
    path: Text = Field(description="prompt folder (or .safetensors file) on the server's disk")
    replace: bool = Field(False, description="swap the prompt of a name already loaded (requests already "
                                             "queued with the old one finish with it); without it: 409")


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ("invalid_request_error" if status < 500 and status not in (401, 403, 404, 429)
            else {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                  429: "rate_limit_error", 503: "overloaded_error"}.get(status, "server_error"))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorResponse(JSONResponse):
    """An error as JSON in ASCII: a message may quote the client's own text, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> ErrorResponse:
    return ErrorResponse(error_body(status, message, param, code), status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one message naming the first bad field, and that field (OpenAI's `param`)."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    parts, first = [], None
    for e in errs[:3]:
        loc = ".".join(map(str, field_path(e)))
        first = first or loc or None
        msg = "unknown field (this server does not take it)" if e.get("type") == "extra_forbidden" else e.get("msg")
        parts.append(f"{loc or 'body'}: {msg}")
    return "invalid request: " + "; ".join(parts), first


def field_path(error: dict) -> list:
    """An error's location as the client wrote it: field names and list indexes, without
    pydantic's union-branch tags ('str', 'list[str]'...) and the leading 'body'."""
    names = {n for cls in _models(Body) for n in cls.model_fields}
    loc = list(error.get("loc", ()))
    # A key of an object field (a classify text's column) follows its branch tag 'dict[str,...]'.
    keys = {i + 1 for i, x in enumerate(loc) if isinstance(x, str) and x.startswith("dict[")}
    keep = [x for i, x in enumerate(loc[:-1]) if isinstance(x, int) or x in names or i in keys]
    last = loc[-1:] if loc and (isinstance(loc[-1], int) or loc[-1] in names or len(loc) - 1 in keys
                                or error.get("type") == "extra_forbidden") else []
    return keep + last


def _models(cls) -> list[type]:
    return [cls] + [m for sub in cls.__subclasses__() for m in _models(sub)]
