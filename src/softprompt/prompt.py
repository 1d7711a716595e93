"""The soft prompt: a `P x hidden` trainable tensor prepended to the input embeddings, the first
kind of prompt_protocol.Prompt (kind "prompt").

Also how a new prompt is made (by one of the strategies in inits.py) and its file format:
`prompt.safetensors` (one tensor, `prompt_embeddings`, shape [P, H], as PEFT names it) plus
`prompt_config.json` recording the prompt's kind, the model it was trained for, its hidden size,
the init and the data template. A folder without a "kind" (written before kinds existed) holds a
soft prompt. Files are read only through safetensors (never pickle).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PromptConfig
from .families import hidden_size
from .forward import prefix_kv
from .hub import download, is_hub
from .inits import INITS, InitInputs, resolve
from .labels import label_token_ids
from .prefix import PrefixPrompt
from .prompt_protocol import KeyValues
from .utils import SoftpromptError, read_json

FORMAT = "softprompt/1"
TENSOR_NAME = "prompt_embeddings"
WEIGHTS_FILE = "prompt.safetensors"
CONFIG_FILE = "prompt_config.json"


class SoftPrompt(nn.Module):
    """Holds the prompt in fp32 whatever the model dtype: updates of ~1e-4 vanish in bf16.
    Implements prompt_protocol.Prompt."""

    kind = "prompt"

    def __init__(self, embeds: torch.Tensor, meta: dict[str, Any] | None = None):
        super().__init__()
        self.embeds = nn.Parameter(embeds.detach().to(torch.float32).clone())  # [P, H]
        self.meta = dict(meta or {})

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeds.shape[1]

    def input_embeds(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[P, H]: the trainable tensor itself (or a cast of it), so that gradients reach it."""
        return self.embeds if dtype is None else self.embeds.to(dtype)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.input_embeds(dtype)

    def past_key_values(self, model) -> KeyValues:
        """The embeddings run through `model` alone: per-layer (keys, values), batch 1."""
        dtype = model.get_input_embeddings().weight.dtype
        return prefix_kv(model, self.embeds.to(model.device, dtype))[0]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {TENSOR_NAME: self.embeds.detach().float().contiguous().cpu()}


# prompt_config.json's "kind" -> its class
KINDS: dict[str, type] = {SoftPrompt.kind: SoftPrompt, PrefixPrompt.kind: PrefixPrompt}


def init_prompt(model, tok, cfg: PromptConfig, label_words: list[str] | None = None,
                default_text: str = "", seed: int = 0, label_input: str = ":") -> SoftPrompt:
    """A new prompt, made by the strategy `cfg.init` names (inits.py). `label_input`: a rendered
    input the label words follow, for `labels` (its last character decides their leading space,
    labels.label_text); the default stands for one ending in a non-space, as "Sentiment:" does."""
    emb = model.get_input_embeddings().weight.detach().float()  # [V, H]
    init = resolve(cfg.init, label_words)
    label_ids = label_token_ids(tok, label_words, label_input) if label_words and init == "labels" else []
    x = InitInputs(model, tok, cfg, emb, torch.Generator().manual_seed(seed), label_ids, default_text,
                   lambda folder: load_prompt(folder, model).embeds.data)
    embeds, meta = INITS[init].make(x)
    return SoftPrompt(embeds, {"init": init, **meta})


def save_prompt(prompt: SoftPrompt, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write prompt.safetensors + prompt_config.json into `out` (created if needed; other files in it,
    such as a run's metrics, are left alone). Both land by rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"format": FORMAT, "kind": prompt.kind, "num_virtual_tokens": prompt.length,
           "hidden_size": prompt.hidden_size, **prompt.meta, **meta}
    tmp_w, tmp_c = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    try:
        save_file(prompt.state_tensors(), str(tmp_w))
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
    if not t.is_floating_point():
        raise SoftpromptError(f"{weights}: '{TENSOR_NAME}' holds {t.dtype} values, not floating point")
    bad = int((~torch.isfinite(t)).sum())
    if bad:  # such a prompt makes every output NaN: generation stops at once, classification is arbitrary
        raise SoftpromptError(f"{weights}: '{TENSOR_NAME}' holds {bad} NaN or infinite value(s)")
    return t


def load_prompt(path: str | Path, model=None) -> "SoftPrompt | PrefixPrompt":
    """Load a prompt folder (or a bare .safetensors file, or `hf://REPO_ID[@REV]`, hub.py); check it
    fits `model` when given."""
    path = download(path) if is_hub(path) else Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.safetensors").is_file():
            raise SoftpromptError(f"{path} is a PEFT adapter: convert it with `softprompt import-peft {path} OUT`")
        raise SoftpromptError(f"missing prompt file: {weights}")
    config = weights.parent / CONFIG_FILE
    meta = read_json(config) if config.is_file() else {}
    # No kind: written before prompts had kinds, a soft prompt.
    kind = meta.get("kind", SoftPrompt.kind) if isinstance(meta, dict) else SoftPrompt.kind
    if kind not in KINDS:
        raise SoftpromptError(f"{config}: unknown prompt kind {kind!r} (this softprompt reads {', '.join(KINDS)})")
    if kind != SoftPrompt.kind:  # a kind with tensors of its own reads its file itself
        return KINDS[kind].read(weights, meta, model)
    t = read_prompt_tensor(weights, "prompt")
    if model is not None:
        check_fits(t.shape[1], model, f"prompt {path}", meta.get("model"))
    return KINDS[kind](t, meta)


def check_fits(hidden: int, model, what: str, trained_for: str | None = None) -> None:
    H = hidden_size(model)
    if hidden != H:
        extra = f" (it was trained for {trained_for})" if trained_for else ""
        raise SoftpromptError(f"{what} has hidden size {hidden} but the model's is {H}{extra}")
