"""Generation: continue texts with or without a soft prompt, greedy or sampled, in one batch
(decode.py runs the batch); also the `generate` command, which shows a tuned prompt's
continuations beside the untuned model's."""
from __future__ import annotations

import argparse
import json

import torch

from .config import GenerateConfig, ModelConfig, add_args, from_args, is_unicode
from .data import chat_wrap
from .decode import PromptKV
from .models import load_model
from .prompt import load_prompt
from .prompt_protocol import forward_input
from .static_decode import decode_batch_for
from .utils import SoftpromptError


def generate_batch(model, tok, rows: list[tuple[torch.Tensor | None, list[int]]], cfg: GenerateConfig,
                   kv: PromptKV | None = None, engine=None) -> list[list[int]]:
    """Generate for rows of (soft prompt [P, H] or None, input token ids); returns new token ids.
    `engine`: an idle decode engine to reuse (its CUDA graphs are captured once, not per call)."""
    if not rows:
        return []
    dec = engine if engine is not None else decode_batch_for(model, tok, kv)
    ids = dec.add(rows, cfg)
    while not dec.finished:
        dec.step()
    return [[t for t in dec.pop(i).new if t not in dec.eos] for i in ids]


def encode_for_generation(tok, text: str, chat: bool = False) -> list[int]:
    if chat:  # the chat template already holds its special tokens
        return tok(chat_wrap(tok, text), add_special_tokens=False).input_ids
    return tok(text).input_ids


def generate_cmd(mcfg: ModelConfig, gcfg: GenerateConfig, texts: list[str], prompt: str = "",
                 compare: bool = False, chat: bool = False, model=None, tok=None) -> list[dict[str, str]]:
    """Continuations of `texts`; with `compare`, the untuned model's beside the tuned one's."""
    if not texts:
        raise SoftpromptError("give at least one TEXT to continue")
    bad = [i + 1 for i, t in enumerate(texts) if not is_unicode(t)]
    if bad:
        raise SoftpromptError(f"TEXT {bad[0]} is not valid Unicode text: {texts[bad[0] - 1]!r}")
    if model is None:
        model, tok = load_model(mcfg)
    if compare and not prompt:
        raise SoftpromptError("--compare needs --prompt DIR")
    sp = load_prompt(prompt, model) if prompt and prompt != "none" else None
    p = forward_input(sp)  # [P, H], or a prefix itself (its keys and values are the decoder's cache)
    p = p.detach() if isinstance(p, torch.Tensor) else p
    chat = chat or bool(sp is not None and sp.meta.get("chat"))
    variants = [("baseline", None), ("tuned", p)] if compare else [("tuned" if p is not None else "baseline", p)]
    rows = [(q, encode_for_generation(tok, t, chat)) for t in texts for _, q in variants]
    outs = generate_batch(model, tok, rows, gcfg, PromptKV(model))  # baseline and tuned share one batch
    res = []
    for i, t in enumerate(texts):
        r = {"input": t}
        for j, (name, _) in enumerate(variants):
            r[name] = tok.decode(outs[i * len(variants) + j], skip_special_tokens=True)
        res.append(r)
    return res


# ---------------------------------------------------------------- the `generate` command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_args(parser, ModelConfig)
    add_args(parser, GenerateConfig)
    parser.add_argument("--prompt", default="", help="prompt folder or hf://REPO_ID[@REV] (default: none, the "
                                                     "untuned model)")
    parser.add_argument("--compare", action="store_true", help="show the untuned model's output beside the tuned one")
    parser.add_argument("--chat", action="store_true", help="wrap TEXT in the model's chat template")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="inputs to continue")


def run(args: argparse.Namespace) -> int:
    res = generate_cmd(from_args(ModelConfig, args), from_args(GenerateConfig, args), args.texts, args.prompt,
                       args.compare, args.chat)
    if args.json:
        print(json.dumps(res, indent=2))
    for r in [] if args.json else res:
        print(f"=== {r['input']!r}")
        for k in ("baseline", "tuned"):
            if k in r:
                print(f"--- {k}: {r[k]!r}")
    return 0
