"""`train --method ptuning`: P-tuning (Liu et al. 2021, "GPT Understands, Too"), as PEFT's
PromptEncoder (peft_type P_TUNING) builds it: while training, the [P, H] soft prompt is an
encoder's output from a trainable [P, H] input embedding, and what is saved is that output, an
ordinary soft prompt (encoder_method.py does the training side for both of its encoders).

`--encoder mlp` (PEFT's default, MLP): Linear(H, h), ReLU, Linear(h, h), ReLU, Linear(h, H).
`--encoder lstm` (LSTM): a two-layer bidirectional LSTM of width h, then Linear(2h, 2h), ReLU,
Linear(2h, H). h is `--encoder-hidden-size` (default H, as PEFT's). The modules and their names are
PEFT's (`embedding`, `lstm_head`, `mlp_head`), so a kept encoder (`--keep-encoder`) loads into
PEFT's PromptEncoder with load_state_dict and gives the same output. The input embedding starts
from an --init strategy (PEFT's starts from N(0, 1)); the encoder's weights from torch's default
initialisation, as PEFT's do.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ENCODERS, TrainConfig
from .encoder_method import EncoderTuning

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


class PTuning(EncoderTuning):
    """Train PEFT's PromptEncoder and its input embedding; save the prompt it produces."""

    name = "ptuning"
    # A saved prompt (--init file) would not survive the encoder: its output is no function of its input
    # one could start from; --method residual starts from one exactly.
    inits = ("text", "vocab", "labels", "random")

    @staticmethod
    def default_lr(loss: str) -> float:
        # PEFT's P-tuning examples train at 1e-3. An Adam step of 1e-3 on each weight of the last
        # Linear moves each output coordinate by ~1e-3 x its h inputs' spread, about the 3e-2 step of
        # a bare prompt at SmolLM2's width; a third of it for the label-word softmax, as for prompts.
        return 3e-4 if loss == "classes" else 1e-3

    @staticmethod
    def make_encoder(start: torch.Tensor, tcfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
        P, H = start.shape
        kind = "mlp" if tcfg.encoder == "auto" else tcfg.encoder
        hidden = tcfg.encoder_hidden_size or H  # PEFT's default: the model's hidden size
        enc = PromptEncoder(P, H, hidden, kind)
        with torch.no_grad():
            enc.embedding.weight.copy_(start)
        record = {"encoder": kind, "encoder_hidden_size": hidden}
        return enc, record | ({"encoder_num_layers": LSTM_LAYERS} if kind == "lstm" else {})

    @staticmethod
    def recorded_init(start_meta: dict[str, Any]) -> dict[str, Any]:
        # The saved prompt did not start as the init's embeddings (the encoder's input did): export-peft
        # then records no text init for it (peft_io.export_peft reads "init").
        return {**{k: v for k, v in start_meta.items() if k != "init"}, "init": "encoder",
                "encoder_init": start_meta.get("init")}

