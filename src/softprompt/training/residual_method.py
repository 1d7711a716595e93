"""`train --method residual`: residual prompt tuning (Razdaibiedina et al. 2023, "Residual Prompt
Tuning: Improving Prompt Tuning with Residual Reparameterization"). While training, the [P, H] soft
prompt is its input embedding E plus a bottleneck MLP of it, shared by the P positions:

    prompt = E + LayerNorm(W_up ReLU(W_down E))

with W_down [H -> m], W_up [m -> H] and m = `--encoder-hidden-size`, as in the paper; what is saved
is that sum, an ordinary soft prompt (encoder_method.py does the training side). E starts from
any --init strategy, a saved prompt's (--init file, --init-from) included: the LayerNorm's scale and shift start
at zero, so the branch adds nothing at first and the initial prompt is the init exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.config import TrainConfig
from .encoder_method import EncoderTuning


def default_bottleneck(H: int) -> int:
    """Half the model's width: the paper's 400 for T5-base's 768, scaled so that it stays a bottleneck."""
    return max(1, H // 2)


class ResidualEncoder(nn.Module):
    """E + LayerNorm(Linear(m, H)(ReLU(Linear(H, m)(E)))) over the [P, H] input embedding E."""

    def __init__(self, P: int, H: int, bottleneck: int):
        super().__init__()
        self.embedding = nn.Embedding(P, H)
        self.mlp = nn.Sequential(nn.Linear(H, bottleneck), nn.ReLU(), nn.Linear(bottleneck, H), nn.LayerNorm(H))
        # The branch's last layer, the LayerNorm's affine, starts at zero, so that the first prompt is the
        # init exactly. Not the up-projection: a LayerNorm of zeros sits on its eps, where the first step
        # would jump the branch to unit scale (several times an embedding's); a zero scale grows from 0.
        nn.init.zeros_(self.mlp[3].weight)
        nn.init.zeros_(self.mlp[3].bias)

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        return e + self.mlp(e)  # the skip connection


class ResidualTuning(EncoderTuning):
    """Train the input embedding and its residual MLP; save their sum as the prompt."""

    name = "residual"

    @staticmethod
    def default_lr(loss: str) -> float:
        # The soft prompt's rates: through the skip connection the embedding trains as a bare prompt does,
        # and the branch's size is its LayerNorm scale, which moves at the same pace from zero.
        return 1e-2 if loss == "classes" else 3e-2

    @staticmethod
    def make_encoder(P: int, H: int, tcfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
        m = tcfg.encoder_hidden_size or default_bottleneck(H)
        return ResidualEncoder(P, H, m), {"encoder": "residual-mlp", "encoder_hidden_size": m}
