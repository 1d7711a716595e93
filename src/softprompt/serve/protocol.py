"""The server's wire protocol: OpenAI-shaped request bodies (pydantic, so the OpenAPI page
documents them) and OpenAI-shaped JSON errors, {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field


# ---------------------------------------------------------------- request shapes (documented by OpenAPI)

class CompletionRequest(BaseModel):
    model: str = Field(description="a loaded soft prompt's name, or the base model's name for no prompt")
    prompt: str | list[str] = Field(description="text to continue (a list gives one choice set per text)")
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice (default 16; capped by the server)")
    temperature: float | None = Field(None, ge=0, le=10, description="0 or absent: greedy; > 0: sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold (sampling only)")
    n: int = Field(1, ge=1, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end a choice (not included)")
    seed: int | None = Field(None, description="sampling seed; choice k uses seed + k")
    stream: bool = Field(False, description="send server-sent events as tokens come, ending with data: [DONE]")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="penalise tokens already present (1 = off)")
    logprobs: int | None = Field(None, description="not supported (must be absent)")
    echo: bool = Field(False, description="not supported (must be false)")
    user: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] = Field(description="text, or OpenAI's list of {type: 'text', text} parts")


class ChatCompletionRequest(BaseModel):
    model: str = Field(description="a loaded soft prompt's name, or the base model's name for no prompt")
    messages: list[ChatMessage] = Field(min_length=1, description="rendered with the tokenizer's chat template")
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice (default 16; capped by the server)")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(None, ge=0, le=10, description="0 or absent: greedy; > 0: sampling")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    logprobs: bool | None = Field(None, description="not supported (must be absent or false)")
    user: str | None = None


class ClassifyRequest(BaseModel):
    task: str = Field(description="a loaded soft prompt's name (or the base model's name)")
    text: str = Field(description="the input, formatted as the prompt was trained on (e.g. 'Review: ...\\nSentiment:')")
    labels: list[str] | None = Field(None, description="label words (default: the prompt's own, from its training)")


class LoadPromptRequest(BaseModel):
    name: str = Field(description="the name clients will pass as `model`")
    path: str = Field(description="prompt folder (or .safetensors file) on the server's disk")


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


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one message naming the first bad field, and that field (OpenAI's `param`)."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    parts, first = [], None
    for e in errs[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        first = first or loc or None
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts), first
