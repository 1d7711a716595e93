"""POST /v1/classify: rank classification of a text over label words, with a task's soft prompt.

The label is the word whose tokens the model finds most probable after the text; the tokens
follow labels.label_token_ids' rule and are scored by classify.label_scores on the scheduler.
One request may cost at most one full batch's prefill (max_batch x max_input_tokens positions),
and each label at most --max-input-tokens tokens: multi-token labels take one pass each over text
+ label, and without those bounds a few dozen long labels on a long text (or one label of 2000
tokens) held the scheduler thread for tens of seconds. The scheduler runs those passes in chunks
between decode steps, so decoding rows wait for one chunk, not the whole request.
"""
from __future__ import annotations

import json
import math
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...core.config import template_fields, unescape
from ...data.labels import label_token_ids
from ...prompts.recorded import fill_columns, fill_one
from ..chat_input import render
from ..context import Ctx, ServerContext
from ..jobs import ClassifyJob
from ..metrics import ParsedBodyRoute
from ..protocol import ApiError, ClassifyRequest
from ..registry import Loaded

router = APIRouter(tags=["softprompt"], route_class=ParsedBodyRoute)


@router.post("/v1/classify", summary="Rank-classify a text over label words")
async def classify(req: ClassifyRequest, ctx: Ctx, request: Request):
    """The label whose tokens the model finds most probable after the text (with the task's prompt);
    `scores` are log-probabilities of each label's tokens, `probabilities` their softmax. When the
    task's prompt records a template of one column ("Review: {sentence}\nSentiment:"), the text
    fills that column first, as in training; `template` gives another one ('': none)."""
    entry = ctx.registry.get(req.task, "task")
    labels = req.labels if req.labels is not None else list(entry.meta.get("labels") or [])
    if len(labels) < 2:
        raise ApiError(400, "labels: give at least two label words" + (
            " (this task has none of its own)" if req.labels is None else ""), "labels")
    if len(labels) > 64 or len(set(labels)) != len(labels) or any(not w.strip() for w in labels):
        raise ApiError(400, "labels must be 2 to 64 distinct non-empty words", "labels")
    if sum(map(len, labels)) > ctx.cfg.max_input_tokens * 64:  # as encode: do not even tokenise absurd labels
        raise ApiError(400, f"labels are too long ({sum(map(len, labels))} characters)", "labels")
    template = entry.meta.get("template") if req.template is None else req.template
    if isinstance(req.text, str):
        one_column(req.task, req.template, template)
        text = req.text
    else:  # an object fills the template's columns, and the filled text is sent as it is
        text, template = filled_columns(req.task, template, req.text), ""
    ids, cands = await run_in_threadpool(tokenized, ctx, entry, text, labels, template)  # off the event loop
    ctx.fits(entry, ids, max(len(c) for c in cands), "text")
    within_budget(ctx, ids, cands)
    job = ClassifyJob(entry.tensor, ids, candidates=cands)
    ctx.submit([job])
    (scores,) = await ctx.results([job], request)
    m = max(scores)
    z = sum(math.exp(s - m) for s in scores)
    best = max(range(len(labels)), key=lambda k: scores[k])
    return {"task": req.task, "label": labels[best], "scores": dict(zip(labels, scores)),
            "probabilities": {w: math.exp(s - m) / z for w, s in zip(labels, scores)},
            "usage": {"prompt_tokens": len(ids)}}


def one_column(task: str, given: str | None, template: Any) -> None:
    """A string text fills a template of one column, or none ('' given): refuse a template of several
    (the bare text is not what the prompt was trained on; an object of columns fills those)."""
    if given and fill_one(given, "") is None:
        raise ApiError(400, f"template {given[:200]!r} must name exactly one column, as a plain {{sentence}} "
                            "(no !conversion or :format), or be '' for the text as it is; a text object of columns "
                            "fills a template of several", "template")
    columns = template_fields(unescape(template)) if isinstance(template, str) else []
    if given is None and len(columns) > 1:
        raise ApiError(400, f"task {task!r} was trained on a template of the columns {', '.join(columns)} "
                            f"({template[:200]!r}): send text as an object of them "
                            f"({{{', '.join(f'{json.dumps(c)}: ...' for c in columns[:8])}}}), or formatted as the "
                            "template with template '' (the text as it is)", "text")


def filled_columns(task: str, template: Any, row: dict[str, str]) -> str:
    """A text object's columns through the template (the task's recorded one, or the request's)."""
    columns = template_fields(unescape(template)) if isinstance(template, str) else []
    if not columns:
        raise ApiError(400, f"text is an object of columns, but no template names them (task {task!r} records "
                            "none, or template '' was given): give a template of them, or text as a string", "text")
    filled = fill_columns(template, row)
    if filled is None:
        lacks = [c for c in columns if c not in row]
        raise ApiError(400, f"text lacks the column {lacks[0]!r} of the template {template[:200]!r}" if lacks else
                            f"the template {template[:200]!r} takes plain columns only ({{premise}}: no !conversion "
                            "or :format)", "text" if lacks else "template")
    return filled


def tokenized(ctx: ServerContext, entry: Loaded, text: str, labels: list[str],
              template: str | None) -> tuple[list[int], list[list[int]]]:
    """The text's input ids (filling `template`, chat-wrapped for a chat prompt) and each label's token
    ids after it, each label within --max-input-tokens."""
    if not text:
        raise ApiError(400, "text is empty: give at least one token of input", "text")
    # A recorded template of one column takes the raw text, as the prompt was trained.
    filled = fill_one(template, text)
    text = text if filled is None else filled
    if entry.meta.get("chat"):
        msgs = [{"role": "user", "content": text}]
        ids, rendered = ctx.encode_messages(msgs, "text"), render(ctx.tok, msgs, "text")
    else:
        ids, rendered = ctx.encode(text, "text"), text
    cands = label_token_ids(ctx.tok, labels, rendered)
    longest = max(range(len(cands)), key=lambda k: len(cands[k]))
    if len(cands[longest]) > ctx.cfg.max_input_tokens:
        raise ApiError(400, f"labels.{longest} has {len(cands[longest])} tokens, over this server's limit of "
                            f"{ctx.cfg.max_input_tokens}", "labels", "context_length_exceeded")
    return ids, cands


def within_budget(ctx: ServerContext, ids: list[int], cands: list[list[int]]) -> None:
    """Refuse labels whose scoring would run more token positions than one full batch's prefill.
    label_scores runs single-token labels as one pass over the text, others as one pass per label."""
    cost = len(ids) if all(len(c) == 1 for c in cands) else sum(len(ids) + len(c) for c in cands)
    budget = ctx.cfg.max_batch * ctx.cfg.max_input_tokens
    if cost > budget:
        raise ApiError(400, f"labels: scoring {len(cands)} labels of up to {max(map(len, cands))} tokens after a "
                            f"{len(ids)}-token text runs {cost} token positions, over this server's {budget} per "
                            "request: use fewer or shorter labels, or a shorter text", "labels", "request_too_large")
