"""What `train --method ptuning` and `--method residual` share: a soft prompt that an encoder
produces while training from a trainable [P, H] input embedding, as a methods.Method. The two
encoders themselves are prompts/ptuning_encoder.py's (PEFT's PromptEncoder) and residual_method.py's.

The forward pass gets the encoder's output [P, H], an ordinary soft prompt's input embeddings, so
every forward path takes it unchanged but the CUDA graph, which replays a step whose prompt is a
leaf tensor (`graph_obstacle`). What is saved is that output as an ordinary soft prompt (kind
"prompt", prompt.save_prompt, with the method recorded): eval, generate, serve and export-peft never
see the encoder. `--keep-encoder` also writes the encoder (its input embedding and weights, by
PEFT's names) beside the prompt and into every checkpoint, which is what `--resume` needs to carry
on training it; without it nothing of the encoder is kept and the run writes no checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import PromptConfig, TrainConfig
from ..core.utils import SoftpromptError, default_mode, write_error
from ..forward.hidden import prefix_kv
from ..prompts.prompt import TENSOR_NAME, SoftPrompt, init_prompt, save_prompt
from .frozen_method import FrozenModelMethod

ENCODER_FILE = "encoder.safetensors"  # the encoder's state_dict, beside prompt.safetensors (--keep-encoder)
GRAPH_OBSTACLE = "the prompt is an encoder's output (a CUDA graph replays the step of a leaf prompt tensor)"


class EncodedPrompt(nn.Module):
    """A soft prompt computed by `encoder` (an nn.Module with an `embedding` [P, H] nn.Embedding whose
    forward() returns the [P, H] prompt). Implements prompt_protocol.Prompt as kind "prompt": what it
    saves is the encoder's output, which prompt.load_prompt reads back as a SoftPrompt."""

    kind = SoftPrompt.kind

    def __init__(self, encoder: nn.Module, meta: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder
        self.meta = dict(meta or {})

    @property
    def length(self) -> int:
        return self.encoder.embedding.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.encoder.embedding.weight.shape[1]

    def input_embeds(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[P, H] fp32 (or cast), through the encoder: its gradient reaches the encoder's weights."""
        out = self.encoder()
        return out if dtype is None else out.to(dtype)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.input_embeds(dtype)

    def past_key_values(self, model):
        dtype = model.get_input_embeddings().weight.dtype
        with torch.no_grad():
            return prefix_kv(model, self.input_embeds().to(model.device, dtype))[0]

    def folded(self) -> SoftPrompt:
        """The ordinary soft prompt this one is now (the encoder run once)."""
        with torch.no_grad():
            return SoftPrompt(self.input_embeds(), self.meta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a prompt folder stores: the encoder's output, as a soft prompt's one tensor."""
        with torch.no_grad():
            return {TENSOR_NAME: self.input_embeds().float().contiguous().cpu()}

    def encoder_tensors(self) -> dict[str, torch.Tensor]:
        """The encoder's state_dict (PEFT's PromptEncoder names for ptuning), fp32 on the host."""
        return {k: v.detach().float().contiguous().cpu() for k, v in self.encoder.state_dict().items()}


def save_encoder(prompt: EncodedPrompt, folder: Path) -> None:
    """ENCODER_FILE into `folder`, by rename (a reader never sees half a file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ENCODER_FILE}.tmp"
    try:
        save_file(prompt.encoder_tensors(), str(tmp))
        default_mode(tmp)  # safetensors writes 0600
        os.replace(tmp, folder / ENCODER_FILE)
    except Exception as e:  # safetensors' SafetensorError: a failed write, where open() raises OSError
        failed = write_error(e, folder / ENCODER_FILE)
        if failed is None:
            raise
        raise failed from None
    finally:
        tmp.unlink(missing_ok=True)


def load_encoder(prompt: EncodedPrompt, folder: Path, method: str) -> None:
    """Take ENCODER_FILE in `folder` into `prompt`'s encoder, every name and shape checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / ENCODER_FILE
    if not path.is_file():
        raise SoftpromptError(f"--resume: the checkpoint in {folder} holds no {ENCODER_FILE} (a run without "
                              "--keep-encoder): start over with --overwrite")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftpromptError(f"--resume: corrupt {path}: {e}") from None
    mine = prompt.encoder.state_dict()
    if set(saved) != set(mine):
        raise SoftpromptError(f"--resume: {path} holds another encoder than this --method {method} run's "
                              f"({', '.join(sorted(set(saved) ^ set(mine))[:3])}): resume with the run's own "
                              "--encoder, or start over with --overwrite")
    for k, v in saved.items():
        if v.shape != mine[k].shape:
            raise SoftpromptError(f"--resume: {path} holds {k} of shape {list(v.shape)}, this run's is "
                                  f"{list(mine[k].shape)}: resume with the same --virtual-tokens, "
                                  "--encoder-hidden-size and model, or start over with --overwrite")
    prompt.encoder.load_state_dict(saved)


class EncoderTuning(FrozenModelMethod):
    """Train an encoder and its input embedding; the model stays frozen and bit-identical. A subclass
    names the method and builds its encoder (`make_encoder`)."""

    graph_obstacle = GRAPH_OBSTACLE
    # The --init strategies that make the encoder's input: every [P, H] start a soft prompt has.
    inits: tuple[str, ...] = ("text", "vocab", "labels", "random", "file")
    prompt: EncodedPrompt

    def __init__(self, model, tok, prompt: EncodedPrompt, keep_encoder: bool):
        super().__init__(model, tok, prompt)
        # A checkpoint must hold the encoder to carry on training it (TrainConfig refuses --resume without it).
        self.resumable = keep_encoder

    @staticmethod
    def make_encoder(P: int, H: int, tcfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
        """(the encoder, with its [P, H] input as `.embedding`, and what to record of it); setup
        copies the init into that embedding."""
        raise NotImplementedError

    @staticmethod
    def recorded_init(start_meta: dict[str, Any]) -> dict[str, Any]:
        """What the saved prompt records as its init (the start's own record by default)."""
        return start_meta

    @classmethod
    def setup(cls, model, tok, pcfg: PromptConfig, tcfg: TrainConfig, label_words: list[str], init_text: str,
              label_input: str) -> "EncoderTuning":
        start = init_prompt(model, tok, pcfg, label_words, init_text, tcfg.seed, label_input)
        # The encoder's weights from the run's seed alone, whatever drew from the global generator before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tcfg.seed)
            encoder, record = cls.make_encoder(*start.embeds.shape, tcfg)
        with torch.no_grad():
            encoder.embedding.weight.copy_(start.embeds)
        meta = {**cls.recorded_init(start.meta), "method": cls.name, **record}
        return cls(model, tok, EncodedPrompt(encoder, meta).to(model.device), tcfg.keep_encoder)

    def save(self, run_dir: Path, meta: dict[str, Any]) -> None:
        if self.resumable:  # --keep-encoder: the encoder whose output this prompt is, beside it
            save_encoder(self.prompt, run_dir)
        save_prompt(self.prompt, run_dir, meta)

    def save_checkpoint(self, folder: Path, meta: dict[str, Any]) -> None:
        save_encoder(self.prompt, folder)
        save_prompt(self.prompt, folder, meta)  # the prompt as well: a checkpoint loads as a prompt

    def load_checkpoint(self, folder: Path) -> None:
        load_encoder(self.prompt, folder, self.name)
