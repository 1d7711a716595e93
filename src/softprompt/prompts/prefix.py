"""The deep prompt (prefix tuning, P-tuning v2): trainable keys and values for every layer, the
second kind of prompt_protocol.Prompt (kind "prefix").

A prefix has no input embeddings: each layer's attention sees P extra (key, value) positions
before the text, exactly what a cached prompt is to a decoder, so `past_key_values` is the prompt.
The tensor is held in fp32 as [L, 2, kv_heads, P, head_dim] (2: keys, values; kv_heads under
grouped-query attention, families.kv_geometry) and stored as `prefix_key_values` beside
prompt_config.json (kind "prefix", with the geometry). With `projection` (`--prefix-projection`,
PEFT's prefix_projection) the tensor is produced during training by an MLP from a [P, D]
embedding (D = kv_heads * head_dim, PEFT's token_dim); `folded()` turns it into a plain prefix,
what is saved as the result.

Inits: the text's own keys and values (run through the frozen model: the natural start), or a
normal draw scaled per layer like the model's own keys and values of that text ("random").

Steps: with `scaled_steps` (train's default, `--prefix-scaled-steps`) what trains is the tensor
divided by each (layer, key/value) slice's size at the start, so that an optimiser step moves every
slice by the same fraction of itself (step_scale).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.families import hidden_size, kv_geometry
from ..base.half_attention import takes_fp32_keys
from ..core.prompt_protocol import KeyValues
from ..core.utils import SoftpromptError
from ..forward.hidden import prefix_kv

KIND = "prefix"
TENSOR_NAME = "prefix_key_values"  # [L, 2, kv_heads, P, head_dim]
PROJECTION = "projection."         # safetensors names of the MLP's tensors (training checkpoints only)


class PrefixPrompt(nn.Module):
    """Per-layer keys and values, fp32 (updates of ~1e-4 vanish in bf16). Implements prompt_protocol.Prompt."""

    kind = KIND

    def __init__(self, kv: torch.Tensor, meta: dict[str, Any] | None = None, projection: bool = False,
                 scaled_steps: bool = False):
        super().__init__()
        kv = kv.detach().to(torch.float32).clone()
        if kv.ndim != 5 or kv.shape[1] != 2:
            raise ValueError(f"a prefix is [layers, 2, kv_heads, P, head_dim], got {list(kv.shape)}")
        self.geometry = (kv.shape[0], kv.shape[2], kv.shape[4])  # (layers, kv heads, head dim)
        self.P = kv.shape[3]
        self.meta = dict(meta or {})
        self.projection = projection
        # Trains kv / scale where scaled_steps asks (step_scale; an MLP takes plain steps). The buffer is
        # rebuilt from the start on --resume, and a power of two, so a checkpoint's kv divides back exactly.
        self.register_buffer("scale", step_scale(kv) if scaled_steps and not projection else None, persistent=False)
        if projection:
            # PEFT's encoder: an embedding [P, D] through Linear(D, D), tanh, Linear(D, L*2*D), whose output
            # is added to the (frozen) init `base`; the last layer starts at zero so that training starts
            # from the init exactly (PEFT's starts from random keys and values, whatever the init).
            L, heads, d = self.geometry
            D = heads * d
            self.embedding = nn.Parameter(torch.randn(self.P, D) * 0.02)
            self.transform = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, L * 2 * D))
            nn.init.zeros_(self.transform[2].weight)
            nn.init.zeros_(self.transform[2].bias)
            self.register_buffer("base", to_flat(kv))  # [P, L*2*D]
        else:
            self.kv = nn.Parameter(kv if self.scale is None else kv / self.scale)

    @property
    def length(self) -> int:
        return self.P

    @property
    def hidden_size(self) -> int:
        return int(self.meta.get("hidden_size") or 0)

    def input_embeds(self, dtype: torch.dtype | None = None) -> None:
        return None

    def key_values(self) -> torch.Tensor:
        """[L, 2, kv_heads, P, head_dim] fp32, with its gradient path (through the MLP when projecting)."""
        if not self.projection:
            return self.kv if self.scale is None else self.kv * self.scale
        L, heads, d = self.geometry
        return from_flat(self.transform(self.embedding) + self.base, L, heads, d)

    def forward(self) -> torch.Tensor:
        return self.key_values()

    def past_key_values(self, model) -> KeyValues:
        """Per-layer (keys, values), each [1, kv_heads, P, head_dim] in the model's dtype and device."""
        return layer_key_values(self.key_values(), self.geometry, model)

    def computed(self, kv: torch.Tensor) -> "ComputedPrefix":
        """This prefix with its keys and values `kv` already computed (by a data-parallel wrapper)."""
        return ComputedPrefix(kv, self)

    def folded(self) -> "PrefixPrompt":
        """A plain prefix with this one's keys and values (the MLP run once)."""
        with torch.no_grad():
            return PrefixPrompt(self.key_values(), self.meta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {TENSOR_NAME: self.key_values().detach().float().contiguous().cpu()}
        if self.projection:  # what a training checkpoint needs to carry on with the MLP
            out.update({PROJECTION + k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Take a checkpoint's tensors (state_tensors' names) into this prefix, shapes checked."""
        mine = self.state_dict(keep_vars=True)
        names = ({k[len(PROJECTION):]: k for k in tensors if k.startswith(PROJECTION)} if self.projection
                 else {"kv": TENSOR_NAME})
        if set(names) != set(mine):
            raise SoftpromptError(f"--resume: the checkpoint in {where} holds a prefix "
                                  f"{'without' if self.projection else 'with'} --prefix-projection; resume as it ran")
        for k, src in names.items():
            if tensors[src].shape != mine[k].shape:
                raise SoftpromptError(f"--resume: the checkpoint in {where} holds a prefix of shape "
                                      f"{list(tensors[src].shape)}, this run's is {list(mine[k].shape)}: resume with "
                                      "the same --virtual-tokens and model, or start over with --overwrite")
            value = tensors[src]
            if self.scale is not None:
                value = value / self.scale  # the checkpoint holds the keys and values; kv / scale trains
            mine[k].data.copy_(value)

    @classmethod
    def read(cls, weights: Path, meta: dict[str, Any], model=None) -> "PrefixPrompt":
        """A prefix from its safetensors file (prompt.load_prompt calls this for kind "prefix")."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise SoftpromptError(f"corrupt prefix file {weights}: {e}") from None
        t = tensors.get(TENSOR_NAME)
        if t is None or t.ndim != 5 or t.shape[1] != 2 or not t.is_floating_point():
            found = list(t.shape) if t is not None else sorted(tensors)
            raise SoftpromptError(f"{weights}: a prefix needs '{TENSOR_NAME}' [layers, 2, kv_heads, P, head_dim] "
                                  f"floats (found {found})")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise SoftpromptError(f"{weights}: '{TENSOR_NAME}' holds {bad} NaN or infinite value(s)")
        if model is not None:
            check_geometry((t.shape[0], t.shape[2], t.shape[4]), model, f"prefix {weights.parent}", meta.get("model"))
            if not meta.get("hidden_size"):  # imported from PEFT without a readable base: its cache fits this model
                meta = {**meta, "hidden_size": hidden_size(model)}
        return cls(t, meta)


def step_scale(kv: torch.Tensor) -> torch.Tensor:
    """[L, 2, 1, 1, 1]: each layer's key and value RMS in kv [L, 2, kv_heads, P, head_dim], floored at
    1e-3 and rounded to a power of two. Adam moves every element by about lr a step whatever its size,
    and on the built-in model a text's keys have an RMS near 2 in every layer while its values range
    from 0.04 (layer 0) to 1.8: one rate moves them by fractions 50x apart. Training kv / scale moves
    each slice by about lr of its own RMS, which is Adafactor's parameter scaling (Shazeer and Stern,
    2018), its floor included. The power of two (within a factor of 1.42 of the RMS) keeps
    kv / scale * scale equal to kv, bit for bit."""
    rms = kv.detach().float().pow(2).flatten(2).mean(-1).sqrt().clamp_min(1e-3)
    return torch.exp2(torch.log2(rms).round())[:, :, None, None, None]


def without_projection(prompt):
    """What a finished prompt file holds: a projecting prefix's keys and values with its MLP run once
    (a training checkpoint keeps the MLP); any other prompt as it is."""
    return prompt.folded() if isinstance(prompt, PrefixPrompt) and prompt.projection else prompt


class ComputedPrefix:
    """A prefix whose keys and values were computed outside it: the output of the data-parallel
    wrapper around a PrefixPrompt (training under several processes), whose backward all-reduces
    the gradient. The forward pass reads it as the prefix it came from (prompt_protocol.Prompt,
    kind "prefix"); it holds no parameters of its own."""

    kind = KIND

    def __init__(self, kv: torch.Tensor, of: PrefixPrompt):
        self.kv, self.of, self.meta = kv, of, of.meta

    @property
    def length(self) -> int:
        return self.of.length

    @property
    def hidden_size(self) -> int:
        return self.of.hidden_size

    def input_embeds(self, dtype: torch.dtype | None = None) -> None:
        return None

    def past_key_values(self, model) -> KeyValues:
        return layer_key_values(self.kv, self.of.geometry, model)

    def parameters(self):
        return self.of.parameters()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.of.state_tensors()


def layer_key_values(kv: torch.Tensor, geometry: tuple[int, int, int], model) -> KeyValues:
    """[L, 2, kv_heads, P, head_dim] as per-layer (keys, values) [1, kv_heads, P, head_dim] in the
    model's dtype and device, the geometry checked against the model's cache; in fp32 while they train
    on a half-precision CPU base whose attention takes them so (half_attention.takes_fp32_keys):
    rounded to bf16 before attention, a prefix lost 2 points on RTE (bench/results/cpu_bf16_prefix_kv_amd_epyc.json)."""
    check_geometry(geometry, model, "prefix")
    w = model.get_input_embeddings().weight
    training = kv.requires_grad and torch.is_grad_enabled()
    kv = kv.to(w.device, torch.float32 if training and takes_fp32_keys(model) else w.dtype)
    return [(layer[0][None], layer[1][None]) for layer in kv]


def to_flat(kv: torch.Tensor) -> torch.Tensor:
    """[L, 2, heads, P, d] -> PEFT's [P, L*2*heads*d] (its view(P, 2L, heads, d) reads it back)."""
    L, two, heads, P, d = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * heads * d)


def from_flat(flat: torch.Tensor, layers: int, heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's [P, L*2*heads*d] -> [L, 2, heads, P, d]."""
    P = flat.shape[0]
    return flat.reshape(P, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)


def check_geometry(geometry: tuple[int, int, int], model, what: str, trained_for: str | None = None) -> None:
    """A prefix fits a model whose cache has its (layers, kv heads, head dim)."""
    mine = kv_geometry(model)
    if tuple(geometry) != tuple(mine):
        extra = f" (it was trained for {trained_for})" if trained_for else ""
        raise SoftpromptError(f"{what} has (layers, kv heads, head dim) {tuple(geometry)} but the model's cache has "
                              f"{tuple(mine)}{extra}")


def text_key_values(model, tok, text: str, P: int) -> torch.Tensor:
    """The frozen model's own keys and values of `text`'s tokens, repeated to fill P (as the soft
    prompt's text init repeats them): [L, 2, kv_heads, P, head_dim] fp32."""
    ids = tok(text, add_special_tokens=False).input_ids
    if not ids:
        raise SoftpromptError(f"--init-text {text!r} tokenises to nothing")
    ids = torch.tensor((ids * (P // len(ids) + 1))[:P], device=model.device)
    with torch.no_grad():
        return prompt_key_values(model, model.get_input_embeddings()(ids))


def prompt_key_values(model, embeds: torch.Tensor) -> torch.Tensor:
    """The frozen model's keys and values of a soft prompt's [P, H] input embeddings, as a prefix's
    [L, 2, kv_heads, P, head_dim] fp32: a prefix holding them is the same prompt to every layer (the text
    attends to exactly these), which is how a soft prompt transfers into a prefix (--init-from)."""
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        layers, _ = prefix_kv(model, embeds.to(w.device, w.dtype))
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in layers]).float()


def prefix_meta(model) -> dict[str, Any]:
    """What a prefix records of the model it fits (prompt_config.json's geometry)."""
    L, heads, d = kv_geometry(model)
    return {"kind": KIND, "hidden_size": hidden_size(model), "num_layers": L, "num_key_value_heads": heads,
            "head_dim": d}


NEW_INITS = ("auto", "text", "random")  # the --init values init_prefix makes a prefix from


def init_prefix(model, tok, cfg, default_text: str = "", seed: int = 0, projection: bool = False,
                scaled_steps: bool = False) -> PrefixPrompt:
    """A new prefix of cfg.virtual_tokens positions. cfg.init "text" (and "auto"): the keys and values
    of the init text (or `default_text`); "random": a normal draw with each layer's key and value
    spread of that text. `projection`, `scaled_steps`: how it trains (PrefixPrompt)."""
    if cfg.init not in NEW_INITS:
        raise SoftpromptError(f"--init {cfg.init}: a new prefix starts from text (the text's own keys and values) "
                              "or random; a trained prompt or prefix is a start of its own (--init-from)")
    text = cfg.init_text or default_text or "Continue the text."
    kv = text_key_values(model, tok, text, cfg.virtual_tokens)
    if cfg.init in ("text", "auto"):
        meta = {"init": "text", "init_text": text}
    else:
        gen = torch.Generator().manual_seed(seed)
        std = kv.flatten(2).std(-1)[:, :, None, None, None]  # [L, 2, 1, 1, 1]
        kv = torch.randn(kv.shape, generator=gen) * std.cpu()
        meta = {"init": "random"}
    meta.update(prefix_meta(model))
    return PrefixPrompt(kv.cpu(), meta, projection=projection, scaled_steps=scaled_steps)
