"""Decoding over static KV slots, its step replayed as a CUDA graph.

decode.DecodeBatch grows its cache by one column per step and re-stacks it when rows join, so no
two steps have the same shapes; on a GPU each step then pays Python and kernel-launch time for
every layer (a small model's step is ~95% launch time). Here every shape is fixed:
- S slots (a bucket of the rows in flight) of L columns (a bucket of the longest row's prompt,
  text and budget), per layer keys/values [S, heads, L, d];
- a row owns a slot: its prompt KV and text sit in columns 0..n-1, each new token is written at
  the slot's own column `col` (a scatter), and a [S, L] mask says which columns it sees;
- free slots see column 0 only and advance nothing; their outputs are never read.
One step is a fixed sequence of kernels, so on CUDA it is captured once per (S, L) and replayed.
Rows join by prefilling them with DecodeBatch's prefill and copying their real columns into free
slots (the batch grows into a larger bucket when needed); greedy outputs equal DecodeBatch's.

Needs a model whose attention takes a 4D mask through the attention interface and whose positions
come from position_ids (families.can_pack: Llama, Qwen2, ...); others use DecodeBatch.
"""
from __future__ import annotations

import torch

from ..base.families import can_pack, decoder, kv_geometry, takes_position_ids
from ..forward.cuda_graphs import bucket, capturable_attention
from ..forward.hidden import logits
from .decode import DecodeBatch, Row, Group


def supported(model) -> bool:
    return can_pack(model) and takes_position_ids(model)


class SlotCache:
    """What the model's attention layers see as their cache: update() writes the step's keys and
    values [S, heads, 1, d] at each slot's column and returns the whole [S, heads, L, d]."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], col: torch.Tensor):
        self.layers, self.col = layers, col

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        K, V = self.layers[layer_idx]
        idx = self.col[:, None, None, None].expand(-1, K.shape[1], 1, K.shape[3])
        K.scatter_(2, idx, key_states)
        V.scatter_(2, idx, value_states)
        return K, V


class StaticDecodeBatch(DecodeBatch):
    """DecodeBatch's interface (add, step, stop, pop) over static slots; `graphs` replays the step
    as a CUDA graph on CUDA devices."""

    def __init__(self, model, tok, kv=None, graphs: bool | None = None):
        super().__init__(model, tok, kv)
        self.graphs = self.dev.type == "cuda" if graphs is None else graphs
        self.S = self.L = 0
        self.slots: list[Row | None] = []
        self.ncols: list[int] = []  # per slot: the columns its row needs (prefill + budget)
        self.captured: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.graph_error: str | None = None
        self.replays = 0

    # ------------------------------------------------------------ state

    def _allocate(self, S: int, L: int) -> None:
        """(Re)allocate the slot buffers for S slots of L columns, keeping every slot's state."""
        layers, heads, d = kv_geometry(self.model)
        dt = self.model.get_input_embeddings().weight.dtype
        old = (self.S, self.L, getattr(self, "kv_layers", None), getattr(self, "mask", None))
        self.kv_layers = [(torch.zeros(S, heads, L, d, dtype=dt, device=self.dev),
                           torch.zeros(S, heads, L, d, dtype=dt, device=self.dev)) for _ in range(layers)]
        self.mask = torch.zeros(S, L, dtype=torch.bool, device=self.dev)
        self.mask[:, 0] = True  # free slots see one column, so no attention row is empty
        new_state = {k: torch.zeros(S, dtype=torch.long, device=self.dev) for k in ("col", "pos", "tok", "alive")}
        z = torch.zeros(S, self.model.config.vocab_size, dtype=torch.float32, device=self.dev)
        if old[2] is not None:
            s0, l0 = old[0], old[1]
            for (K, V), (k, v) in zip(self.kv_layers, old[2]):
                K[:s0, :, :l0], V[:s0, :, :l0] = k, v
            self.mask[:s0, :l0] = old[3]
            for k in new_state:
                new_state[k][:s0] = getattr(self, k)
        self.col, self.pos, self.tok, self.alive = (new_state[k] for k in ("col", "pos", "tok", "alive"))
        self.z_out = z
        self.slots += [None] * (S - self.S)
        self.ncols += [0] * (S - self.S)
        self.S, self.L = S, L
        self.cache = SlotCache(self.kv_layers, self.col)
        self.captured.clear()  # graphs read the old buffers

    def _grow_for(self, joining: list[Group]) -> None:
        """Make room (slots and columns) for the joining rows, in the next buckets up if needed."""
        lengths = [n for g in joining for n in g.mask.sum(1).tolist()]
        need = [n + r.max_new for n, r in zip(lengths, (r for g in joining for r in g.rows))]
        rows = sum(r is not None for r in self.slots) + len(lengths)
        S, L = bucket(rows, floor=8), bucket(max(need + self.ncols), floor=64)
        if S > self.S or L > self.L:
            self._allocate(max(S, self.S), max(L, self.L))

    def _place(self, g: Group) -> list[int]:
        """Copy a prefilled group's real columns into free slots; returns their slot indices."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        out = []
        for b, r in enumerate(g.rows):
            s = free.pop(0)
            real = g.mask[b].nonzero()[:, 0]
            n = real.numel()
            for (K, V), (k, v) in zip(self.kv_layers, g.layers):
                K[s, :, :n], V[s, :, :n] = k[b, :, real], v[b, :, real]
            self.mask[s] = False
            self.mask[s, :n] = True
            self.col[s], self.pos[s], self.alive[s] = n, g.pos[b] + 1, 1
            self.slots[s], self.ncols[s] = r, n + r.max_new
            out.append(s)
        return out

    # ------------------------------------------------------------ the step

    def _body(self, k: int | None = None) -> None:
        """One decode step of the first k slots (all of them when captured); fixed shapes and no
        host syncs, so it can be captured. Views of the buffers: every write lands in them."""
        k = k or self.S
        mask, col, pos, tok, alive = (t[:k] for t in (self.mask, self.col, self.pos, self.tok, self.alive))
        cache = self.cache if k == self.S else SlotCache([(K[:k], V[:k]) for K, V in self.kv_layers], col)
        mask.scatter_(1, col[:, None], alive[:, None].bool() | mask.gather(1, col[:, None]))
        x = self.model.get_input_embeddings()(tok[:, None])
        with capturable_attention():
            h = decoder(self.model)(inputs_embeds=x, position_ids=pos[:, None], attention_mask=mask[:, None, None],
                                    cache=cache, use_cache=True).last_hidden_state[:, -1]
        self.z_out[:k].copy_(logits(self.model, h))
        col += alive
        pos += alive

    def _capture(self) -> torch.cuda.CUDAGraph:
        alive = self.alive.clone()
        self.alive.zero_()  # warm-up and capture then change nothing a live slot can see
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self._body()
        self.alive.copy_(alive)
        return g

    def _run_body(self) -> None:
        if self.graphs and self.graph_error is None:
            try:
                g = self.captured.get((self.S, self.L))
                if g is None:
                    g = self.captured[(self.S, self.L)] = self._capture()
                g.replay()
                self.replays += 1
                return
            except RuntimeError as e:  # an op that cannot be captured: decode eagerly from now on
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                self.captured.clear()
        # Eagerly, only up to the last occupied slot: rows take the lowest free slots.
        self._body(max(s for s, r in enumerate(self.slots) if r is not None) + 1)

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        for s, r in enumerate(self.slots):  # rows stopped or finished since the last step leave
            if r is not None and r.done:
                self.results[r.id] = r
                self.slots[s], self.ncols[s] = None, 0
                self.alive[s] = 0
        joining = [g for g in (self.retire(g) for g in self.joining) if g is not None]
        self.joining = []
        active = [s for s, r in enumerate(self.slots) if r is not None]
        if not active and not joining:
            return {}
        zs, slots = [], []
        if active:
            self._run_body()
            zs.append(self.z_out.index_select(0, torch.tensor(active, device=self.dev)))
            slots += active
        if joining:
            self._grow_for(joining)
        for g in joining:
            zs.append(g.z)
            slots += self._place(g)
        picks, out = self.pick_and_record(torch.cat(zs), [self.slots[s] for s in slots])
        self.tok.index_copy_(0, torch.tensor(slots, device=self.dev), picks)
        return out

    @property
    def finished(self) -> bool:
        return not self.joining and all(r is None for r in self.slots)

    @property
    def size(self) -> int:
        return sum(r is not None for r in self.slots) + sum(len(g.rows) for g in self.joining)

    def stop(self, row_id: int) -> None:
        for r in [r for r in self.slots if r is not None] + [r for g in self.joining for r in g.rows]:
            if r.id == row_id:
                r.done = True


def decode_batch_for(model, tok, kv=None) -> DecodeBatch:
    """The engine for this model and device: static slots replayed as CUDA graphs on a GPU where the
    family allows it; the growing cache otherwise (on a CPU it computes only live rows and columns)."""
    if model.device.type == "cuda" and supported(model):
        return StaticDecodeBatch(model, tok, kv)
    return DecodeBatch(model, tok, kv)
