"""The named soft prompts a server holds: loaded once onto the model's device, swapped at run time.

Each entry's tensor is what the scheduler puts in front of a request's row (a prefix, which has no
input embeddings, is kept as the prompt itself: the decoder caches its keys and values); the base
model is an entry without one. Loading checks the prompt before it is served: that it fits the
model, finite values, and a typed config (`labels` a list of distinct words, `chat` a boolean...),
so that a bad file fails its load with a 400 instead of failing later requests. The dict is
replaced, never edited in place, so request threads read it without a lock.
"""
from __future__ import annotations

import re
import reprlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..prompt import CONFIG_FILE, check_fits, load_prompt
from ..prompt_protocol import Prompt
from ..utils import SoftpromptError, read_json
from .protocol import ApiError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass
class Loaded:
    name: str
    tensor: torch.Tensor | Prompt | None  # [P, H] on the model's device and dtype (a prefix: the Prompt on
    meta: dict[str, Any]                    # the model's device); None for the base model
    path: str
    created: int

    @property
    def virtual_tokens(self) -> int:
        if self.tensor is None:
            return 0
        return self.tensor.length if isinstance(self.tensor, Prompt) else int(self.tensor.shape[0])


class Registry:
    """Name -> loaded prompt. Reads are lock-free dict lookups; loads and unloads take the lock."""

    def __init__(self, model, base_name: str):
        self.model, self.base_name = model, base_name
        self.lock = threading.Lock()
        self.items: dict[str, Loaded] = {base_name: Loaded(base_name, None, {}, "", int(time.time()))}

    def add(self, name: str, prompt: Prompt | str | Path) -> Loaded:
        if not NAME_RE.match(name):
            raise ApiError(400, f"invalid prompt name {name!r}: use letters, digits, '.', '_', ':' or '-' "
                                "(at most 64)", "name")
        given = isinstance(prompt, Prompt)
        sp = prompt if given else read(Path(prompt), self.model)
        w = self.model.get_input_embeddings().weight
        check_prompt(sp, f"prompt {name}", self.model)
        embeds = sp.input_embeds()
        # A prefix is served as itself (its keys and values are the decoder's cache for it), frozen.
        held = sp.to(w.device).requires_grad_(False) if embeds is None else embeds.detach().to(w.device, w.dtype)
        entry = Loaded(name, held, dict(sp.meta), "" if given else str(prompt), int(time.time()))
        with self.lock:
            if name in self.items:
                raise ApiError(409, f"a model named {name!r} is already loaded: unload it first", "name")
            self.items = {**self.items, name: entry}  # copy-on-write: readers never see a half update
        return entry

    def remove(self, name: str) -> None:
        with self.lock:
            if name == self.base_name:
                raise ApiError(400, f"{name!r} is the base model; it cannot be unloaded", "name")
            if name not in self.items:
                raise ApiError(404, f"no prompt named {name!r} is loaded", "name", "model_not_found")
            self.items = {k: v for k, v in self.items.items() if k != name}

    def get(self, name: str, param: str = "model") -> Loaded:
        entry = self.items.get(name)
        if entry is None:
            known = ", ".join(sorted(self.items))
            raise ApiError(404, f"unknown model {name!r}: loaded are {known}", param, "model_not_found")
        return entry

    def tensors(self) -> list[torch.Tensor | Prompt]:
        return [e.tensor for e in self.items.values() if e.tensor is not None]


def read(path: Path, model) -> Prompt:
    """load_prompt (safetensors only), with what the server's disk may hold turned into one-line errors."""
    config = (path.parent if path.suffix == ".safetensors" else path) / CONFIG_FILE
    try:
        # load_prompt reads the config as a dict: check first that it is one.
        if config.is_file() and not isinstance(read_json(config), dict):
            raise SoftpromptError(f"{config} must hold a JSON object")
        return load_prompt(path, model)
    except OSError as e:  # too long, not readable...
        raise SoftpromptError(f"cannot read {str(path)!r}: {e.strerror or e}") from None


def check_prompt(sp: Prompt, what: str, model) -> None:
    """That it fits the model (hidden size; a prefix: layers, key/value heads and head dim), finite
    values, and the config fields the server reads of the types it reads them as."""
    embeds = sp.input_embeds()
    if embeds is not None:
        check_fits(sp.hidden_size, model, what, sp.meta.get("model"))
    else:
        sp.past_key_values(model)  # checks its geometry against the model's cache
    if not all(torch.isfinite(t).all() for t in sp.state_tensors().values()):
        raise SoftpromptError(f"{what} holds NaN or infinite values")
    meta = sp.meta
    labels = meta.get("labels")
    # train writes [] for language-modelling, input/target and chat prompts: no label words, like null.
    if labels not in (None, []) and not (isinstance(labels, list) and 2 <= len(labels) <= 64
                                   and all(_text(w) and w.strip() for w in labels)
                                   and len(set(labels)) == len(labels)):
        raise SoftpromptError(f"{what}: labels in its {CONFIG_FILE} must be empty or a list of 2 to 64 "
                              f"distinct non-empty words, got {reprlib.repr(labels)}")
    if not isinstance(meta.get("chat", False), bool):
        raise SoftpromptError(f"{what}: chat in its {CONFIG_FILE} must be true or false, "
                              f"got {reprlib.repr(meta['chat'])}")
    for key in ("task", "model"):
        if meta.get(key) is not None and not _text(meta[key]):
            raise SoftpromptError(f"{what}: {key} in its {CONFIG_FILE} must be a string, "
                                  f"got {reprlib.repr(meta[key])}")


def _text(v) -> bool:
    """A string the tokenizer and the JSON answers can take (no lone surrogates)."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
