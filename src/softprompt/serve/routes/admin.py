"""Admin: load and unload soft prompts at run time, behind a bearer token.

Off unless the server was started with a token (--admin-token or SOFTPROMPT_ADMIN_TOKEN); the
token is compared in constant time. Only safetensors files are read, and a prompt's hidden size
is checked against the model before it is served; one recorded for another base of the same
hidden size loads with a `warnings` list in the answer. A load with `replace: true` swaps a loaded
name's prompt atomically (requests already queued with the old one finish with it).
"""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request

from ...core.utils import SoftpromptError
from ...prompts.prompt import other_base
from ..context import Ctx
from ..metrics import ParsedBodyRoute
from ..protocol import ApiError, LoadPromptRequest


def require_admin(request: Request, ctx: Ctx) -> None:
    token = ctx.cfg.admin_token
    if not token:
        raise ApiError(403, "admin endpoints are off: start the server with --admin-token or "
                            "SOFTPROMPT_ADMIN_TOKEN")
    got = request.headers.get("authorization", "")
    sent = got[7:] if got.lower().startswith("bearer ") else request.headers.get("x-admin-token", "")
    if not sent or not hmac.compare_digest(sent.encode(), token.encode()):
        raise ApiError(401, "missing or wrong admin token (send Authorization: Bearer TOKEN)",
                       headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)], route_class=ParsedBodyRoute)


@router.post("/v1/admin/prompts", status_code=201,
             summary="Load a prompt folder from the server's disk (safetensors only, hidden size checked)")
def load(req: LoadPromptRequest, ctx: Ctx):
    if req.name == ctx.registry.base_name:  # neither unloadable nor replaceable: a 409's advice would not help
        raise ApiError(400, f"{req.name!r} is the base model's name: load the prompt under another name", "name")
    if req.name in ctx.registry.items and not req.replace:  # before reading the file
        raise ApiError(409, f"a model named {req.name!r} is already loaded: unload it first, or send "
                            "replace: true", "name")
    try:
        entry = ctx.registry.add(req.name, req.path, replace=req.replace)
    except SoftpromptError as e:
        raise ApiError(400, str(e), "path") from None
    # A prompt of another base with this one's hidden size loads (as `serve --prompt` warns and loads it);
    # the warning went to the server's log alone, and the client saw a prompt like any other.
    said = other_base(entry.meta.get("model"), ctx.model, f"prompt {req.path}")
    return {**ctx.model_card(entry), **({"warnings": [said]} if said else {})}


@router.delete("/v1/admin/prompts/{name}", summary="Unload a prompt (requests already queued with it still finish)")
def unload(name: str, ctx: Ctx):
    ctx.registry.remove(name)
    return {"id": name, "object": "model", "deleted": True}
