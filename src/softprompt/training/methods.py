"""What a training run trains: a soft prompt on the frozen model (prompt tuning, prompt_method.py),
per-layer keys and values (prefix tuning, prefix_method.py), an encoder that produces the soft prompt (P-tuning,
ptuning_method.py; residual prompt tuning, residual_method.py), or every weight of the model (full
fine-tuning, the baseline they are compared with).

One small object per method holds all that differs between the two: its parameters, what the
forward pass gets as the prompt, its default learning rate, how and where it saves, whether it can
checkpoint and resume, and whether it changes the model. `Method` is that contract; the training
loop (train.py), its checkpoints (rundir.py) and the method comparison (compare.py) ask the object
instead of branching on the method's name. The methods that train a prompt on the frozen model share
what they hold in common through frozen_method.py.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ..base.models import load_model
from ..core.config import FULL_FT_LR, ModelConfig, PromptConfig, TrainConfig
from ..core.prompt_protocol import Prompt
from ..core.utils import SoftpromptError, atomic_dir, count_params, warn, write_json
from .prefix_method import PrefixTuning
from .prompt_method import PromptTuning
from .ptuning_method import PTuning
from .residual_method import ResidualTuning

MODEL_DIR = "model"  # where a full fine-tuning run saves its model, inside the run folder


class Method(Protocol):
    """What a training method is to train.py, rundir.py and compare.py."""
    name: str             # --method's value
    resumable: bool       # it can write a checkpoint and --resume from it
    changes_model: bool   # it trains the model's own weights (compare scores a copy)
    prompt: Prompt | None  # the prompt it trains; None when it trains the model itself
    graph_obstacle: str | None  # why its step cannot be a CUDA graph whatever the device (None: it can)

    @classmethod
    def setup(cls, model, tok, pcfg: PromptConfig, tcfg: TrainConfig, label_words: list[str], init_text: str,
              label_input: str) -> "Method": ...
    @staticmethod
    def default_lr(loss: str) -> float: ...
    def parameters(self) -> list[torch.nn.Parameter]: ...
    def trainable_params(self) -> int: ...
    def distribute(self, acc) -> None: ...
    def embeds(self) -> torch.Tensor | Prompt | None:
        """What the forward pass gets as the prompt ([P, H], through the data-parallel wrapper; a
        prompt without input embeddings, a prefix, itself)."""
    def synced(self) -> torch.nn.Module: ...
    def save(self, run_dir: Path, meta: dict[str, Any]) -> None: ...
    def save_checkpoint(self, folder: Path, meta: dict[str, Any]) -> None: ...
    def load_checkpoint(self, folder: Path) -> None: ...
    def finish(self) -> None: ...
    @staticmethod
    def saved_in(run_dir: Path) -> Path: ...
    @staticmethod
    def artifact(run_dir: Path) -> Path: ...
    @staticmethod
    def load_trained(run_dir: Path, model, mcfg: ModelConfig) -> tuple[Any, Prompt | None]: ...


class FullFineTuning:
    """Train every weight of the model, with no prompt (P = 0): the text alone, through weights that
    all learn. One process, no checkpoint: it would be the whole model plus twice its size of
    optimiser state, and the forward pass calls the decoder directly, which DDP's hooks would not see."""

    name = "full"
    resumable = False
    changes_model = True
    prompt = None
    graph_obstacle = "full fine-tuning (graphs are for the soft prompt's step)"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    @classmethod
    def setup(cls, model, tok, pcfg: PromptConfig, tcfg: TrainConfig, label_words: list[str], init_text: str,
              label_input: str) -> "FullFineTuning":
        if tcfg.lr > 1e-3:
            warn(f"--lr {tcfg.lr} is a prompt-tuning rate; full fine-tuning wants ~1e-5..5e-5")
        model.requires_grad_(True)
        return cls(model, tok)

    @staticmethod
    def default_lr(loss: str) -> float:
        return FULL_FT_LR

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def trainable_params(self) -> int:
        return count_params(self.model, trainable_only=True)

    def distribute(self, acc) -> None:
        if acc.num_processes > 1:
            raise SoftpromptError("--method full runs in one process and cannot --resume")

    def embeds(self) -> None:
        return None

    def synced(self) -> torch.nn.Module:
        return self.model

    def save(self, run_dir: Path, meta: dict[str, Any]) -> None:
        save_model(self.model, self.tok, run_dir / MODEL_DIR, meta)

    def save_checkpoint(self, folder: Path, meta: dict[str, Any]) -> None:
        raise SoftpromptError("--method full cannot checkpoint")

    def load_checkpoint(self, folder: Path) -> None:
        raise SoftpromptError("--method full runs in one process and cannot --resume")

    def finish(self) -> None:
        # Leave the (now fine-tuned) model frozen again, like every model this package hands out.
        self.model.requires_grad_(False)

    @staticmethod
    def saved_in(run_dir: Path) -> Path:
        return run_dir / MODEL_DIR

    @staticmethod
    def artifact(run_dir: Path) -> Path:
        return run_dir / MODEL_DIR

    @staticmethod
    def load_trained(run_dir: Path, model, mcfg: ModelConfig):
        return load_model(replace(mcfg, model=str(run_dir / MODEL_DIR)))[0], None


METHODS: dict[str, type[Method]] = {m.name: m for m in (PromptTuning, PrefixTuning, PTuning, ResidualTuning,
                                                          FullFineTuning)}


def save_model(model, tok, dest: Path, meta: dict[str, Any]) -> Path:
    """The whole fine-tuned model as safetensors (+ tokenizer), loadable with --model DEST; atomic."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "softprompt_run.json", meta)
    return dest
