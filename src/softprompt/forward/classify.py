"""Rank classification: which label word the model finds most probable after an input.

One rule for a label word's tokens (labels.py) and one scorer, used by evaluation, prompt
ensembles, the server's /v1/classify and training's label-word loss:
- the scorer: log-probability of each candidate's tokens after each row's input, every row with
  its own soft prompt (or none). Single-token candidates need one forward pass over the inputs
  (the next-token distribution holds them all): a batch whose rows share one prompt takes the
  shared-prefix forward; rows with different prompts (ensembles) run each as [prompt ; text].
  Multi-token candidates (RTE's " not_entailment") sum their tokens' log-probabilities: each row
  runs once after its prompt's keys and values, and its candidates run together over that cache
  (`rows_continuations`), not the row once per candidate.
`token_logprobs` reads the same states token by token (with the most probable tokens at each
position): the server's OpenAI `logprobs` and `echo`.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..base.families import needs_contiguous_rows
from ..core.utils import SoftpromptError, live_output
from ..data.batching import Example, collate
from ..data.labels import label_token_ids
from .hidden import CHUNK_ELEMENTS, logits, mixed_hidden, next_token_logprobs, row_logprobs, supervised
from .prefill import PrefixState, PromptKV, extend, prefill, repeat_rows

Row = tuple[torch.Tensor | None, list[int]]  # (soft prompt [P, H] or None, input token ids)


def row_candidates(fmt, examples: list[Example]) -> list[list[list[int]]]:
    """Each example's own label-word token ids (a `formatting.Formatter`'s words after the example's input)."""
    memo: dict[tuple[int, str], list[list[int]]] = {}
    out = []
    for e in examples:
        f = fmt.of(e)  # a mixture's rows each carry their own task's label words
        rendered = f.render_input(e.text)
        key = (e.task, rendered[-1:])  # label_text depends only on the input's last character
        if key not in memo:
            memo[key] = label_token_ids(f.tok, f.label_words, rendered)
        out.append(memo[key])
    return out


def task_class_ids(fmt, examples: list[Example]) -> torch.Tensor | None:
    """single_token_classes of one task [C]; of a mixture's K tasks, each task's [K, C] (-1 pads a task of
    fewer words), or None when a task has none."""
    parts = fmt.parts(examples)
    if len(parts) == 1:
        return single_token_classes(fmt, examples)
    ids = [single_token_classes(f, ex) for f, ex in parts]
    if any(i is None for i in ids):
        return None
    out = torch.full((len(ids), max(len(i) for i in ids)), -1, dtype=torch.long)
    for k, i in enumerate(ids):
        out[k, :len(i)] = i
    return out


def single_token_classes(fmt, examples: list[Example]) -> torch.Tensor | None:
    """The label words' token ids [C] when every word is one token, the same after every input;
    None otherwise (the label-word softmax of training needs exactly that)."""
    sets = {tuple(map(tuple, c)) for c in row_candidates(fmt, examples)}
    if len(sets) != 1 or any(len(c) != 1 for c in next(iter(sets))):
        return None
    return torch.tensor([c[0] for c in next(iter(sets))])


def several_token_words(fmt, examples: list[Example]) -> str:
    """The label words of several tokens, as a message names them ("'Sci/Tech' (3 tokens)"), after the
    first input of each task (a word may tokenise otherwise after another input)."""
    named = {}
    for f, rows in fmt.parts(examples):
        if rows:
            for word, ids in zip(f.label_words, label_token_ids(f.tok, f.label_words, f.render_input(rows[0].text))):
                if len(ids) != 1:
                    named[word] = f"{word!r} ({len(ids)} tokens)"
    return ", ".join(named.values())


def class_token_ids(fmt, examples: list[Example]) -> torch.Tensor:
    """task_class_ids, or the one-line error that says why there are none."""
    ids = task_class_ids(fmt, examples)
    if ids is not None:
        return ids
    if len(fmt.parts(examples)) > 1:
        raise SoftpromptError("--loss classes: every task of the --mix mixture needs label words that are one token "
                              "each, the same after every input")
    sets = {tuple(map(tuple, c)) for c in row_candidates(fmt, examples)}
    if len(sets) > 1:
        raise SoftpromptError("--loss classes: the label words tokenise differently after different inputs "
                              "(e.g. some inputs end in a space); make the template end the same way for all rows")
    raise SoftpromptError("--loss classes needs label words that are one token each: "
                          + several_token_words(fmt, examples))


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    # Longest first, for little padding; a stable sort keeps rows of equal length in the caller's
    # order (an ensemble's K prompts for one input stay side by side, in one forward pass).
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _shared(prompts: list[torch.Tensor | None]) -> bool:
    return all(p is prompts[0] for p in prompts)


def next_logprobs(model, rows: list[Row], pad: int, path: str = "auto") -> torch.Tensor:
    """Log-probabilities [B, V] of the token after each row's input."""
    prompts = [p for p, _ in rows]
    if _shared(prompts):
        b = collate([Example(ids, len(ids)) for _, ids in rows], pad).to(model.device)
        return next_token_logprobs(model, prompts[0], b.input_ids, b.attention_mask, path=path)
    h, starts = mixed_hidden(model, prompts, [ids for _, ids in rows])
    last = torch.tensor([s + len(ids) - 1 for s, (_, ids) in zip(starts, rows)], device=h.device)
    return torch.log_softmax(logits(model, h[torch.arange(len(rows), device=h.device), last]), -1)


def continuation_states(model, rows: list[Row], conts: list[list[int]], pad: int,
                        path: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictor states [N, H] of every token of every continuation, those tokens [N] and their
    row [N], row by row and in order: token t of conts[b] is predicted after row b's prompt, its
    input and conts[b][:t]."""
    prompts = [p for p, _ in rows]
    if _shared(prompts):
        b = collate([Example(ids + c, len(ids)) for (_, ids), c in zip(rows, conts)], pad).to(model.device)
        return supervised(model, prompts[0], b, path)
    h, starts = mixed_hidden(model, prompts, [ids + c for (_, ids), c in zip(rows, conts)])
    # Token t of a continuation is predicted by the state just before it.
    bi = [b for b, c in enumerate(conts) for _ in c]
    pos = [starts[b] + len(rows[b][1]) - 1 + t for b, c in enumerate(conts) for t in range(len(c))]
    tgt = torch.tensor([t for c in conts for t in c], dtype=torch.long, device=h.device)
    return h[bi, pos], tgt, torch.tensor(bi, dtype=torch.long, device=h.device)


def continuation_logprobs(model, rows: list[Row], conts: list[list[int]], pad: int, path: str = "auto") -> torch.Tensor:
    """Summed log-probability [B] of tokens conts[b] right after row b's input."""
    prompts = [p for p, _ in rows]
    if _shared(prompts):
        b = collate([Example(ids + c, len(ids)) for (_, ids), c in zip(rows, conts)], pad).to(model.device)
        return row_logprobs(model, prompts[0], b, path)[0]
    states, tgt, bi = continuation_states(model, rows, conts, pad, path)
    lp = torch.log_softmax(logits(model, states), -1).gather(1, tgt[:, None])[:, 0]
    return torch.zeros(len(rows), dtype=lp.dtype, device=lp.device).index_add_(0, bi, lp)


def rows_continuations(model, prefixes: list[PrefixState | None], rows: list[list[int]],
                       conts: list[list[list[int]]], pad: int) -> list[torch.Tensor]:
    """Per row b, the summed log-probability [C_b] of each continuation conts[b][c] right after the
    row's input ids rows[b] (non-empty), the row after its prompt's keys and values prefixes[b]
    (PromptKV.get's; None: no prompt). The rows run once, as one left-padded batch (prefill.py); then every
    (row, continuation) pair runs together over a copy of its row's cache, right-padded."""
    pre = prefill(model, prefixes, rows, pad)
    dev = pre.mask.device
    index = torch.tensor([b for b, cs in enumerate(conts) for _ in cs], device=dev)
    flat = [c for cs in conts for c in cs]
    N, L = len(flat), max(len(c) for c in flat)
    y = torch.full((N, L), pad, dtype=torch.long, device=dev)
    valid = torch.zeros(N, L, dtype=torch.bool, device=dev)
    for n, toks in enumerate(flat):
        y[n, :len(toks)] = torch.tensor(toks, device=dev)
        valid[n, :len(toks)] = True
    states = pre.last[:, -1:].index_select(0, index)  # [N, 1, H]: predicts each continuation's first token
    if L > 1:  # token t of a continuation is predicted by the state of its token t-1
        states = torch.cat([states, extend(model, repeat_rows(pre, index), y[:, :-1], valid[:, :-1]).last], 1)
    lp = torch.log_softmax(logits(model, states[valid]), -1).gather(1, y[valid][:, None])[:, 0]
    sums = torch.zeros(N, dtype=lp.dtype, device=dev).index_add_(
        0, torch.arange(N, device=dev)[:, None].expand(N, L)[valid], lp)
    return list(sums.split([len(cs) for cs in conts]))


@torch.no_grad()
def token_logprobs(model, rows: list[Row], conts: list[list[int]], pad: int, top: int = 0,
                   path: str = "auto") -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """Per row b: the log-probability of each token of conts[b] where it stands (after row b's
    input and the continuation before it), and the `top` most probable tokens there as (id,
    log-probability), most probable first. Vocabulary logits are formed a chunk of positions at
    a time, so that a long continuation never holds [N, V] of them."""
    states, tgt, bi = continuation_states(model, rows, conts, pad, path)
    n = max(1, CHUNK_ELEMENTS // max(1, model.get_output_embeddings().weight.shape[0]))
    lps, top_v, top_i = [], [], []
    for s in range(0, states.shape[0], n):
        lp = torch.log_softmax(logits(model, states[s:s + n]), -1)
        lps.append(lp.gather(1, tgt[s:s + n, None])[:, 0].float().cpu())
        if top:
            v, i = lp.topk(min(top, lp.shape[1]), -1)
            top_v.append(v.float().cpu())
            top_i.append(i.cpu())
    lp_all = torch.cat(lps).tolist() if lps else []
    tv = torch.cat(top_v).tolist() if top_v else [[] for _ in lp_all]
    ti = torch.cat(top_i).tolist() if top_i else [[] for _ in lp_all]
    out: list[tuple[list[float], list[list[tuple[int, float]]]]] = [([], []) for _ in rows]
    for k, b in enumerate(bi.tolist()):  # row by row, in order
        out[b][0].append(lp_all[k])
        out[b][1].append(list(zip(ti[k], tv[k])))
    return out


@torch.no_grad()
def label_scores(model, rows: list[Row], cands: list[list[list[int]]], pad: int, batch_size: int = 16,
                 path: str = "auto", progress: bool = False) -> torch.Tensor:
    """Log-probability [N, C] of each row's candidates (C: the most any row has; -inf pads rows
    with fewer). cands[i][k] holds candidate k's token ids after row i's input."""
    N, C = len(rows), max(len(c) for c in cands)
    scores = torch.full((N, C), -torch.inf)
    single = [i for i in range(N) if all(len(w) == 1 for w in cands[i])]
    lengths = [len(ids) for _, ids in rows]
    for idx in tqdm(_batches([lengths[i] for i in single], batch_size), desc="classify",
                    disable=not progress or not single or not live_output(), leave=False):
        idx = [single[j] for j in idx]
        lp = next_logprobs(model, [rows[i] for i in idx], pad, path).float().cpu()
        for j, i in enumerate(idx):
            scores[i, :len(cands[i])] = lp[j, [w[0] for w in cands[i]]]
    multi = sorted(set(range(N)) - set(single))
    for i, v in multi_token_scores(model, rows, cands, multi, pad, batch_size, path, progress).items():
        scores[i, :len(v)] = v
    return scores


def multi_token_scores(model, rows: list[Row], cands: list[list[list[int]]], which: list[int], pad: int,
                       batch_size: int, path: str, progress: bool) -> dict[int, torch.Tensor]:
    """{row i: its candidates' log-probabilities [C_i]} for the rows `which`: each row runs once and
    its candidates over its cache (rows_continuations), a batch of rows at a time."""
    kv = PromptKV(model)  # each prompt's keys and values, computed once
    out = {}
    for i in [i for i in which if not rows[i][1]]:  # no input ids: the candidates follow the prompt as text
        out[i] = continuation_logprobs(model, [rows[i]] * len(cands[i]), cands[i], pad, path).float().cpu()
    which = [i for i in which if rows[i][1]]
    one = needs_contiguous_rows(model)  # such a family's rows are prefilled one at a time
    for idx in tqdm(_batches([len(rows[i][1]) for i in which], 1 if one else batch_size), desc="classify",
                    disable=not progress or not which or not live_output(), leave=False):
        idx = [which[j] for j in idx]
        sums = rows_continuations(model, [kv.get(rows[i][0]) for i in idx], [rows[i][1] for i in idx],
                                  [cands[i] for i in idx], pad)
        out.update({i: s.float().cpu() for i, s in zip(idx, sums)})
    return out

