"""POST /v1/classify: rank classification of a text over label words, with a task's soft prompt.

The label is the word whose tokens the model finds most probable after the text; the tokens
follow classify.label_token_ids' rule and are scored by classify.label_scores on the scheduler.
"""
from __future__ import annotations

import math

from fastapi import APIRouter

from ...classify import label_token_ids
from ...data import chat_wrap
from ..context import Ctx
from ..protocol import ApiError, ClassifyRequest
from ..scheduler import ClassifyJob

router = APIRouter(tags=["softprompt"])


@router.post("/v1/classify", summary="Rank-classify a text over label words")
async def classify(req: ClassifyRequest, ctx: Ctx):
    """The label whose tokens the model finds most probable after the text (with the task's prompt);
    `scores` are log-probabilities of each label's tokens, `probabilities` their softmax."""
    entry = ctx.registry.get(req.task, "task")
    labels = req.labels if req.labels is not None else list(entry.meta.get("labels") or [])
    if len(labels) < 2:
        raise ApiError(400, "labels: give at least two label words (this task has none of its own)", "labels")
    if len(labels) > 64 or len(set(labels)) != len(labels) or any(not w.strip() for w in labels):
        raise ApiError(400, "labels must be 2 to 64 distinct non-empty words", "labels")
    chat = bool(entry.meta.get("chat"))
    rendered = chat_wrap(ctx.tok, req.text) if chat and req.text else req.text
    ids = ctx.encode(rendered, chat, "text", req.text)
    cands = label_token_ids(ctx.tok, labels, rendered)
    ctx.fits(entry, ids, max(len(c) for c in cands), "text")
    job = ClassifyJob(entry.tensor, ids, candidates=cands)
    ctx.submit([job])
    (scores,) = await ctx.results([job])
    m = max(scores)
    z = sum(math.exp(s - m) for s in scores)
    best = max(range(len(labels)), key=lambda k: scores[k])
    return {"task": req.task, "label": labels[best], "scores": dict(zip(labels, scores)),
            "probabilities": {w: math.exp(s - m) / z for w, s in zip(labels, scores)},
            "usage": {"prompt_tokens": len(ids)}}
