"""Operations: GET (or HEAD) /v1/models (OpenAI's model list) and /v1/models/{id}, /health (liveness) and
/metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..context import Ctx, ServerContext
from ..metrics import ParsedBodyRoute
from ..scheduler import COUNTERS

router = APIRouter(route_class=ParsedBodyRoute)


@router.api_route("/v1/models", methods=["GET", "HEAD"], tags=["openai"],
                  summary="The loaded prompts and the base model")
async def models(ctx: Ctx):
    return {"object": "list", "data": [ctx.model_card(e) for e in ctx.registry.items.values()]}


@router.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"], tags=["openai"],
                  summary="One loaded prompt (or the base model) as /v1/models lists it; 404 if none has the name")
async def model(model: str, ctx: Ctx):
    # OpenAI's "retrieve model", which clients call to check a name (`client.models.retrieve(name)`).
    return ctx.model_card(ctx.registry.get(model))


@router.api_route("/health", methods=["GET", "HEAD"], tags=["ops"],
                  summary="Liveness: 200 while the scheduler thread runs")
async def health(ctx: Ctx):
    body, status = health_state(ctx)
    return JSONResponse(body, status)


def health_state(ctx: ServerContext) -> tuple[dict, int]:
    """/health's body and status; runner.py answers a new connection's GET /health with it directly."""
    ok = ctx.scheduler.alive
    body = {"status": "ok" if ok else "scheduler stopped", "model": ctx.base,
            "prompts": len(ctx.registry.items) - 1, "queue": ctx.scheduler.depth}
    return body, 200 if ok else 503


@router.api_route("/metrics", methods=["GET", "HEAD"], tags=["ops"], summary="Prometheus metrics",
                  response_class=Response)
async def metrics_page(ctx: Ctx):
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)


def server_state(ctx: ServerContext) -> tuple[dict[str, float], dict[str, float]]:
    """The scheduler's counters and the server's gauges, as /metrics reports them at each scrape."""
    sched = ctx.scheduler
    counters = {k: sched.stats[k] for k in COUNTERS}
    gauges = {"queue_depth": sched.depth, "queue_limit": sched.max_queue, "decoding_rows": sched.in_flight,
              "prompts_loaded": len(ctx.registry.items) - 1, "prompt_kv_cached": len(sched.kv.store),
              "scheduler_up": int(sched.alive)}
    return counters, gauges
