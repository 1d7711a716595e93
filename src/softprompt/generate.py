"""Generation: continue texts with or without a soft prompt, greedy or sampled, in one batch
(decode.py runs the batch)."""
from __future__ import annotations

import torch

from .config import GenerateConfig
from .data import chat_wrap
from .decode import PromptKV
from .static_decode import decode_batch_for


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
