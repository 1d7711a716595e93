"""The named soft prompts a server holds: loaded once onto the model's device, swapped at run time.

Each entry's tensor is what the scheduler puts in front of a request's row (a prefix, which has no
input embeddings, is kept as the prompt itself: the decoder caches its keys and values); the base
model is an entry without one. Loading checks the prompt before it is served: that it fits the
model, finite values, and a typed config (`labels` a list of distinct words, `chat` a boolean...),
so that a bad file fails its load with a 400 instead of failing later requests. The dict is
replaced, never edited in place, so request threads read it without a lock.

Replacing a name swaps its entry in one such copy: a request takes its entry's tensor when it is
queued, so requests already queued or decoding finish with the old prompt and later ones get the
new one. The scheduler's prompt KV cache is keyed by the tensor itself, so the new prompt gets its
own, and the old one's is dropped once no entry holds it (Scheduler._retain), as after an unload.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.prompt_protocol import Prompt, is_prompt
from ..core.utils import SoftpromptError, read_json
from ..prompts.prompt import CONFIG_FILE, check_fits, check_prompt, load_prompt
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
        return self.tensor.length if is_prompt(self.tensor) else int(self.tensor.shape[0])


class Registry:
    """Name -> loaded prompt. Reads are lock-free dict lookups; loads and unloads take the lock."""

    def __init__(self, model, base_name: str):
        self.model, self.base_name = model, base_name
        self.lock = threading.Lock()
        self.items: dict[str, Loaded] = {base_name: Loaded(base_name, None, {}, "", int(time.time()))}

    def add(self, name: str, prompt: Prompt | str | Path, replace: bool = False) -> Loaded:
        """Load `prompt` as `name`; a name already loaded is a 409 unless `replace`."""
        if replace and name == self.base_name:
            raise ApiError(400, f"{name!r} is the base model; it cannot be replaced", "name")
        if not NAME_RE.match(name):
            raise ApiError(400, f"invalid prompt name {name!r}: use letters, digits, '.', '_', ':' or '-' "
                                "(at most 64)", "name")
        given = is_prompt(prompt)
        sp = prompt if given else read(Path(prompt), self.model)
        w = self.model.get_input_embeddings().weight
        check_servable(sp, f"prompt {name}", self.model)
        embeds = sp.input_embeds()
        # A prefix is served as itself (its keys and values are the decoder's cache for it), frozen.
        held = sp.to(w.device).requires_grad_(False) if embeds is None else embeds.detach().to(w.device, w.dtype)
        entry = Loaded(name, held, dict(sp.meta), "" if given else str(prompt), int(time.time()))
        with self.lock:
            if name in self.items and not replace:
                raise ApiError(409, f"a model named {name!r} is already loaded: unload it first, or send "
                                    "replace: true", "name")
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


def check_servable(sp: Prompt, what: str, model) -> None:
    """That it fits the model (hidden size; a prefix: layers, key/value heads and head dim), then
    prompt.check_prompt, what every command checks (finite values, typed config fields)."""
    if sp.input_embeds() is not None:
        check_fits(sp.hidden_size, model, what, sp.meta.get("model"))
    else:
        sp.past_key_values(model)  # checks its geometry against the model's cache
    check_prompt(sp, what)
