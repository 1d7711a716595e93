"""What every method that trains a prompt on a frozen model shares (prompt tuning, prefix tuning, and
the encoder methods): the prompt is the one trainable module, under several processes its
data-parallel wrapper is what the forward pass calls, and the result is a prompt folder that the
caller's frozen model scores. A method's own module (prompt_method.py, prefix_method.py,
encoder_method.py) adds only what differs: how the prompt starts, its rate, what it saves.

A base class rather than composition because every member here is one of methods.Method's: a held
helper would need each method to forward the same nine members to it, the duplication this removes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.config import ModelConfig
from ..core.prompt_protocol import Prompt
from ..core.utils import count_params
from ..prompts.prompt import WEIGHTS_FILE, load_prompt, save_prompt


class FrozenModelMethod:
    """A methods.Method training `prompt` (a torch module implementing prompt_protocol.Prompt) while the
    model stays frozen and bit-identical."""

    name = ""
    resumable = True       # its checkpoint (prompt + optimiser state) is small; data-parallel too
    changes_model = False
    graph_obstacle: str | None = None

    def __init__(self, model, tok, prompt: Prompt):
        self.model, self.tok, self.prompt = model, tok, prompt
        self.forward_prompt = prompt  # what the forward pass calls: the prompt, or its DDP wrapper

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.prompt.parameters())

    def trainable_params(self) -> int:
        return count_params(self.prompt)

    def distribute(self, acc) -> None:
        """Under several processes, all-reduce the prompt's gradient (Accelerate's DDP wrapper)."""
        if acc.num_processes > 1:
            self.forward_prompt = acc.prepare_model(self.prompt)

    def embeds(self) -> torch.Tensor | Prompt:
        return self.forward_prompt()  # [P, H] input embeddings

    def synced(self) -> torch.nn.Module:
        """What holds the gradient all-reduce (accelerate's accumulate skips it between micro-batches)."""
        return self.forward_prompt

    def save(self, run_dir: Path, meta: dict[str, Any]) -> None:
        save_prompt(self.prompt, run_dir, meta)

    def save_checkpoint(self, folder: Path, meta: dict[str, Any]) -> None:
        save_prompt(self.prompt, folder, meta)

    def finish(self) -> None:
        pass

    @staticmethod
    def saved_in(run_dir: Path) -> Path:
        """The folder to load the result from (`--prompt DIR`)."""
        return run_dir

    @staticmethod
    def artifact(run_dir: Path) -> Path:
        """What the result weighs on disk."""
        return run_dir / WEIGHTS_FILE

    @staticmethod
    def load_trained(run_dir: Path, model, mcfg: ModelConfig):
        """(model, prompt) to score the saved result with: the caller's frozen model and the prompt."""
        return model, load_prompt(run_dir, model).to(model.device)
