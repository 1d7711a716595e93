"""`train --method prefix`: prefix tuning (P-tuning v2), a methods.Method that trains a
prefix.PrefixPrompt (per-layer keys and values) on the frozen model.

It differs from prompt tuning in what the forward pass gets (the prefix itself, whose keys and
values the kv path hands to the layers), in its init (prefix.init_prefix) and, with
`--prefix-projection`, in what a checkpoint holds (the MLP too) against what the result holds (the
folded keys and values). Under several processes (data-parallel, or `--shard fsdp` with the base
sharded) the prefix is replicated: the forward pass takes the keys and values that its
data-parallel wrapper computed (prefix.ComputedPrefix), so their gradient is all-reduced as the
soft prompt's is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import PromptConfig, TrainConfig
from ..core.utils import SoftpromptError
from ..prompts.prefix import (NEW_INITS, ComputedPrefix, PrefixPrompt, init_prefix, prefix_meta,
                              prompt_key_values, without_projection)
from ..prompts.prompt import WEIGHTS_FILE, load_source, save_prompt
from .frozen_method import FrozenModelMethod

# --init choices a prefix takes: those init_prefix makes (auto resolves to text), and a prefix file
INITS = (*(init for init in NEW_INITS if init != "auto"), "file")


def start_from(model, pcfg: PromptConfig, projection: bool, scaled_steps: bool) -> PrefixPrompt:
    """A prefix starting from a saved prompt: a prefix's keys and values, or a soft prompt's keys and values
    through the frozen model (prefix.prompt_key_values: the same prompt, exactly, to every layer)."""
    name = "--init-from" if pcfg.init_from else "--init-file"
    start = load_source(pcfg.init_file, model, pcfg)
    if start.length != pcfg.virtual_tokens:
        raise SoftpromptError(f"{name} {pcfg.init_file}: need a prefix of {pcfg.virtual_tokens} virtual tokens "
                              f"(or a soft prompt to convert), found a {start.kind!r} prompt of {start.length}")
    meta = {"init": "file", "init_file": pcfg.init_file, **({"init_from": pcfg.init_from} if pcfg.init_from else {})}
    if isinstance(start, PrefixPrompt):
        return PrefixPrompt(start.key_values(), {**start.meta, **meta}, projection=projection,
                            scaled_steps=scaled_steps)
    kv = prompt_key_values(model, start.input_embeds()).cpu()
    return PrefixPrompt(kv, {**meta, "init_kind": start.kind, **prefix_meta(model)}, projection=projection,
                        scaled_steps=scaled_steps)


class PrefixTuning(FrozenModelMethod):
    """Train per-layer keys and values; the model stays frozen and bit-identical."""

    name = "prefix"
    inits = INITS
    graph_obstacle = None  # its kv path is never graphed (forward_path.choose_path's deep)
    prompt: PrefixPrompt

    @classmethod
    def setup(cls, model, tok, pcfg: PromptConfig, tcfg: TrainConfig, label_words: list[str], init_text: str,
              label_input: str) -> "PrefixTuning":
        how = {"projection": tcfg.prefix_projection, "scaled_steps": tcfg.prefix_scaled_steps}
        if pcfg.init == "file":
            prompt = start_from(model, pcfg, **how)
        else:
            prompt = init_prefix(model, tok, pcfg, init_text, tcfg.seed, **how)
        return cls(model, tok, prompt.to(model.device))

    @staticmethod
    def default_lr(loss: str) -> float:
        # The soft prompt's rates. With scaled steps (the default) a step moves each layer's keys and
        # values by about this fraction of their size; without, by this much, whatever their size.
        return 1e-2 if loss == "classes" else 3e-2

    def embeds(self) -> PrefixPrompt | ComputedPrefix:
        """The forward pass takes the prefix (forward.text_hidden's kv path); under several processes,
        the keys and values its DDP wrapper computed, whose backward all-reduces the gradient."""
        if self.forward_prompt is self.prompt:
            return self.prompt
        return self.prompt.computed(self.forward_prompt())

    def save(self, run_dir: Path, meta: dict[str, Any]) -> None:
        # The result folds the MLP away; a checkpoint (the inherited save_checkpoint) keeps its tensors.
        save_prompt(without_projection(self.prompt), run_dir, meta)

    def load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.prompt.load_state_tensors(load_file(str(folder / WEIGHTS_FILE)), str(folder))
