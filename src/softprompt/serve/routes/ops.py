"""Operations: GET /v1/models (OpenAI's model list), /health (liveness) and /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from ..context import Ctx

router = APIRouter()

SCHEDULER_COUNTERS = ("batches", "batch_jobs", "gen_rows", "classify_rows", "generated_tokens", "failed_jobs",
                      "batch_retries", "rejected_jobs")


@router.get("/v1/models", tags=["openai"], summary="The loaded prompts and the base model")
async def models(ctx: Ctx):
    return {"object": "list", "data": [ctx.model_card(e) for e in ctx.registry.items.values()]}


@router.get("/health", tags=["ops"], summary="Liveness: 200 while the scheduler thread runs")
async def health(ctx: Ctx):
    ok = ctx.scheduler.alive
    body = {"status": "ok" if ok else "scheduler stopped", "model": ctx.base,
            "prompts": len(ctx.registry.items) - 1, "queue": ctx.scheduler.depth}
    return JSONResponse(body, 200 if ok else 503)


@router.get("/metrics", tags=["ops"], summary="Prometheus text metrics", response_class=PlainTextResponse)
async def metrics_page(ctx: Ctx):
    sched, s = ctx.scheduler, ctx.scheduler.stats
    text = ctx.metrics.render(
        gauges={"queue_depth": sched.depth, "queue_limit": ctx.cfg.max_queue,
                "prompts_loaded": len(ctx.registry.items) - 1, "prompt_kv_cached": len(sched.kv.store),
                "scheduler_up": int(sched.alive)},
        counters={k: s[k] for k in SCHEDULER_COUNTERS})
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
