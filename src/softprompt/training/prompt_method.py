"""`train --method prompt`: prompt tuning (Lester et al. 2021), a methods.Method that trains a [P, H]
soft prompt (prompts/prompt.py's SoftPrompt) in front of the frozen model's input embeddings."""
from __future__ import annotations

from pathlib import Path

from ..core.config import PromptConfig, TrainConfig
from ..core.utils import SoftpromptError
from ..prompts.prompt import SoftPrompt, init_prompt, load_prompt
from .frozen_method import FrozenModelMethod


class PromptTuning(FrozenModelMethod):
    """Train a [P, H] soft prompt; the model stays frozen and bit-identical."""

    name = "prompt"
    prompt: SoftPrompt

    @classmethod
    def setup(cls, model, tok, pcfg: PromptConfig, tcfg: TrainConfig, label_words: list[str], init_text: str,
              label_input: str) -> "PromptTuning":
        prompt = init_prompt(model, tok, pcfg, label_words, init_text, tcfg.seed, label_input)
        return cls(model, tok, prompt.to(model.device))

    @staticmethod
    def default_lr(loss: str) -> float:
        # PEFT's classic 3e-2 moves an Adam step ~0.03 per coordinate, a quarter of SmolLM2's
        # embedding RMS (0.136): from the label words' embeddings, with the two-way softmax, that
        # threw one SST-2 seed in three onto the majority class; 1e-2 trained all three to ~88%.
        return 1e-2 if loss == "classes" else 3e-2

    def load_checkpoint(self, folder: Path) -> None:
        saved = load_prompt(folder).input_embeds().data
        mine = self.prompt.input_embeds()
        if saved.shape != mine.shape:
            raise SoftpromptError(f"--resume: the checkpoint in {folder} holds a prompt of shape {list(saved.shape)}, "
                                  f"this run's is {list(mine.shape)}: resume with the same "
                                  "--virtual-tokens and model, or start over with --overwrite")
        mine.data.copy_(saved)
