"""P-tuning's prompt encoder as PEFT's PromptEncoder (peft_type P_TUNING) builds it, for one decoder
(num_transformer_submodules 1): `--method ptuning` trains it (training/ptuning_method.py) and
import-peft runs one read from a P_TUNING adapter (peft_ptuning.py), so it lives here, below both.

`mlp` (PEFT's default, MLP): Linear(H, h), ReLU, Linear(h, h), ReLU, Linear(h, H).
`lstm` (LSTM): a two-layer bidirectional LSTM of width h, then Linear(2h, 2h), ReLU, Linear(2h, H).
The modules and their names are PEFT's (`embedding`, `lstm_head`, `mlp_head`), so its state_dict
loads into PEFT's PromptEncoder and gives the same output.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.config import ENCODERS

LSTM_LAYERS = 2  # PEFT's encoder_num_layers default (its MLP ignores it)


class PromptEncoder(nn.Module):
    """PEFT's P-tuning PromptEncoder for one decoder (num_transformer_submodules 1), in training mode."""

    def __init__(self, P: int, H: int, hidden: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"unknown encoder {kind!r}: use {' or '.join(ENCODERS)}")
        self.kind = kind
        self.embedding = nn.Embedding(P, H)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(input_size=H, hidden_size=hidden, num_layers=LSTM_LAYERS, dropout=0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, H))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(H, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, H))

    def forward(self) -> torch.Tensor:
        """The [P, H] prompt (PEFT's forward on the indices 0..P-1 is a lookup of every row)."""
        x = self.embedding.weight
        if self.kind == "lstm":
            x = self.lstm_head(x[None])[0][0]  # one sequence of P positions: the LSTM reads the prompt in order
        return self.mlp_head(x)
