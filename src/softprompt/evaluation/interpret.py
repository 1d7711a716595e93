"""Reading a soft prompt: for each virtual token, its nearest vocabulary tokens by cosine similarity
to the model's input embeddings (Lester et al. 2021, section 7: learned prompts often sit near
label words and task words, though many virtual tokens have no close token at all).

A prefix (per-layer keys and values, no input embeddings) has no nearest tokens: for it the
command reports per-layer key and value norms beside the model's own for text (prefix_norms.py).

Named `interpret` rather than `inspect`, which would shadow the standard library module.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F

from ..base.models import load_model
from ..core.config import ModelConfig, add_args
from ..core.prompt_protocol import embeds_for
from ..core.utils import SoftpromptError, warn
from ..prompts.prefix import KIND as PREFIX
from ..prompts.prompt import load_prompt
from ..prompts.recorded import base_flags, fill_base, read_meta
from .prefix_norms import format_prefix, inspect_prefix


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities [P, k] and token ids [P, k] of each prompt row's k nearest embedding rows."""
    sims = F.normalize(prompt.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).T  # [P, V]
    return sims.topk(min(k, sims.shape[1]), dim=-1)


def inspect_prompt(model, tok, prompt: torch.Tensor, k: int = 5) -> dict[str, Any]:
    emb = model.get_input_embeddings().weight.detach()
    prompt = prompt.detach()
    sims, ids = nearest_tokens(prompt.to(emb.device), emb, k)
    mean_norm = float(emb.float().norm(dim=-1).mean())
    tokens = []
    for p in range(prompt.shape[0]):
        tokens.append({"position": p, "norm": round(float(prompt[p].float().norm()), 4),
                       "nearest": [{"id": int(i), "token": tok.decode([int(i)]), "cosine": round(float(s), 4)}
                                   for s, i in zip(sims[p], ids[p])]})
    return {"virtual_tokens": prompt.shape[0], "vocab_size": emb.shape[0],
            "mean_vocab_embedding_norm": round(mean_norm, 4), "tokens": tokens}


def inspect_cmd(prompt_dir: str, model_name: str, k: int = 5, device: str = "cpu", model=None, tok=None) -> dict:
    if model is None:
        read_meta(prompt_dir)  # a folder without a prompt is refused before the model loads
        model, tok = load_model(ModelConfig(model=model_name, device=device))
    sp = load_prompt(prompt_dir, model)  # a prefix's layer and head counts checked against the model's
    if sp.kind == PREFIX:
        return {"prompt": prompt_dir, "model": model_name, **inspect_prefix(model, tok, sp.key_values())}
    embeds = embeds_for(sp, "inspect's nearest-token view", prompt_dir)
    return {"prompt": prompt_dir, "model": model_name, "kind": sp.kind, **inspect_prompt(model, tok, embeds, k)}


def format_inspection(r: dict[str, Any]) -> str:
    if r.get("kind") == PREFIX:
        return format_prefix(r)
    lines = [f"{r['prompt']}: {r['virtual_tokens']} virtual tokens; nearest of {r['vocab_size']} vocabulary "
             f"embeddings by cosine (mean vocabulary embedding norm {r['mean_vocab_embedding_norm']:.3f})"]
    for t in r["tokens"]:
        near = "  ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in t["nearest"])
        lines.append(f"{t['position']:>4}  norm {t['norm']:7.3f}  {near}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the `inspect` command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt_dir", metavar="DIR", help="prompt folder or hf://REPO_ID[@REV]")
    add_args(parser, ModelConfig, skip=("dtype", "quantize"))  # --model, --device: as a run's --config records them
    base_flags(parser)
    parser.add_argument("--top-k", type=int, default=None, help="neighbours per virtual token (default: 5; not for a "
                                                                "prefix, which shows per-layer key/value norms)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    top_k = 5 if args.top_k is None else args.top_k
    if top_k < 1:
        raise SoftpromptError(f"--top-k must be >= 1 (got {top_k})")
    if args.top_k is not None and read_meta(args.prompt_dir).get("kind") == PREFIX:  # hunt 13: ignored, unsaid
        warn(f"--top-k is for a soft prompt's nearest tokens: {args.prompt_dir} is a prefix (per-layer keys and "
             "values), shown by its per-layer norms")
    fill_base(args, args.prompt_dir)
    r = inspect_cmd(args.prompt_dir, args.model, top_k, args.device)
    print(json.dumps(r, indent=2)) if args.json else print(format_inspection(r), end="")
    return 0
