"""PEFT's prompt-tuning recipe, run by softprompt: `PromptTuningConfig`, `PrefixTuningConfig`,
`get_peft_model`, `PeftModel.from_pretrained`, `TaskType` and `PromptTuningInit` under PEFT's names
and arguments, so a script written for PEFT runs on softprompt by changing its imports alone.

What the model is and does is model.py's SoftPromptModel. PEFT's inits map onto softprompt's:
TEXT is the same (the text's tokens repeated to fill the prompt); RANDOM is softprompt's `random`
(Gaussian at the token embeddings' scale, where PEFT draws N(0, 1)); SAMPLE_VOCAB is `vocab`
(tokens drawn from the most common ones, where PEFT draws from the whole vocabulary). PEFT's
prefix starts from random keys and values; softprompt's `random` prefix draws each layer's at the
spread of the model's own keys and values (prompts/prefix.py).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .base.families import kv_geometry
from .core.config import PromptConfig
from .model import SoftPromptModel, get_softprompt_model, load_tokenizer


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


OUR_INIT = {"TEXT": "text", "RANDOM": "random", "SAMPLE_VOCAB": "vocab"}


@dataclass
class PromptLearningConfig:
    """What PEFT's prompt-learning configs share (PEFT's own PromptLearningConfig): the arguments a
    script passes; the geometry (token_dim, num_layers, ...) is read from the model."""
    task_type: Any = TaskType.CAUSAL_LM
    num_virtual_tokens: int = 20
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self):
        task = getattr(self.task_type, "value", self.task_type)
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(f"task_type {task!r}: softprompt tunes causal LMs only (TaskType.CAUSAL_LM)")
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool):
            raise TypeError(f"num_virtual_tokens must be int, not {type(self.num_virtual_tokens).__name__}")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1 (got {self.num_virtual_tokens})")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError("num_transformer_submodules: decoder-only models have 1")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's PromptTuningConfig: a soft prompt in front of the input (softprompt's `--method prompt`)."""
    prompt_tuning_init: Any = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in OUR_INIT:
            raise ValueError(f"prompt_tuning_init {init!r}: use one of {', '.join(OUR_INIT)}")
        self.prompt_tuning_init = PromptTuningInit(init)
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init=TEXT needs prompt_tuning_init_text")

    def prompt_config(self) -> PromptConfig:
        init = OUR_INIT[self.prompt_tuning_init.value]
        return PromptConfig(virtual_tokens=self.num_virtual_tokens, init=init,
                            init_text=self.prompt_tuning_init_text or "")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's PrefixTuningConfig: trained keys and values in every layer (softprompt's `--method
    prefix`). With prefix_projection they come from an MLP while training, folded away on saving."""
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"prefix_projection must be bool, not {type(self.prefix_projection).__name__}")

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(virtual_tokens=self.num_virtual_tokens, init="random")


def get_peft_model(model, peft_config: PromptTuningConfig | PrefixTuningConfig, adapter_name: str = "default",
                   seed: int = 0, **kwargs: Any) -> SoftPromptModel:
    """`model` frozen, with a new trainable prompt (PEFT's get_peft_model for prompt or prefix tuning)."""
    if not isinstance(peft_config, (PromptTuningConfig, PrefixTuningConfig)):
        raise TypeError(f"get_peft_model: peft_config must be softprompt.PromptTuningConfig or PrefixTuningConfig, "
                        f"not {type(peft_config).__name__}")
    unknown = sorted(k for k in kwargs if k not in ("mixed", "autocast_adapter_dtype", "revision",
                                                       "low_cpu_mem_usage"))
    if unknown:
        raise TypeError(f"get_peft_model() got an unexpected keyword argument {unknown[0]!r}")
    if peft_config.token_dim not in (None, model.get_input_embeddings().weight.shape[1]):
        raise ValueError(f"token_dim {peft_config.token_dim} is not the model's hidden size "
                         f"{model.get_input_embeddings().weight.shape[1]}")
    name = getattr(peft_config, "tokenizer_name_or_path", None)
    tok = load_tokenizer(name) if name else None
    if isinstance(peft_config, PrefixTuningConfig):
        check_encoder_width(peft_config, model)
        # PEFT's plain steps on the keys and values: a learning rate chosen for PEFT trains the same here.
        sp = get_softprompt_model(model, peft_config.prompt_config(), tokenizer=tok, seed=seed, method="prefix",
                                  prefix_projection=peft_config.prefix_projection, prefix_scaled_steps=False)
    else:
        sp = get_softprompt_model(model, peft_config.prompt_config(), tokenizer=tok, seed=seed)
    if adapter_name != "default":
        sp.prompts[adapter_name] = sp.prompts.pop("default")
        sp.active_adapter = adapter_name
    return sp


def check_encoder_width(cfg: PrefixTuningConfig, model) -> None:
    """softprompt's projection is as wide as one layer's keys (kv heads x head dim); PEFT's width is a choice."""
    _, heads, head_dim = kv_geometry(model)
    width = heads * head_dim
    if cfg.encoder_hidden_size not in (None, width):
        raise ValueError(f"encoder_hidden_size {cfg.encoder_hidden_size}: softprompt's prefix projection is as wide "
                         f"as one layer's keys, {width} for this model (leave encoder_hidden_size unset)")


class PeftModel:
    """PEFT's entry point for a saved adapter: `PeftModel.from_pretrained(base, path)` gives a
    SoftPromptModel (a PEFT prompt-tuning folder, a softprompt folder or `hf://REPO`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError("softprompt.PeftModel is only an entry point: use PeftModel.from_pretrained(base, path) "
                        "or get_peft_model(base, PromptTuningConfig(...))")

    @staticmethod
    def from_pretrained(model, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        **kwargs: Any) -> SoftPromptModel:
        kwargs.pop("config", None)
        return SoftPromptModel.from_pretrained(model, model_id, adapter_name, is_trainable=is_trainable, **kwargs)
