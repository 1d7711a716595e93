"""The prompt-aware forward pass: hidden states of the text after a soft prompt, and losses
computed only where they are needed.

Equivalent paths:
- straightforward (PEFT's): prepend the prompt to every row's input embeddings, run [B, P+T];
- shared prefix (default): under a causal mask the prompt's keys/values do not depend on the text,
  so the prompt is computed once for all rows. Where the model's attention allows it, the prompt
  and all rows run as one padding-free packed sequence (packing.py); otherwise (BLOOM) the prompt
  runs once as a batch of 1, its KV cache is broadcast to the B rows (a view, so the gradient of
  every row flows back into the one prompt), and only the [B, T] text runs after it.
The `path` argument names one of them: "concat" (PEFT's), "kv" (prompt KV shared), "packed", or
"auto" (packed where the model and batch allow it, else kv); paths.choose_path decides.
Rows that each carry their own prompt (ensembles, mixed requests) go through `mixed_hidden`
instead. A prompt comes as a prompt_protocol.Prompt or as its [P, H] input embeddings; a Prompt
without input embeddings (a prefix) gives its per-layer keys and values to the kv path
(`deep_hidden`), which keeps them under activation checkpointing (`read_only_kv`).
Vocabulary logits are computed only at supervised positions, in chunks whose input gradient is
formed on the spot (the head is frozen), instead of at every position of [B, P+T] as PEFT does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from contextlib import contextmanager

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..base.cpu_linear import head_linear
from ..base.families import decoder, decoder_layers, logit_scale, logit_softcap
from ..core.prompt_protocol import embeds_of, is_prompt
from .packing import packed_hidden
from .paths import choose_path

# Above this many logits (rows x vocab) the cross-entropy is chunked and recomputed in backward.
CHUNK_ELEMENTS = 1 << 24


def prefix_kv(model, prompt: torch.Tensor):
    """Run the prompt [P, H] alone: per-layer (keys, values) with batch 1, and its last hidden state [1, H]."""
    # A plain (full) cache keeps all P keys in every layer: the config's own would give sliding-window
    # layers only their last window-1, while the text after the prompt may see more of them.
    out = decoder(model)(inputs_embeds=prompt[None], cache=DynamicCache(), use_cache=True)
    layers = [(layer.keys, layer.values) for layer in out.cache.layers]
    return layers, out.last_hidden_state[:, -1]


def expand_kv(layers, batch: int) -> DynamicCache:
    # expand() is a view: no copy, and backward sums the rows' gradients into the shared prefix.
    return DynamicCache(ddp_cache_data=[(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]))
                                        for k, v in layers])


class ReadOnlyLayer(DynamicLayer):
    """One layer's prompt keys/values that the text reads but never extends: a layer's `update`
    returns [prompt; text] without storing it, so running the layer again (activation
    checkpointing's recompute) sees the same cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_kv(layers, batch: int) -> DynamicCache:
    """The prompt's per-layer (K, V) [1, heads, P, d] broadcast to `batch` rows (views), read-only."""
    cache = DynamicCache()
    cache.layers = [ReadOnlyLayer(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in layers]
    return cache


@contextmanager
def cache_kept_under_checkpointing(model):
    """transformers' checkpointed layers drop the cache (a layer that wrote into it would write
    twice on the recompute) unless the layer says it only reads it: true of a read_only_kv cache."""
    layers = [m for m in decoder_layers(model) if m.gradient_checkpointing]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache  # back to the class's False


def text_hidden(model, prompt, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                path: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [B, T, H] of the text after the prompt (a Prompt, its [P, H] embeddings or
    None), and the prompt's last hidden state ([1 or B, H], None when there is no prompt), which
    predicts the first text token. A prompt without input embeddings (a prefix) has no last hidden
    state: as in PEFT's prefix tuning, nothing predicts the first text token."""
    if is_prompt(prompt) and prompt.input_embeds() is None:
        return deep_hidden(model, prompt, input_ids, attention_mask, path)
    prompt = embeds_of(prompt)
    embed = model.get_input_embeddings()
    x = embed(input_ids)  # [B, T, H]
    B = x.shape[0]
    if prompt is None or prompt.shape[0] == 0:
        h = decoder(model)(inputs_embeds=x, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return h, None
    prompt = prompt.to(x.dtype)
    P = prompt.shape[0]
    path = choose_path(model, path, rows=attention_mask).path
    if path == "packed":
        return packed_hidden(model, prompt, x, attention_mask)
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # [B, P+T]
    if path == "kv":
        layers, last = prefix_kv(model, prompt)
        h = decoder(model)(inputs_embeds=x, attention_mask=mask, cache=expand_kv(layers, B),
                           use_cache=True).last_hidden_state
        return h, last
    x = torch.cat([prompt.expand(B, P, -1), x], dim=1)
    h = decoder(model)(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
    return h[:, P:], h[:, P - 1]


def deep_hidden(model, prompt, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                path: str = "auto") -> tuple[torch.Tensor, None]:
    """Hidden states [B, T, H] of the text after a prompt given only as per-layer keys and values:
    they are the cache the text attends to, at positions P.. (as transformers places text after a
    cache: RoPE and learned positions from P, ALiBi from the mask that covers the prefix)."""
    choose_path(model, path, rows=attention_mask, deep=True)  # kv, or one error line for another request
    B, P = input_ids.shape[0], prompt.length
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # [B, P+T]
    x = model.get_input_embeddings()(input_ids)
    with cache_kept_under_checkpointing(model):
        h = decoder(model)(inputs_embeds=x, attention_mask=mask, cache=read_only_kv(prompt.past_key_values(model), B),
                           use_cache=True).last_hidden_state
    return h, None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Softmax statistics in at least float32; float64 stays float64 (parity checks run in it).
    return x if x.dtype == torch.float64 else x.float()


def mixed_hidden(model, prompts: list, seqs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Hidden states [B, L, H] of rows [prompts[b] ; seqs[b]], each with a prompt of its own (a
    Prompt, its [P, H] embeddings, or none), right-padded: pads come after every real token, so a
    causal model's real positions are untouched by them. Also each row's prompt length, where its
    text starts."""
    if any(is_prompt(p) and p.input_embeds() is None for p in prompts):
        raise ValueError("a prompt without input embeddings (a prefix) cannot share a batch with other prompts "
                         "here: its rows take text_hidden's kv path")
    prompts = [embeds_of(p) for p in prompts]
    embed = model.get_input_embeddings()
    dtype, dev = embed.weight.dtype, embed.weight.device
    text = [embed(torch.tensor(s, dtype=torch.long, device=dev)) for s in seqs]
    parts = [t if p is None else torch.cat([p.to(dev, dtype), t]) for p, t in zip(prompts, text)]
    L = max(p.shape[0] for p in parts)
    x = torch.zeros(len(parts), L, parts[0].shape[1], dtype=dtype, device=dev)
    mask = torch.zeros(len(parts), L, dtype=torch.long, device=dev)
    for b, p in enumerate(parts):
        x[b, :p.shape[0]] = p
        mask[b, :p.shape[0]] = 1
    h = decoder(model)(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
    return h, [0 if p is None else p.shape[0] for p in prompts]


def logits(model, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Vocabulary logits of states h [..., H] (float32 or wider, soft-capped where the family does);
    `rows` [C] limits them to a few candidate tokens."""
    head = model.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    if rows is not None:  # logits of a few candidate tokens only
        # In float32: a few rows cost nothing, and bf16's rounding of a logit (0.06 at 15) is the size of
        # the margins between label words; a bf16 soft prompt trained through bf16 label logits lost 4.5
        # points on RTE (bench/results/cpu_bf16_tasks_amd_epyc.json), and none in float32 ones
        # (cpu_bf16_labels_amd_epyc.json).
        h, w, b = _upcast(h), _upcast(w[rows]), (_upcast(b[rows]) if b is not None else None)
    z = _upcast(F.linear(h, w, b))
    scale, cap = logit_scale(model), logit_softcap(model)
    if scale != 1.0:
        z = z * scale
    return torch.tanh(z / cap) * cap if cap else z


def _ce_sum(model, h, y):
    return F.cross_entropy(logits(model, h), y, reduction="none")


class _FrozenHeadCE(torch.autograd.Function):
    """Per-token cross-entropy through a frozen output layer, its input gradient computed in forward.

    With the head frozen, backward only needs dL/dh = (softmax - onehot) @ W per token, scaled by the
    upstream gradient. Computing it chunk by chunk while the logits are at hand means the [N, V]
    logits are never stored nor recomputed: the output layer costs two matmuls, as in a plain
    forward/backward, in the memory of one chunk.
    """

    @staticmethod
    def forward(ctx, h, w, b, y, cap, n, scale=1.0, linear=F.linear):
        losses, grads = [], []
        for s in range(0, h.shape[0], n):
            z = _upcast(linear(h[s:s + n], w, b))  # [n, V]
            if scale != 1.0:
                z = z * scale
            t = None
            if cap:
                t = torch.tanh(z / cap)
                z = t * cap
            lse = torch.logsumexp(z, -1)
            yy = y[s:s + n, None]
            losses.append(lse - z.gather(1, yy).squeeze(1))
            g = torch.exp(z.sub_(lse[:, None]))  # softmax, in place of the logits
            g.scatter_add_(1, yy, torch.full_like(yy, -1, dtype=g.dtype))
            if t is not None:
                g.mul_(1 - t * t)
            if scale != 1.0:
                g.mul_(scale)
            grads.append(linear(g.to(w.dtype), w.t(), None))  # [n, H]: g @ w
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_out):
        (dh,) = ctx.saved_tensors
        return grad_out[:, None].to(dh.dtype) * dh, None, None, None, None, None, None, None


def token_losses(model, h: torch.Tensor, y: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-token cross-entropy [N] for states h [N, H] and targets y [N]; chunked above
    `chunk_elements` logits."""
    if h.shape[0] == 0:  # nothing supervised (rows of one token and no prompt to predict it)
        return h.new_zeros(0, dtype=torch.float32).requires_grad_(h.requires_grad)
    head = model.get_output_embeddings()
    w, b = head.weight, getattr(head, "bias", None)
    n = max(1, chunk_elements // w.shape[0])
    frozen = not w.requires_grad and (b is None or not b.requires_grad)
    if torch.is_grad_enabled() and h.requires_grad and frozen:
        return _FrozenHeadCE.apply(h, w, b, y, logit_softcap(model) or 0.0, n, logit_scale(model),
                                   head_linear(head))
    if h.shape[0] <= n or not torch.is_grad_enabled():
        return torch.cat([_ce_sum(model, h[s:s + n], y[s:s + n]) for s in range(0, h.shape[0], n)])
    # A trainable head (full fine-tuning): recompute each chunk's logits in backward instead of keeping them.
    return torch.cat([checkpoint(_ce_sum, model, h[s:s + n], y[s:s + n], use_reentrant=False)
                      for s in range(0, h.shape[0], n)])


def needed_inputs(targets: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T'] mask of the input tokens the loss depends on: each row up to, not including, its
    last supervised token. That token is only ever a target (with a causal mask nothing before it
    looks at it), so running it through the model is wasted work: on classification it is the label
    word, one of about 20 tokens per row. T' drops columns no row needs."""
    T = targets.shape[1]
    t = torch.arange(T, device=targets.device)
    last = torch.where(targets != -100, t, -1).amax(1)  # [B], -1 for a row with no target
    keep = attention_mask.bool() & (t[None] < last[:, None])
    width = int(last.max().clamp(min=1))
    return keep[:, :width]


def supervised(model, prompt, batch, path: str = "auto"):
    """Predictor states [N, H], targets [N] and row index [N] of every supervised token."""
    keep = needed_inputs(batch.targets, batch.attention_mask)  # [B, T'], T' < T
    T = keep.shape[1]
    h, last = text_hidden(model, prompt, batch.input_ids[:, :T], keep.long(), path)
    return predictor_states(h, last, batch.targets)


def predictor_states(h: torch.Tensor, last: torch.Tensor | None, targets: torch.Tensor):
    """Predictor states [N, H], targets [N] and row index [N] of every supervised token, from the
    text's states h [B, T', H] and the prompt's last state ([1 or B, H]; None: nothing predicts token 0)."""
    # States for tokens 0..T' (the last one predicted by the last kept input).
    first = last.expand(h.shape[0], -1)[:, None] if last is not None else h.new_zeros(h.shape[0], 1, h.shape[2])
    # [B, T'+1, H]; T' keeps at least one column, so rows of one token would give one state too many
    states = torch.cat([first, h], dim=1)[:, :targets.shape[1]]
    sel = targets[:, :states.shape[1]] != -100
    if last is None:
        sel[:, 0] = False  # nothing predicts the first token without a prompt
    rows = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
    return states[sel], targets[:, :states.shape[1]][sel], rows


def batch_loss(model, prompt, batch, path: str = "auto", class_ids: torch.Tensor | None = None):
    """Summed loss and the number of supervised tokens. With `class_ids` [C] (single-token label
    words) the softmax runs over the label words only; otherwise over the whole vocabulary."""
    states, y, rows = supervised(model, prompt, batch, path)
    if class_ids is not None and class_ids.ndim == 2:  # a mixture: [K, C], each row's task's words
        return mixture_class_loss(model, states, y, class_ids[batch.tasks.to(class_ids.device)[rows]]), y.numel()
    if class_ids is not None:
        z = logits(model, states, class_ids)  # [N, C]
        y = (y[:, None] == class_ids[None]).float().argmax(-1)
        return F.cross_entropy(z, y, reduction="sum"), y.numel()
    return token_losses(model, states, y).sum(), y.numel()


def mixture_class_loss(model, states: torch.Tensor, y: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over each token's own label words: `cands` [N, C] its task's word ids (-1 pads
    a task of fewer words, which then has no probability). The logits of every task's words are formed
    once ([N, U]) and each row reads its own."""
    union = cands[cands >= 0].unique()  # sorted
    z_all = logits(model, states, union)  # [N, U]
    z = z_all.gather(1, torch.searchsorted(union, cands.clamp(min=0)))  # [N, C]
    z = z.masked_fill(cands < 0, -torch.inf)
    gold = (y[:, None] == cands).float().argmax(-1)
    return F.cross_entropy(z, gold, reduction="sum")


def row_logprobs(model, prompt, batch, path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probability of the supervised tokens [B] and their count [B]."""
    states, y, rows = supervised(model, prompt, batch, path)
    lp = -token_losses(model, states, y)
    B = batch.input_ids.shape[0]
    sums = torch.zeros(B, device=lp.device).index_add_(0, rows, lp)
    counts = torch.zeros(B, device=lp.device).index_add_(0, rows, torch.ones_like(lp))
    return sums, counts


def next_token_logprobs(model, prompt, input_ids, attention_mask, candidates: torch.Tensor | None = None,
                        path: str = "auto") -> torch.Tensor:
    """Log-probabilities [B, V] (or [B, C] of `candidates`, normalised over the full vocabulary)
    of the token after each right-padded row's last real token."""
    h, last = text_hidden(model, prompt, input_ids, attention_mask, path)
    lengths = attention_mask.sum(1)
    B = h.shape[0]
    state = h[torch.arange(B, device=h.device), (lengths - 1).clamp(min=0)]
    if last is not None:  # empty rows are predicted by the prompt itself
        state = torch.where((lengths == 0)[:, None], last.expand(B, -1), state)
    lp = torch.log_softmax(logits(model, state), dim=-1)
    return lp if candidates is None else lp[:, candidates]
