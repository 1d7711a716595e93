"""`train --method ptuning`: P-tuning (Liu et al. 2021, "GPT Understands, Too"), as PEFT's
PromptEncoder (peft_type P_TUNING) builds it: while training, the [P, H] soft prompt is an
encoder's output from a trainable [P, H] input embedding, and what is saved is that output, an
ordinary soft prompt (encoder_method.py does the training side for both of its encoders).

`--encoder mlp|lstm` picks the encoder (prompts/ptuning_encoder.py, PEFT's own architecture and
module names, so a kept encoder, `--keep-encoder`, loads into PEFT's PromptEncoder); h is
`--encoder-hidden-size` (default H, as PEFT's). The input embedding starts
from an --init strategy (PEFT's starts from N(0, 1)); the encoder's weights from torch's default
initialisation, as PEFT's do.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..core.config import TrainConfig
from ..prompts.ptuning_encoder import LSTM_LAYERS, PromptEncoder
from .encoder_method import EncoderTuning


class PTuning(EncoderTuning):
    """Train PEFT's PromptEncoder and its input embedding; save the prompt it produces. A saved
    prompt (--init file, --init-from) starts the encoder's input, as every init does: the prompt the
    encoder first produces is an MLP of it, not the saved prompt itself (its output is no function
    of its input one could invert); --method residual starts from one exactly."""

    name = "ptuning"

    @staticmethod
    def default_lr(loss: str) -> float:
        # PEFT's P-tuning examples train at 1e-3. An Adam step of 1e-3 on each weight of the last
        # Linear moves each output coordinate by ~1e-3 x its h inputs' spread, about the 3e-2 step of
        # a bare prompt at SmolLM2's width; a third of it for the label-word softmax, as for prompts.
        return 3e-4 if loss == "classes" else 1e-3

    @staticmethod
    def make_encoder(P: int, H: int, tcfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
        kind = "mlp" if tcfg.encoder == "auto" else tcfg.encoder
        hidden = tcfg.encoder_hidden_size or H  # PEFT's default: the model's hidden size
        enc = PromptEncoder(P, H, hidden, kind)
        record = {"encoder": kind, "encoder_hidden_size": hidden}
        return enc, record | ({"encoder_num_layers": LSTM_LAYERS} if kind == "lstm" else {})

    @staticmethod
    def recorded_init(start_meta: dict[str, Any]) -> dict[str, Any]:
        # The saved prompt did not start as the init's embeddings (the encoder's input did): export-peft
        # then records no text init for it (peft_io.export_peft reads "init").
        return {**{k: v for k, v in start_meta.items() if k != "init"}, "init": "encoder",
                "encoder_init": start_meta.get("init")}

