"""Soft prompt initialisation strategies, as one table.

`INITS` maps each `--init` name to its function, the PEFT `prompt_tuning_init` it exports as, and
its help line; the flag's choices, the unknown-init error and the PEFT export all read it, so a new
strategy is one entry plus its function. `auto` is not a strategy but a choice between two
(`resolve`). Each function takes an `InitInputs` and returns the [P, H] starting embeddings and
what to record about them in the prompt's metadata. What a strategy needs from higher up (the
label words' token ids, a saved prompt's tensor) comes in `InitInputs`, filled by
prompt.init_prompt, so this table imports nothing of the package but utils.

torch is imported inside the functions: config.py reads this table, and `softprompt --help`
should not load torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .utils import SoftpromptError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
# Lester et al. sample vocabulary inits from the 5,000 most common tokens; BPE ids are roughly
# ordered by merge frequency, so the lowest ids stand in for "most common".
VOCAB_POOL = 5000


@dataclass
class InitInputs:
    model: Any
    tok: Any
    cfg: Any                     # the PromptConfig
    emb: "torch.Tensor"          # [V, H] the model's input embeddings, float32
    gen: "torch.Generator"       # seeded: the same seed gives the same prompt
    label_ids: list[list[int]]   # each label word's token ids as they follow the inputs; [] without labels
    default_text: str            # a task description for `text` when --init-text is not given
    load_file: Callable[[str], "torch.Tensor"]  # a saved prompt folder -> its [P, H] embeddings (--init file)


Made = tuple["torch.Tensor", dict[str, Any]]  # ([P, H] embeddings, metadata)


def sample_vocab(x: InitInputs, n: int) -> "torch.Tensor":
    """n embeddings [n, H] of tokens drawn from the VOCAB_POOL lowest ids, special tokens excluded."""
    import torch

    special = set(getattr(x.tok, "all_special_ids", []) or [])
    pool = torch.tensor([i for i in range(min(VOCAB_POOL, x.emb.shape[0])) if i not in special])
    return x.emb[pool[torch.randint(len(pool), (n,), generator=x.gen)]]


def random_init(x: InitInputs) -> Made:
    import torch

    # Match the scale of real token embeddings; N(0, 1) (PEFT's default) is far off for most models.
    return torch.randn(x.cfg.virtual_tokens, x.emb.shape[1], generator=x.gen) * x.emb.std(), {}


def vocab_init(x: InitInputs) -> Made:
    return sample_vocab(x, x.cfg.virtual_tokens), {}


def text_init(x: InitInputs) -> Made:
    text = x.cfg.init_text or x.default_text
    if not text:
        raise SoftpromptError("--init text needs --init-text TEXT")
    ids = x.tok(text, add_special_tokens=False).input_ids
    if not ids:
        raise SoftpromptError(f"--init-text {text!r} tokenises to nothing")
    P = x.cfg.virtual_tokens
    # PEFT's text init: repeat the text's tokens until P are filled, then cut to P.
    return x.emb[(ids * (P // len(ids) + 1))[:P]], {"init_text": text}


def labels_init(x: InitInputs) -> Made:
    import torch

    if not x.label_ids:
        raise SoftpromptError("--init labels needs --labels a,b,...")
    # The label words' tokens as they follow the inputs, by the one rule rank classification uses.
    ids = [i for word in x.label_ids for i in word][:x.cfg.virtual_tokens]
    rest = sample_vocab(x, x.cfg.virtual_tokens - len(ids))
    return (torch.cat([x.emb[ids], rest]) if ids else rest), {}


def file_init(x: InitInputs) -> Made:
    if not x.cfg.init_file:
        raise SoftpromptError("--init file needs --init-file DIR")
    embeds = x.load_file(x.cfg.init_file)  # [P, H]
    # --init-from resolves to this init (prompts/transfer.py): errors name the flag the user gave.
    name = "--init-from" if x.cfg.init_from else "--init-file"
    if embeds.shape[0] != x.cfg.virtual_tokens:
        raise SoftpromptError(f"{name} {x.cfg.init_file} has {embeds.shape[0]} virtual tokens but "
                              f"--virtual-tokens is {x.cfg.virtual_tokens}")
    return embeds, {"init_file": x.cfg.init_file, **({"init_from": x.cfg.init_from} if x.cfg.init_from else {})}


@dataclass(frozen=True)
class Init:
    make: Callable[[InitInputs], Made]
    peft: str  # PEFT's PromptTuningInit it exports as: TEXT, SAMPLE_VOCAB or RANDOM (PEFT has no other)
    help: str


INITS: dict[str, Init] = {
    "random": Init(random_init, "RANDOM", "Gaussian at the scale of the token embeddings"),
    "vocab": Init(vocab_init, "SAMPLE_VOCAB", f"embeddings of tokens sampled from the {VOCAB_POOL} most common"),
    "text": Init(text_init, "TEXT", "the embeddings of --init-text's tokens, repeated to fill the prompt"),
    "labels": Init(labels_init, "RANDOM", "the label words' embeddings, then sampled vocabulary"),
    "file": Init(file_init, "RANDOM", "the prompt saved in --init-file"),
}
CHOICES = (AUTO, *INITS)
HELP = ("initialisation: auto (a prefix, the default method, starts from a text's keys and values; a soft prompt "
        "from the label words for classification, else from a text); "
        + "; ".join(f"{name}: {init.help}" for name, init in INITS.items()))


def check(init: str) -> None:
    if init not in CHOICES:
        raise SoftpromptError(f"unknown --init {init!r}: use {', '.join(CHOICES[:-1])} or {CHOICES[-1]}")


def resolve(init: str, label_words: list[str] | None) -> str:
    """The strategy `init` names; `auto` picks one for the data."""
    check(init)
    # Label words are the strongest start for classification (Lester et al. 2021, section 7).
    return ("labels" if label_words else "text") if init == AUTO else init


def peft_init(init: str) -> str:
    """PEFT's `prompt_tuning_init` for a prompt made by `init` (RANDOM for imported or unknown ones:
    PEFT only uses it to fill the prompt before the saved tensor replaces it)."""
    return INITS[init].peft if init in INITS else "RANDOM"
