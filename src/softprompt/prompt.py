"""The soft prompt: a `P x hidden` trainable tensor prepended to the input embeddings.

Also its initialisation strategies (random, vocab, text, labels, file) and its file format:
`prompt.safetensors` (one tensor, `prompt_embeddings`, shape [P, H], as PEFT names it) plus
`prompt_config.json` recording the model it was trained for, its hidden size, the init and the
data template. Files are read only through safetensors (never pickle).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PromptConfig
from .utils import SoftpromptError, read_json

FORMAT = "softprompt/1"
TENSOR_NAME = "prompt_embeddings"
WEIGHTS_FILE = "prompt.safetensors"
CONFIG_FILE = "prompt_config.json"
# Lester et al. sample vocabulary inits from the 5,000 most common tokens; BPE ids are roughly
# ordered by merge frequency, so the lowest ids stand in for "most common".
VOCAB_POOL = 5000


class SoftPrompt(nn.Module):
    """Holds the prompt in fp32 whatever the model dtype: updates of ~1e-4 vanish in bf16."""

    def __init__(self, embeds: torch.Tensor, meta: dict[str, Any] | None = None):
        super().__init__()
        self.embeds = nn.Parameter(embeds.detach().to(torch.float32).clone())  # [P, H]
        self.meta = dict(meta or {})

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeds.shape[1]

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.embeds if dtype is None else self.embeds.to(dtype)


def _vocab_pool(tok, vocab_size: int) -> torch.Tensor:
    special = set(getattr(tok, "all_special_ids", []) or [])
    pool = [i for i in range(min(VOCAB_POOL, vocab_size)) if i not in special]
    return torch.tensor(pool)


def _sample_vocab(emb: torch.Tensor, tok, n: int, gen: torch.Generator) -> torch.Tensor:
    pool = _vocab_pool(tok, emb.shape[0])
    idx = pool[torch.randint(len(pool), (n,), generator=gen)]
    return emb[idx]


def _repeat_to(ids: list[int], n: int) -> list[int]:
    # PEFT's text init: repeat the text's tokens until P are filled, then cut to P.
    return (ids * (n // len(ids) + 1))[:n]


def resolve_init(init: str, label_words: list[str] | None) -> str:
    # Label words are the strongest start for classification (Lester et al. 2021, section 7).
    return ("labels" if label_words else "text") if init == "auto" else init


def init_prompt(model, tok, cfg: PromptConfig, label_words: list[str] | None = None,
                default_text: str = "", seed: int = 0) -> SoftPrompt:
    emb = model.get_input_embeddings().weight.detach().float()  # [V, H]
    P, H = cfg.virtual_tokens, emb.shape[1]
    gen = torch.Generator().manual_seed(seed)
    init = resolve_init(cfg.init, label_words)
    meta: dict[str, Any] = {"init": init}
    if init == "file":
        if not cfg.init_file:
            raise SoftpromptError("--init file needs --init-file DIR")
        prompt = load_prompt(cfg.init_file, model)
        if prompt.num_tokens != P:
            raise SoftpromptError(
                f"--init-file {cfg.init_file} has {prompt.num_tokens} virtual tokens but --virtual-tokens is {P}")
        meta["init_file"] = cfg.init_file
        return SoftPrompt(prompt.embeds.data, meta)
    if P < 1:
        raise SoftpromptError(f"--virtual-tokens must be at least 1 (got {P})")
    if init == "random":
        # Match the scale of real token embeddings; N(0, 1) (PEFT's default) is far off for most models.
        embeds = torch.randn(P, H, generator=gen) * emb.std()
    elif init == "vocab":
        embeds = _sample_vocab(emb, tok, P, gen)
    elif init == "text":
        text = cfg.init_text or default_text
        if not text:
            raise SoftpromptError("--init text needs --init-text TEXT")
        ids = tok(text, add_special_tokens=False).input_ids
        if not ids:
            raise SoftpromptError(f"--init-text {text!r} tokenises to nothing")
        embeds = emb[_repeat_to(ids, P)]
        meta["init_text"] = text
    elif init == "labels":
        if not label_words:
            raise SoftpromptError("--init labels needs --labels a,b,...")
        ids = [i for w in label_words for i in tok(" " + w, add_special_tokens=False).input_ids][:P]
        rest = _sample_vocab(emb, tok, P - len(ids), gen)
        embeds = torch.cat([emb[ids], rest]) if ids else rest
    else:
        raise SoftpromptError(f"unknown --init {init!r}: use auto, random, vocab, text, labels or file")
    return SoftPrompt(embeds, meta)


def save_prompt(prompt: SoftPrompt, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write prompt.safetensors + prompt_config.json into `out` (created if needed; other files in it,
    such as a run's metrics, are left alone). Both land by rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"format": FORMAT, "num_virtual_tokens": prompt.num_tokens, "hidden_size": prompt.hidden_size,
           **prompt.meta, **meta}
    tmp_w, tmp_c = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    try:
        save_file({TENSOR_NAME: prompt.embeds.detach().float().contiguous().cpu()}, str(tmp_w))
        tmp_c.write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
    finally:
        for t in (tmp_w, tmp_c):
            t.unlink(missing_ok=True)
    return out


def read_prompt_tensor(weights: Path, kind: str) -> torch.Tensor:
    """The [P, H] `prompt_embeddings` tensor of a safetensors file (ours or PEFT's `kind` of file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftpromptError(f"corrupt {kind} file {weights}: {e}") from None
    if TENSOR_NAME not in tensors:
        raise SoftpromptError(f"{weights} holds no '{TENSOR_NAME}' tensor (found: {sorted(tensors)})")
    t = tensors[TENSOR_NAME]
    if t.ndim != 2:
        raise SoftpromptError(f"{weights}: '{TENSOR_NAME}' must be [virtual_tokens, hidden], got {list(t.shape)}")
    return t


def load_prompt(path: str | Path, model=None) -> SoftPrompt:
    """Load a prompt folder (or a bare .safetensors file); check it fits `model` when given."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.safetensors").is_file():
            raise SoftpromptError(f"{path} is a PEFT adapter: convert it with `softprompt import-peft {path} OUT`")
        raise SoftpromptError(f"missing prompt file: {weights}")
    meta = read_json(weights.parent / CONFIG_FILE) if (weights.parent / CONFIG_FILE).is_file() else {}
    t = read_prompt_tensor(weights, "prompt")
    if model is not None:
        check_fits(t.shape[1], model, f"prompt {path}", meta.get("model"))
    return SoftPrompt(t, meta)


def check_fits(hidden: int, model, what: str, trained_for: str | None = None) -> None:
    from .families import hidden_size

    H = hidden_size(model)
    if hidden != H:
        extra = f" (it was trained for {trained_for})" if trained_for else ""
        raise SoftpromptError(f"{what} has hidden size {hidden} but the model's is {H}{extra}")
