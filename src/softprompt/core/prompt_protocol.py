"""What a prompt is to the rest of the package: the `Prompt` protocol every kind implements.

The forward paths, the decoder's per-prompt key/value cache, saving and loading, PEFT I/O and the
server need only this of a prompt: how many positions it occupies before the text (`length`), the
input embeddings it places there if it has any (`input_embeds`), the keys and values it gives
each layer of a model (`past_key_values`), what trains (`parameters`) and what a prompt folder
stores (`kind`, `meta`, `state_tensors`). Today's one kind is prompt.SoftPrompt (kind "prompt",
P trainable input embeddings); a kind without input embeddings (a prefix of per-layer keys and
values) returns None from `input_embeds` and its own tensors from `past_key_values`.

`embeds_of` lets the forward code take either a Prompt or a bare [P, H] tensor (what the training
step passes: the data-parallel wrapper's output, whose gradient is all-reduced).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

from .utils import SoftpromptError

if TYPE_CHECKING:  # torch is imported by whoever holds a prompt; this module stays import-light
    import torch

# Per layer (keys, values), each [1, kv_heads, P, head_dim]: one prompt, batch 1.
KeyValues = list[tuple["torch.Tensor", "torch.Tensor"]]


@runtime_checkable
class Prompt(Protocol):
    kind: str             # recorded as "kind" in prompt_config.json; prompt.KINDS maps it back to a class
    meta: dict[str, Any]  # what prompt_config.json records beside the tensors (model, template, labels...)

    @property
    def length(self) -> int:
        """P: the positions the prompt occupies before the text."""
        ...

    @property
    def hidden_size(self) -> int:
        """H: the model width it was made for."""
        ...

    def input_embeds(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor | None":
        """[P, H] embeddings placed before the text's, or None for a kind that acts only through keys/values."""
        ...

    def past_key_values(self, model) -> KeyValues:
        """The prompt's per-layer keys and values on `model` (batch 1), what the rows attend to."""
        ...

    def parameters(self) -> Iterator["torch.nn.Parameter"]:
        """What trains."""
        ...

    def state_tensors(self) -> dict[str, "torch.Tensor"]:
        """The tensors a prompt folder stores, by their safetensors names."""
        ...


MEMBERS = ("kind", "meta", "length", "hidden_size", "input_embeds", "past_key_values", "parameters", "state_tensors")


def is_prompt(obj: Any) -> bool:
    """`obj` has Prompt's members. What isinstance(obj, Prompt) says, but torch.compile can trace it:
    dynamo turns that isinstance into issubclass, which typing refuses for a protocol with data members
    (so a compiled forward failed in a fresh process)."""
    return all(hasattr(obj, name) for name in MEMBERS)


def embeds_of(prompt: "Prompt | torch.Tensor | None") -> "torch.Tensor | None":
    """[P, H] input embeddings of a prompt given as a Prompt or as the tensor itself (None: no prompt)."""
    if prompt is None or not is_prompt(prompt):
        return prompt
    return prompt.input_embeds()


def forward_input(prompt: "Prompt | None") -> "Prompt | torch.Tensor | None":
    """What the forward functions take for `prompt`: its [P, H] input embeddings, or the Prompt
    itself for a kind without them (a prefix: its keys and values reach the layers directly)."""
    if prompt is None:
        return None
    embeds = prompt.input_embeds()
    return prompt if embeds is None else embeds


def embeds_for(prompt: Prompt, what: str, where: Any) -> "torch.Tensor":
    """A prompt's [P, H] input embeddings for a command that works on them (`what`); one error line
    naming the prompt (`where`) for a kind without them."""
    embeds = prompt.input_embeds()
    if embeds is None:
        raise SoftpromptError(f"{what} works on input embeddings; {where} is a {prompt.kind!r} prompt "
                              "(per-layer keys and values), which has none")
    return embeds
