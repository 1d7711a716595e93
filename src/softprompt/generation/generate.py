"""Generation: continue texts with or without a soft prompt, greedy or sampled, in one batch
(decode.py runs the batch); also the `generate` command, which shows a tuned prompt's
continuations beside the untuned model's."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..base.models import load_model
from ..core.config import GenerateConfig, ModelConfig, from_args, is_unicode, template_fields
from ..core.prompt_protocol import forward_input
from ..core.utils import SoftpromptError, missing_file, warn
from ..data.chat import as_turns, conversation_ids, conversation_problem
from ..data.formatting import unescape
from ..prompts.prompt import load_prompt
from ..prompts.recorded import fill_one, prompt_given, read_meta, recorded_data
from ..forward.prefill import PromptKV
from .static_decode import decode_batch_for


def generate_batch(model, tok, rows: list[tuple[torch.Tensor | None, list[int]]], cfg: GenerateConfig,
                   kv: PromptKV | None = None, engine=None, seeds: list[int] | None = None) -> list[list[int]]:
    """Generate for rows of (soft prompt [P, H] or None, input token ids); returns new token ids.
    `engine`: an idle decode engine to reuse (its CUDA graphs are captured once, not per call);
    `seeds`: each sampled row's (default cfg.seed + its index)."""
    if not rows:
        return []
    dec = engine if engine is not None else decode_batch_for(model, tok, kv)
    ids = dec.add(rows, cfg, seeds=seeds)
    while not dec.finished:
        dec.step()
    rows = [dec.pop(i) for i in ids]
    for r in rows:
        if r.error is not None:
            raise r.error
    return [[t for t in r.new if t not in dec.eos] for r in rows]


def encode_for_generation(tok, text: str, chat: bool = False, system: str = "") -> list[int]:
    if chat or system:  # the chat template already holds its special tokens
        return encode_messages(tok, [{"role": "user", "content": text}], system)
    return tok(text).input_ids


def encode_messages(tok, messages: list[dict[str, str]], system: str = "") -> list[int]:
    """Checked turns through the model's chat template, ready for the assistant's next turn (the
    server's encoding: data.chat.conversation_ids)."""
    if not getattr(tok, "chat_template", None):
        raise SoftpromptError("--chat: this model's tokenizer has no chat template")
    return conversation_ids(tok, ([{"role": "system", "content": system}] if system else []) + messages)


def apply_template(template: str, text: str | dict[str, Any], n: int) -> str:
    """TEXT n through the template: its one column filled with the text, or its columns from an
    object ({"premise": ..., "hypothesis": ...}: a JSON object on the command line, a dict from Python)."""
    filled = fill_one(template, text) if isinstance(text, str) else None
    if filled is not None:
        return filled
    cols = template_fields(template)
    row = text
    if isinstance(text, str):
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
    # Quoted as typed in a flag: repr() doubled the backslash of a flag's \n, and a copy of it then failed.
    if not isinstance(row, dict) or any(c not in row for c in cols):
        lacks = [c for c in cols if c not in row] if isinstance(row, dict) else []
        raise SoftpromptError(f"the template '{template}' names the columns {', '.join(cols)}"
                              + (f"; TEXT {n} lacks {', '.join(lacks)}" if lacks else "")
                              + f": give TEXT {n} as a JSON object (a dict from Python) with them, or --template '' "
                              "to send it as it is")
    try:
        return unescape(template).format_map(row)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise SoftpromptError(f"--template '{template}' at TEXT {n}: {type(e).__name__}: {e}") from None


def read_conversations(path: str) -> list[list[dict[str, str]]]:
    """--messages FILE: one {"messages": [{role, content}, ...]} object per line."""
    from ..data.datasource import read_json_rows

    rows = read_json_rows(Path(path)) if Path(path).is_file() else None
    if rows is None:
        raise missing_file(path, "--messages file")
    convs = []
    for i, r in enumerate(rows):
        problem = conversation_problem(r["messages"]) if "messages" in r else \
            'expected {"messages": [{"role": str, "content": str}, ...]}'
        if problem:
            raise SoftpromptError(f"--messages {path} line {i + 1}: {problem}")
        convs.append(r["messages"])
    if not convs:
        raise SoftpromptError(f"--messages {path}: no conversations")
    return convs


def generate_cmd(mcfg: ModelConfig, gcfg: GenerateConfig, texts: list[str | dict[str, Any]], prompt: str = "",
                 compare: bool = False, chat: bool | None = None, model=None, tok=None, template: str | None = None,
                 system: str = "", conversations: list[list[dict[str, str]]] | None = None) -> list[dict[str, str]]:
    """Continuations of `texts` (or replies to `conversations`); a text may be an object of a template's
    columns. With `compare`, the untuned model's beside the tuned one's. `template`: each text's
    template (None: the prompt's recorded one, "": none); `system`: a system message before each input
    (through the chat template)."""
    if not texts and not conversations:
        raise SoftpromptError("give at least one TEXT to continue (or --messages FILE)")
    if texts and conversations:
        raise SoftpromptError("give TEXT arguments or --messages FILE, not both")
    bad = [i + 1 for i, t in enumerate(texts) if isinstance(t, str) and not is_unicode(t)]
    if bad:
        raise SoftpromptError(f"TEXT {bad[0]} is not valid Unicode text: {texts[bad[0] - 1]!r}")
    if compare and not prompt_given(prompt):  # `none` is the untuned model: it would be compared with itself
        raise SoftpromptError("--compare needs --prompt DIR")
    meta = read_meta(prompt) if prompt_given(prompt) else {}
    if meta.get("task") == "classify" and isinstance(meta.get("labels"), list):  # its tuned text looked like a failure
        warn(f"{prompt} was trained to choose among its label words ({', '.join(map(str, meta['labels']))}), not "
             "to write text: `softprompt eval` (or the server's /v1/classify) gives its prediction")
    template = recorded_data(meta).get("template", "") if template is None else template
    objects = [i + 1 for i, t in enumerate(texts) if not isinstance(t, str)]
    if objects and not template:
        raise SoftpromptError(f"TEXT {objects[0]} holds columns, but no template fills them: give a --template of "
                              "its columns")
    inputs = [apply_template(template, t, i + 1) if template else t for i, t in enumerate(texts)]
    if model is None:
        model, tok = load_model(mcfg)
    sp = load_prompt(prompt, model) if prompt_given(prompt) else None
    p = forward_input(sp)  # [P, H], or a prefix itself (its keys and values are the decoder's cache)
    p = p.detach() if isinstance(p, torch.Tensor) else p
    chat = bool(meta.get("chat")) if chat is None else chat  # None: as the prompt was trained
    if conversations:  # as every tool takes them: text parts joined, developer as system
        conversations = [as_turns(c) for c in conversations]
        encoded = [encode_messages(tok, c, system) for c in conversations]
        shown = [c[-1]["content"] for c in conversations]
    else:
        encoded = [encode_for_generation(tok, t, chat, system) for t in inputs]
        shown = texts
    variants = [("baseline", None), ("tuned", p)] if compare else [("tuned" if p is not None else "baseline", p)]
    rows = [(q, ids) for ids in encoded for _, q in variants]
    # Baseline and tuned share one batch, and each text's seed (cfg.seed + its index): a sampled tuned
    # text is the one drawn without --compare, and the baseline beside it draws from the same generator.
    seeds = [gcfg.seed + i for i in range(len(encoded)) for _ in variants]
    outs = generate_batch(model, tok, rows, gcfg, PromptKV(model), seeds=seeds)
    res = []
    for i, t in enumerate(shown):
        r = {"input": t}
        for j, (name, _) in enumerate(variants):
            r[name] = tok.decode(outs[i * len(variants) + j], skip_special_tokens=True)
        res.append(r)
    return res


# ---------------------------------------------------------------- the `generate` command

def run(args: argparse.Namespace) -> int:
    if args.raw and args.input_template is not None:
        raise SoftpromptError("give --template or --raw, not both")
    template = "" if args.raw else None if args.input_template is None else unescape(args.input_template)
    convs = read_conversations(args.messages) if args.messages else None
    res = generate_cmd(from_args(ModelConfig, args), from_args(GenerateConfig, args),
                       [unescape(t) for t in args.texts], args.prompt, args.compare, args.chat,
                       template=template, system=unescape(args.system), conversations=convs)
    if args.json:
        print(json.dumps(res, indent=2))
    for r in [] if args.json else res:
        print(f"=== {r['input']!r}")
        for k in ("baseline", "tuned"):
            if k in r:
                print(f"--- {k}: {r[k]!r}")
    return 0
