"""Reading a prefix (a deep prompt, kind "prefix"): how large its keys and values are in each layer,
beside the model's own keys and values for ordinary text.

A prefix has no input embeddings, so there are no nearest vocabulary tokens to show (interpret.py's
view). What can be read is its scale: for each layer, the L2 norm of each virtual token's key and
of its value (the layer's kv heads together, the vector k_proj / v_proj would produce), their mean
and max over the P virtual tokens. Alone those numbers mean little, so each layer also shows the
same norms of the frozen model's own keys and values for a short fixed English text
(REFERENCE_TEXT): a prefix whose keys are 10x the text's in some layer dominates that layer's
attention; one near the text's reads like text. Both are taken from the key/value cache, after the
model's rotary embedding, which rotates each pair of coordinates and so keeps the norms.
"""
from __future__ import annotations

from typing import Any

import torch

from ..base.families import kv_geometry
from ..prompts.prefix import text_key_values

REFERENCE_TEXT = ("The city library opens at nine in the morning. Visitors can borrow up to five books, "
                  "read the daily newspapers, or ask the staff for help with their questions.")
REFERENCE = ("the frozen model's own keys and values for a fixed English text, over its {n} tokens after the "
             "first (many models make the first position an attention sink of unusual norm)")


def token_norms(kv: torch.Tensor) -> torch.Tensor:
    """[L, 2, kv_heads, T, head_dim] -> [L, 2, T]: each position's key and value L2 norm, its kv heads together."""
    L, two, heads, T, d = kv.shape
    return kv.float().permute(0, 1, 3, 2, 4).reshape(L, two, T, heads * d).norm(dim=-1)


def _stats(norms: torch.Tensor) -> dict[str, float]:
    return {"mean": float(norms.mean()), "max": float(norms.max())}


@torch.no_grad()
def inspect_prefix(model, tok, kv: torch.Tensor) -> dict[str, Any]:
    """Per-layer key and value norms of a prefix's [L, 2, kv_heads, P, head_dim], beside the model's own
    for REFERENCE_TEXT (its first position left out)."""
    mine = token_norms(kv.detach().cpu())
    n = len(tok(REFERENCE_TEXT, add_special_tokens=False).input_ids)
    ref = token_norms(text_key_values(model, tok, REFERENCE_TEXT, n).cpu())[:, :, 1:]
    L, heads, d = kv_geometry(model)
    layers = [{"layer": i, "key": _stats(mine[i, 0]), "value": _stats(mine[i, 1]),
               "text_key": _stats(ref[i, 0]), "text_value": _stats(ref[i, 1])} for i in range(mine.shape[0])]
    return {"kind": "prefix", "virtual_tokens": kv.shape[3], "layers": L, "kv_heads": heads, "head_dim": d,
            "norm": "L2 norm of each virtual token's key (value) in a layer, its kv heads together; mean and max "
                    "over the virtual tokens",
            "reference": {"text": REFERENCE_TEXT, "tokens": ref.shape[2],
                          "what": REFERENCE.format(n=ref.shape[2])},
            "per_layer": layers}


def format_prefix(r: dict[str, Any]) -> str:
    """The text view of inspect_prefix's result: one line per layer."""
    ref = r["reference"]
    lines = [f"{r['prompt']}: a prefix of {r['virtual_tokens']} virtual tokens over {r['layers']} layers "
             f"({r['kv_heads']} kv heads x {r['head_dim']}).",
             f"Norms: {r['norm']}.",
             f"Reference (text k, text v: their mean norm): {ref['what']}: {ref['text']!r}.",
             f"{'layer':>5}  {'key mean':>9} {'key max':>9} {'text k':>9}   "
             f"{'value mean':>10} {'value max':>9} {'text v':>9}"]
    for x in r["per_layer"]:
        lines.append(f"{x['layer']:>5}  {x['key']['mean']:9.3f} {x['key']['max']:9.3f} {x['text_key']['mean']:9.3f}   "
                     f"{x['value']['mean']:10.3f} {x['value']['max']:9.3f} {x['text_value']['mean']:9.3f}")
    return "\n".join(lines) + "\n"
