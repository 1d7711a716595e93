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

from ..base.families import hidden_size
from ..core.config import PromptConfig
from ..core.inits import INITS, InitInputs, resolve
from ..core.prompt_protocol import KeyValues, Prompt
from ..core.utils import SoftpromptError, default_mode, read_json, same_model, short, warn, write_error
from ..data.labels import label_token_ids
from ..forward.hidden import prefix_kv
from .hub import download, hub_model_id, is_hub
from .prefix import PrefixPrompt
from .recorded import CONFIG_FILE, WEIGHTS_FILE, missing_prompt_error

FORMAT = "softprompt/1"
TENSOR_NAME = "prompt_embeddings"


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
                   lambda folder: source_embeds(load_source(folder, model, cfg)))
    embeds, meta = INITS[init].make(x)
    return SoftPrompt(embeds, {"init": init, **meta})


def load_source(folder: str, model, cfg: PromptConfig) -> "SoftPrompt | PrefixPrompt":
    """The prompt --init-file or --init-from names, checked against `model`; its errors name the flag."""
    name = "--init-from" if cfg.init_from else "--init-file"
    try:
        return load_prompt(folder, model)
    except SoftpromptError as e:
        raise SoftpromptError(f"{name} {short(folder)}: {e}") from None


def source_embeds(start: "SoftPrompt | PrefixPrompt") -> torch.Tensor:
    """A loaded start's [P, H] input embeddings; a prefix has none (transfer.check_kind refuses it first
    for --init-from; this is --init file's line)."""
    if start.input_embeds() is None:
        raise SoftpromptError("--init file: the prompt in --init-file is a prefix (per-layer keys and values), "
                              "which has no input embeddings to start a soft prompt from; use --method prefix")
    return start.input_embeds().data


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
        default_mode(tmp_w)  # safetensors writes 0600
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
    except Exception as e:  # safetensors' SafetensorError: a failed write, where open() raises OSError
        failed = write_error(e, out / WEIGHTS_FILE)
        if failed is None:
            raise
        raise failed from None
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
        raise missing_prompt_error(weights.parent, weights)
    config = weights.parent / CONFIG_FILE
    if config.exists() and not config.is_file():  # a folder or a FIFO (reading one would wait forever)
        raise SoftpromptError(f"{config} is not a regular file")
    meta = read_json(config) if config.is_file() else {}
    if not isinstance(meta, dict):
        raise SoftpromptError(f"{config} must hold a JSON object, got {type(meta).__name__}")
    # No kind: written before prompts had kinds, a soft prompt.
    kind = meta.get("kind", SoftPrompt.kind)
    if kind not in KINDS:
        raise SoftpromptError(f"{config}: unknown prompt kind {short(kind)} (this softprompt reads {', '.join(KINDS)})")
    if kind != SoftPrompt.kind:  # a kind with tensors of its own reads its file itself
        sp = KINDS[kind].read(weights, meta, model)
    else:
        sp = KINDS[kind](read_prompt_tensor(weights, "prompt"), meta)
    check_prompt(sp, f"prompt {path}")
    if model is not None:
        check_fits(sp.hidden_size, model, f"prompt {path}", meta.get("model"))
        warn_other_base(meta.get("model"), model, f"prompt {path}")
    return sp


def check_prompt(sp: Prompt, what: str) -> None:
    """Finite values, and the config fields that commands and the server read, of the types they
    read them as (what the server checked alone before issue 27)."""
    if not all(torch.isfinite(t).all() for t in sp.state_tensors().values()):
        raise SoftpromptError(f"{what} holds NaN or infinite values")
    meta = sp.meta
    labels = meta.get("labels")
    # train writes [] for language-modelling, input/target and chat prompts: no label words, like null.
    if labels not in (None, []) and not (isinstance(labels, list) and 2 <= len(labels) <= 64
                                         and all(is_text(w) and w.strip() for w in labels)
                                         and len(set(labels)) == len(labels)):
        raise SoftpromptError(f"{what}: labels in its {CONFIG_FILE} must be empty or a list of 2 to 64 "
                              f"distinct non-empty words, got {short(labels)}")
    if not isinstance(meta.get("chat", False), bool):
        raise SoftpromptError(f"{what}: chat in its {CONFIG_FILE} must be true or false, got {short(meta['chat'])}")
    for key in ("task", "model"):
        if meta.get(key) is not None and not is_text(meta[key]):
            raise SoftpromptError(f"{what}: {key} in its {CONFIG_FILE} must be a string, got {short(meta[key])}")


def is_text(v: Any) -> bool:
    """A string the tokenizer and JSON answers can take (no lone surrogates)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def warn_other_base(trained_for: str | None, model, what: str) -> None:
    """One warning line when a prompt recorded for another base model is used on this one: the hidden
    sizes match (check_fits), so it loads, but its vectors were learnt in another model's space."""
    said = other_base(trained_for, model, what)
    if said:
        warn(said)


def other_base(trained_for: str | None, model, what: str) -> str | None:
    """What warn_other_base says of a prompt recorded for another base than `model`; None for its own
    (the server's admin load answers it to the client too)."""
    name = getattr(model, "softprompt_model", None)  # the --model name load_model was given
    # The built-in model, its Hub id (which export-peft writes for it) and its cache folder name one model.
    if trained_for and name and not same_model(hub_model_id(trained_for), hub_model_id(name)):
        return (f"{what} was trained for {short(trained_for)}, not {short(name)}: the hidden sizes match, but its "
                "vectors were learnt for the other model")
    return None


def check_fits(hidden: int, model, what: str, trained_for: str | None = None) -> None:
    check_width(hidden, hidden_size(model), what, trained_for)


def check_width(hidden: int, width: int, what: str, trained_for: str | None = None) -> None:
    """A prompt of `hidden` wide against a model `width` wide (loaded, or as its config.json says)."""
    if hidden != width:
        extra = f" (it was trained for {trained_for})" if trained_for else ""
        raise SoftpromptError(f"{what} has hidden size {hidden} but the model's is {width}{extra}")
