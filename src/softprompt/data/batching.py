"""Batching: tokenised examples, right-padded batches, and the order batches are drawn in.

Training draws length-grouped batches in a shuffled order (as HF's group_by_length), so padding
stays small while the order stays random; evaluation takes rows longest first.

`batch_order` is kept rather than transformers' get_length_grouped_indices: HF's runs the batches
of each mega-batch from longest to shortest (the loss then follows a length sawtooth along the
steps) and swaps the longest row to the front, where ours also shuffles the batches; and our
seeded order is what the recorded drift-test losses and exact resume rest on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Example:
    ids: list[int]          # prompt tokens followed by target tokens
    loss_start: int         # ids[loss_start:] are supervised (0 = every token: language modelling)
    label: int = -1         # class index for classification data
    text: str = ""          # the input part, for display and generation
    spans: tuple[tuple[int, int], ...] = ()  # supervised [start, end) ranges instead of ids[loss_start:] (chat)
    task: int = 0           # its task in a mixture (mixture.py), which holds its label words
    messages: tuple[dict[str, str], ...] = ()  # a chat row's checked turns (compare puts context before them)


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor         # [B, T] token to predict at each position, -100 where unsupervised
    labels: torch.Tensor          # [B] class index or -1
    loss_start: torch.Tensor      # [B] first supervised position
    tasks: torch.Tensor | None = None  # [B] each row's task in a mixture (its label-word set)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if t is not None else None
                       for t in (self.input_ids, self.attention_mask, self.targets, self.labels, self.loss_start,
                                 self.tasks)))

    @property
    def num_targets(self) -> int:
        return int((self.targets != -100).sum())


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def collate(examples: list[Example], pad_id: int) -> Batch:
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        for a, b in e.spans or ((e.loss_start, n),):
            targets[i, a:b] = ids[i, a:b]
    labels = torch.tensor([e.label for e in examples])
    starts = torch.tensor([e.loss_start for e in examples])
    return Batch(ids, mask, targets, labels, starts, torch.tensor([e.task for e in examples]))


def batch_order(lengths: list[int], batch_size: int, seed: int, group: bool = True) -> list[list[int]]:
    """Index batches for one epoch: shuffled, and length-grouped inside mega-batches of 50 batches
    so that padding stays small while the order stays random (as HF's group_by_length)."""
    idx = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(idx)
    if group:
        mega = 50 * batch_size
        idx = [i for s in range(0, len(idx), mega)
               for i in sorted(idx[s:s + mega], key=lambda i: -lengths[i])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches


def eval_batches(examples: list[Example], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
