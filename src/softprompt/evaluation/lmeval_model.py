"""lm-evaluation-harness's `softprompt` model (its LM API), registered under that name when this
module is imported: `import softprompt.evaluation.lmeval_model`, then `lm_eval.simple_evaluate(model=
"softprompt", model_args="pretrained=MODEL,prompt=DIR", ...)`; or `softprompt lm-eval` (lmeval.py).

Scoring is softprompt's: a context is tokenised as a row's input is (special tokens added, or
the chat template when the prompt was trained on chat), its continuation on its own, and the
continuation's log-likelihood is the sum over its tokens of the states `forward.supervised`
gives, as `softprompt eval` scores label words, so lm_eval's accuracy on a multiple-choice task
is rank classification by `softprompt eval` on the same rows.

Every kind of prompt works: a soft prompt is its input embeddings, a prefix (per-layer keys and
values) is the cache the text attends to (forward.hidden's kv path when scoring, the decoder's
per-prompt cache when generating), both through prompt_protocol.forward_input as `eval` and
`generate` take it.
"""
from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..base.families import max_positions
from ..base.models import load_model
from ..core.config import GenerateConfig, ModelConfig
from ..core.utils import SoftpromptError
from ..core.prompt_protocol import forward_input
from ..data.batching import Example, collate, pad_id
from ..data.formatting import chat_wrap
from ..forward.hidden import logits, supervised
from ..forward.prefill import PromptKV
from ..generation.generate import generate_batch
from ..prompts.prompt import load_prompt
from ..prompts.recorded import base_for


DEFAULT_MAX_LENGTH = 2048  # lm_eval's HF model's, for a model without a position limit (ALiBi)
SWITCH = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def switch_arg(name: str, value: Any) -> bool | None:
    """A --model_args switch as lm_eval hands it over (a bool, or the string it did not convert)."""
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() not in SWITCH:
        raise SoftpromptError(f"--model_args {name}={value}: expected true or false")
    return SWITCH[str(value).lower()]


def window_length(model, asked: int | str | None) -> int:
    """The positions a scored window takes, prompt included: `max_length` as asked, which the model's
    position table must hold (GPT-2's learnt one is indexed past otherwise), or by default the
    model's own length, as lm_eval's HF model takes it (2048 where the model sets none)."""
    limit = max_positions(model)
    if asked is None:
        return limit or DEFAULT_MAX_LENGTH
    if limit and int(asked) > limit:
        raise SoftpromptError(f"--model_args max_length={asked} exceeds the model's {limit} positions: give at most "
                              f"{limit} (the default)")
    return int(asked)


@register_model("softprompt")
class SoftpromptLM(LM):
    """`pretrained`: a softprompt --model (Hub id, folder, .gguf, built-in; default: the base the
    prompt was trained on, else the built-in); `prompt`: a prompt folder, hf://REPO_ID[@REV] or
    none; `chat`: wrap contexts in the chat template (default: as the prompt was trained)."""

    def __init__(self, pretrained: str | None = None, prompt: str = "none", dtype: str = "float32",
                 device: str | None = None, batch_size: int | str = 16, chat: bool | None = None,
                 max_length: int | None = None, max_batch_size: Any = None, **unknown: Any):  # max_batch_size: unused
        super().__init__()
        if unknown:  # a misspelt key (`promt=DIR`) would otherwise score the untuned model without a word
            raise SoftpromptError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))} (this model takes "
                                  "pretrained, prompt, dtype, device, batch_size, chat and max_length)")
        chat = switch_arg("chat", chat)
        if max_length is not None and (not str(max_length).isdigit() or int(max_length) < 1):
            raise SoftpromptError(f"--model_args max_length={max_length}: expected a whole number of tokens")
        # lm_eval reads `prompt=none` (and `None`) as Python's None
        prompt = "" if prompt is None or str(prompt) in ("", "none", "None") else str(prompt)
        pretrained, bits = (base_for(prompt, "--model_args pretrained=MODEL") if pretrained in (None, "")
                            else (str(pretrained), "none"))
        self.model, self.tok = load_model(ModelConfig(model=pretrained, dtype=dtype, device=device or "auto",
                                                      quantize=bits))
        sp = load_prompt(prompt, self.model) if prompt else None
        if sp is not None:  # scored, never trained here
            sp = sp.to(self.model.device).requires_grad_(False)
        # [P, H] input embeddings, or a prefix itself (its keys and values are the text's cache)
        self.prompt = forward_input(sp)
        # A soft prompt's last state predicts the text's first token; a prefix has none (nor has no prompt).
        self.first_predicted = isinstance(self.prompt, torch.Tensor) and self.prompt.shape[0] > 0
        self.chat = bool(sp.meta.get("chat")) if chat is None and sp is not None else bool(chat)
        # The token a text starts from where nothing else predicts its first one
        self.start = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.kv = PromptKV(self.model)  # the prompt's keys and values, computed once for every generate_until
        self.batch = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = window_length(self.model, max_length)
        # The prompt's P positions come before the text in the same window, so the text gets the rest.
        self.text_length = self.max_length - (sp.length if sp is not None else 0)
        if self.text_length < 1:
            raise SoftpromptError(f"--model_args max_length={self.max_length} leaves no room for text after the "
                                  f"prompt's {sp.length} virtual tokens: raise max_length")

    # ------------------------------------------------------------ tokenising as softprompt does

    def context_ids(self, context: str) -> list[int]:
        if self.chat:
            return self.tok(chat_wrap(self.tok, context), add_special_tokens=False).input_ids
        ids = self.tok(context).input_ids
        if not ids and not self.first_predicted:  # nothing would predict the first token
            ids = [self.start]
        return ids

    def continuation_ids(self, continuation: str) -> list[int]:
        return self.tok(continuation, add_special_tokens=False).input_ids

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation after its context, and whether greedy
        decoding would have produced it; longest rows first, `batch_size` rows a pass."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for s in range(0, len(order), self.batch):
            idx = order[s:s + self.batch]
            rows = [pairs[i] for i in idx]
            b = collate([self.window(c, t) for c, t in rows], pad_id(self.tok)).to(self.model.device)
            states, y, row = supervised(self.model, self.prompt, b)
            lp = torch.log_softmax(logits(self.model, states).float(), -1)
            tok_lp = lp.gather(1, y[:, None])[:, 0]
            sums = torch.zeros(len(idx), dtype=tok_lp.dtype, device=lp.device).index_add_(0, row, tok_lp)
            misses = torch.zeros(len(idx), device=lp.device).index_add_(0, row, (lp.argmax(-1) != y).float())
            for j, i in enumerate(idx):
                out[i] = (float(sums[j]), bool(misses[j] == 0))
        return out

    def window(self, context: list[int], continuation: list[int]) -> Example:
        """The row scored: the continuation whole and as much of the context's end as fits beside it
        and the prompt in `max_length` positions (at least one context token, which predicts the first).
        A continuation longer than that is refused: its start would pass the model's positions."""
        if len(continuation) > self.text_length:
            raise SoftpromptError(f"a continuation of {len(continuation)} tokens does not fit the {self.text_length} "
                                  f"positions that max_length={self.max_length} leaves for text: raise --model_args "
                                  "max_length, up to the model's length")
        keep = max(1, self.text_length - len(continuation))
        return Example(context[-keep:] + continuation, len(context[-keep:]))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for r in requests:
            context, continuation = r.args
            if context and context[-1].isspace() and not continuation[:1].isspace():  # as lm_eval's own models do
                continuation, context = context[len(context.rstrip()):] + continuation, context.rstrip()
            pairs.append((self.context_ids(context), self.continuation_ids(continuation)))
        return self.score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, in disjoint windows of the positions that `max_length` leaves
        after the prompt."""
        out = []
        for r in requests:
            # lm_eval's own windows, as its HF model cuts them, over the positions the prompt leaves
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.continuation_ids(r.args[0]), prefix_token=self.start, max_seq_len=self.text_length,
                context_len=1)]
            out.append(sum(s for s, _ in self.score(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kw = r.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kw.get("temperature", 0.0) or 0.0)
            cfg = GenerateConfig(max_new_tokens=int(kw.get("max_gen_toks", 256)),
                                 sample=bool(kw.get("do_sample")) and temp > 0, temperature=temp if temp > 0 else 1.0)
            # As lm_eval's HF model: the context's end, leaving room for the new tokens (and the prompt)
            ids = self.context_ids(context)[-max(1, self.text_length - cfg.max_new_tokens):]
            new = generate_batch(self.model, self.tok, [(self.prompt, ids)], cfg, self.kv)[0]
            text = self.tok.decode(new, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "name_or_path", "softprompt").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template, which lm_eval records with --apply_chat_template."""
        return getattr(self.tok, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)
