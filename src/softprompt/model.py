"""SoftPromptModel: a frozen Hugging Face causal LM and its soft prompts as one nn.Module, the way a
PEFT user holds a PeftModel: forward (HF's CausalLMOutput), generate, save_pretrained,
from_pretrained, push_to_hub.

It calls softprompt's own code: the forward pass is forward/hidden.py's (the prompt's keys/values shared
by the rows, vocabulary logits only where labels need them), generation is `softprompt generate`'s
batch decoder, files are prompt.py's folder plus peft_io.py's adapter layout, and the upload is
hub_push.py's. It also has what transformers.Trainer asks of a model (a `config`, the prompt as the
only trainable parameter and the only state saved, gradient-checkpointing switches), so the
Trainer trains it unchanged.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from .base.models import check_loaded_base
from .base.training_setup import prepare_for_training
from .core.config import BUILTIN_MODEL, GenerateConfig, PromptConfig, model_name
from .core.prompt_protocol import Prompt, forward_input
from .data.batching import Batch
from .forward.hidden import batch_loss, logits as vocab_logits, predictor_states, text_hidden, token_losses
from .forward.paths import choose_path
from .prompts.prefix import init_prefix, without_projection
from .prompts.prompt import check_fits, init_prompt, save_prompt

DEFAULT = "default"  # the first prompt's name, as PEFT's first adapter's


def load_tokenizer(name: str):
    """The tokenizer of a model name or folder ('smollm2-135m-instruct': the built-in one's)."""
    from transformers import AutoTokenizer

    from .base.models import builtin_model_dir

    return AutoTokenizer.from_pretrained(builtin_model_dir() if name == BUILTIN_MODEL else name)


def real_tokens_first(mask: torch.Tensor) -> torch.Tensor | None:
    """Per row, the token order [B, T] that puts its real tokens first (in their order), where some row
    is padded otherwise (left padding, common for decoders); None where every row is right-padded.
    The prompt goes right before a row's first real token: left pads between them were positions
    (transformers numbers by index; a sliding window counts them), and a row's logits changed with
    its batch."""
    pad = (mask == 0).to(torch.int8)
    if not bool((pad[:, 1:] < pad[:, :-1]).any()):  # no real token after a pad
        return None
    return pad.argsort(dim=1, stable=True)


class SoftPromptModel(nn.Module):
    """A frozen causal LM (`base_model`) and named soft prompts, one of them active."""

    main_input_name = "input_ids"
    accepts_loss_kwargs = False  # the Trainer divides the mean loss by its accumulation steps itself
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_save = None

    def __init__(self, base_model, prompt: Prompt | None, tokenizer=None, forward_path: str = "auto",
                 linear_kernel: str = "auto"):
        from .api import python_errors

        super().__init__()
        check_loaded_base(base_model)
        self.base_model = base_model
        base_model.requires_grad_(False)
        with python_errors():  # as train prepares its base: attention, linear kernel, MLP
            prepared = prepare_for_training(base_model, linear_kernel)
        self.linear_kernel = prepared["linear_kernel_taken"]
        self.linear_kernel_reason = prepared["linear_kernel_reason"]
        self.prompts = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.tokenizer = tokenizer
        self.forward_path = forward_path  # forward/hidden.py's path: auto, packed, kv or concat
        if prompt is not None:
            self.add_prompt(DEFAULT, prompt)

    # ------------------------------------------------------------------ making one
    @classmethod
    def from_pretrained(cls, base_model, path: str | Path, adapter_name: str = DEFAULT, tokenizer=None,
                        is_trainable: bool = False, **kwargs: Any) -> "SoftPromptModel":
        """`base_model` with the prompt in `path`: a softprompt folder, `hf://REPO_ID[@REV]` or a
        PEFT prompt-tuning adapter folder. Frozen unless `is_trainable` (as PEFT's)."""
        if kwargs:
            raise TypeError(f"from_pretrained() got an unexpected keyword argument {sorted(kwargs)[0]!r}")
        model = cls(base_model, None, tokenizer)
        model.load_adapter(path, adapter_name, is_trainable)
        return model

    def load_adapter(self, path: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the prompt in `path` as `adapter_name` and make it the active one."""
        from .api import load_prompt

        prompt = load_prompt(path, self.base_model)
        prompt.requires_grad_(is_trainable)
        self.add_prompt(adapter_name, prompt.to(self.device))

    def add_prompt(self, name: str, prompt: Prompt) -> None:
        check_fits(prompt.hidden_size, self.base_model, f"prompt {name!r}")
        self.prompts[name] = prompt
        self.active_adapter = name

    def set_adapter(self, name: str) -> None:
        if name not in self.prompts:
            raise ValueError(f"no prompt named {name!r} (loaded: {', '.join(self.prompts) or 'none'})")
        self.active_adapter = name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The untuned model inside the block (as PEFT's)."""
        before, self.active_adapter = self.active_adapter, None
        try:
            yield
        finally:
            self.active_adapter = before

    @property
    def prompt(self) -> Prompt | None:
        return self.prompts[self.active_adapter] if self.active_adapter is not None else None

    # ------------------------------------------------------------------ what the Trainer and PEFT users touch
    @property
    def config(self):
        return self.base_model.config

    @property
    def name_or_path(self) -> str:
        return getattr(self.base_model, "name_or_path", "")

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.dtype

    @property
    def generation_config(self):
        return self.base_model.generation_config

    def get_base_model(self):
        return self.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

    def train(self, mode: bool = True) -> "SoftPromptModel":
        """Only the prompt changes mode: the frozen base stays in eval mode (no dropout), as in
        `softprompt train`; checkpointed layers keep their own flag (models.set_checkpointing)."""
        self.training = mode
        self.prompts.train(mode)
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' non-reentrant checkpointing of every layer of the base (models.set_checkpointing),
        whatever the kwargs ask; what the Trainer calls for `gradient_checkpointing=True`."""
        from .base.models import set_checkpointing

        if every_n_layers != 1:
            raise ValueError(f"every_n_layers={every_n_layers}: SoftPromptModel checkpoints every layer")
        if offload:
            raise ValueError("offload=True: SoftPromptModel keeps checkpointed activations where they are")
        set_checkpointing(self.base_model, True)

    def activation_checkpointing_disable(self) -> None:
        from .base.models import set_checkpointing

        set_checkpointing(self.base_model, False)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules())

    is_gradient_checkpointing = is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Nothing to do: the prompt, ahead of every layer, already requires grad."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The prompts only (`prompts.NAME.embeds`): the base is frozen and saved elsewhere, so a
        Trainer checkpoint holds kilobytes, not the model."""
        return self.prompts.state_dict(*args, **{**kwargs, "prefix": kwargs.get("prefix", "") + "prompts."})

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {k.removeprefix("prompts."): v for k, v in state_dict.items() if k.startswith("prompts.")}
        if strict and len(own) != len(state_dict):
            extra = sorted(k for k in state_dict if not k.startswith("prompts."))
            raise RuntimeError(f"unexpected key(s) in state_dict: {extra[:3]} (a SoftPromptModel holds prompts only)")
        return self.prompts.load_state_dict(own, strict=strict, assign=assign)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """As PreTrainedModel's (the Trainer counts FLOPs with it): the base's, plus the prompts'."""
        n = self.base_model.num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        return n + sum(p.numel() for p in self.prompts.parameters() if p.requires_grad or not only_trainable)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ forward and generate
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_logits: bool | None = None,
                **kwargs: Any) -> CausalLMOutput:
        """HF's CausalLMOutput. `logits` [B, T, V] are the base model's positions (logits[:, t]
        predicts token t+1); with a prompt, token 0 is predicted too (by the last virtual token).
        `loss` (with `labels` [B, T], -100 = ignore): mean cross-entropy of every label token, token
        0 included, as PEFT's prompt tuning computes it; labels under attention_mask 0 are ignored.
        With labels in training mode the logits are computed only at the labelled positions and not
        returned (`return_logits=True` returns them too); in eval mode (the Trainer's evaluation and
        predict) they are returned with the loss, from the same pass (`return_logits=False`: not)."""
        unused = sorted(k for k, v in kwargs.items() if v is not None and k not in ("return_dict", "use_cache"))
        if unused:
            raise TypeError(f"SoftPromptModel.forward() does not take {unused[0]}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        order = real_tokens_first(mask)  # [B, T], or None: every row is right-padded already
        if order is not None:
            input_ids, mask = input_ids.gather(1, order), mask.gather(1, order)
            labels = None if labels is None else labels.to(order.device).gather(1, order)
        p = forward_input(self.prompt)  # [P, H] with its gradient, or a prefix itself (its keys and values)
        path = self.forward_path
        if p is not None:  # checkpointed layers drop the cache that carries a soft prompt's keys: concat then
            path = choose_path(self.base_model, path, rows=mask, checkpointing=self.is_gradient_checkpointing,
                               deep=p is self.prompt).path
        loss = out_logits = None
        targets = None if labels is None else labels.to(input_ids.device).masked_fill(mask == 0, -100)
        # In eval mode the logits come with the loss, as HF's models give them: the Trainer's
        # compute_metrics and predict() got an empty tuple (training keeps the labelled-only logits).
        if labels is None or (not self.training if return_logits is None else return_logits):
            h, last = text_hidden(self.base_model, p, input_ids, mask, path)  # [B, T, H], one pass for both
            out_logits = vocab_logits(self.base_model, h)
            if order is not None:  # back where the caller's tokens are
                out_logits = out_logits.gather(1, order.argsort(1)[..., None].expand_as(out_logits))
            if targets is not None:
                states, y, _ = predictor_states(h, last, targets)
                loss = token_losses(self.base_model, states, y).sum() / max(y.numel(), 1)
        else:
            zeros = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            total, n = batch_loss(self.base_model, p, Batch(input_ids, mask, targets, zeros - 1, zeros), path)
            loss = total / max(n, 1)
        return CausalLMOutput(loss=loss, logits=out_logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int = 0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """HF's generate for the active prompt, by `softprompt generate`'s batch decoder: greedy or
        (do_sample) sampled with `seed`; rows of any padding. presence_penalty and frequency_penalty are
        OpenAI's (`softprompt generate`'s and the server's), which HF's generate lacks. Returns [B, T + new]: each input row as
        given, then its new tokens, right-padded with `pad_token_id` (virtual tokens not included)."""
        from .generation.generate import generate_batch
        from .generation.static_decode import decode_batch_for

        if kwargs.get("inputs") is not None and input_ids is None:
            input_ids = kwargs.pop("inputs")
        # Beam search's early_stopping means nothing to greedy or sampled decoding (HF ignores it too).
        ignored = ("use_cache", "return_dict", "early_stopping")
        unused = sorted(k for k, v in kwargs.items() if v is not None and k not in ignored
                        and not (k == "num_beams" and v == 1))
        if unused:
            raise TypeError(f"SoftPromptModel.generate() does not take {unused[0]} (it takes max_new_tokens, "
                            "do_sample, temperature, top_p, repetition_penalty, presence_penalty, "
                            "frequency_penalty, seed, eos_token_id)")
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("generate() needs input_ids of shape [batch, tokens]")
        from .api import python_errors

        tok = self.get_tokenizer()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if not do_sample:  # as HF's generate: greedy decoding ignores them (temperature=0.0 means greedy there)
            temperature = top_p = None
        with python_errors():  # ValueError naming the keyword
            cfg = GenerateConfig(max_new_tokens=max_new_tokens, sample=bool(do_sample),
                                 temperature=1.0 if temperature is None else temperature,
                                 top_p=1.0 if top_p is None else top_p,
                                 repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed)
        p = forward_input(self.prompt)  # under no_grad: the soft prompt's [P, H], or the prefix
        rows = [(p, ids[m.bool()].tolist()) for ids, m in zip(input_ids, mask)]
        engine = decode_batch_for(self.base_model, tok)
        if eos_token_id is not None:
            engine.eos = set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else {eos_token_id}
        new = generate_batch(self.base_model, tok, rows, cfg, engine=engine)
        pad = pad_token_id if pad_token_id is not None else (tok.pad_token_id if tok.pad_token_id is not None else 0)
        width = input_ids.shape[1] + max(len(n) for n in new)
        out = input_ids.new_full((len(rows), width), pad)
        out[:, :input_ids.shape[1]] = input_ids
        for i, n in enumerate(new):
            out[i, input_ids.shape[1]:input_ids.shape[1] + len(n)] = torch.tensor(n, dtype=out.dtype)
        return out

    def get_tokenizer(self):
        if self.tokenizer is None:  # the base's own: its eos and pad ids decide where rows stop
            self.tokenizer = load_tokenizer(self.name_or_path)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    # ------------------------------------------------------------------ files and the Hub
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """The active prompt as a softprompt folder (prompt.safetensors, prompt_config.json) that is
        also a PEFT adapter folder (adapter_config.json, adapter_model.safetensors):
        `softprompt generate --prompt DIR` and `PeftModel.from_pretrained(base, DIR)` both read it.
        PEFT's keywords (safe_serialization, selected_adapters, ...) are accepted and ignored."""
        from .prompts.peft_io import export_peft
        from .prompts.hub_push import hub_model_id

        if self.prompt is None:
            raise ValueError("save_pretrained: no active prompt to save")
        out = Path(save_directory)
        name = str(self.prompt.meta.get("model") or model_name(self.name_or_path))
        save_prompt(without_projection(self.prompt), out, {"model": name})  # as `train --method prefix` saves
        with tempfile.TemporaryDirectory() as tmp:
            peft = export_peft(out, Path(tmp) / "peft", hub_model_id(name))
            for f in peft.iterdir():
                shutil.copy2(f, out / f.name)
        return out

    def push_to_hub(self, repo_id: str, private: bool = False, revision: str | None = None,
                    commit_message: str = "", **kwargs: Any) -> str:
        """Upload the active prompt as `softprompt push` does (both layouts and a model card); returns the URL."""
        from .prompts.hub_push import push

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "prompt")
            return push(Path(tmp) / "prompt", repo_id, private, revision, commit_message)


def get_softprompt_model(base_model, config: PromptConfig | None = None, tokenizer=None, seed: int = 0,
                         forward_path: str = "auto", method: str = "prompt", prefix_projection: bool = False,
                         prefix_scaled_steps: bool = True, **prompt_kwargs: Any) -> SoftPromptModel:
    """`base_model` (frozen) with a new trainable prompt made as `softprompt train` makes it:
    `config` or PromptConfig's keywords (virtual_tokens=, init=, init_text=, init_file=).
    `method="prefix"`: per-layer keys and values (`train --method prefix`'s PrefixPrompt; with
    `prefix_projection`, produced through its MLP while training; with `prefix_scaled_steps`, as
    train's default, its parameter is scaled so that an optimiser's lr moves every layer's keys and
    values by the same fraction of themselves)."""
    from .api import python_errors, split_kwargs

    if method not in ("prompt", "prefix"):
        raise ValueError(f"method {method!r}: a SoftPromptModel trains a 'prompt' or a 'prefix' (ptuning and "
                         "residual train an encoder: use softprompt.train(method=...))")
    if prefix_projection and method != "prefix":
        raise ValueError("prefix_projection=True is for method='prefix'")
    if not prefix_scaled_steps and method != "prefix":
        raise ValueError("prefix_scaled_steps=False is for method='prefix'")
    if config is None:
        (config,) = split_kwargs("get_softprompt_model", prompt_kwargs, (PromptConfig,))
    elif prompt_kwargs:
        raise TypeError("get_softprompt_model(): give a config or PromptConfig's keywords, not both")
    model = SoftPromptModel(base_model, None, tokenizer, forward_path)
    tok = model.get_tokenizer()
    text = "Continue the text in the same style."
    with python_errors():
        if method == "prefix":
            prompt = init_prefix(base_model, tok, config, text, seed, projection=prefix_projection,
                                 scaled_steps=prefix_scaled_steps)
        else:
            prompt = init_prompt(base_model, tok, config, default_text=text, seed=seed)
    prompt.meta["model"] = model_name(model.name_or_path)  # from any folder, as train records it
    model.add_prompt(DEFAULT, prompt.to(model.device))
    return model
