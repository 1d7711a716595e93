"""Training speed, softprompt against PEFT, side by side in one process.

Both train a 20-token soft prompt (`--method prompt`, the default) or a 20-position prefix
(`--method prefix`, below) on the same frozen model, the same batches in the same order, from the
same initial prompt, with the same optimiser (AdamW, constant lr, gradient clipping):
- PEFT: `get_peft_model(model, PromptTuningConfig(...))` and `model(input_ids, attention_mask,
  labels).loss`, the forward that PEFT + Trainer run (prompt prepended to every row, logits and
  log-softmax at every position);
- softprompt: what `softprompt train` runs on the device: on a CPU `forward.batch_loss` (the prompt
  and the rows as one packed sequence, logits only at supervised positions, chunked cross-entropy);
  on a GPU the same packed step replayed as a CUDA graph (cuda_graphs.GraphedStep; --no-graphs
  measures the eager packed path there).
- PEFT at its best (`peft_best`), the baseline the ratios are judged against: the same PEFT forward
  on the very batches softprompt trains on (length-grouped, as Trainer's group_by_length), with
  logits only at the positions the loss reads (transformers' `logits_to_keep` given those indices)
  and the same attention backend as softprompt (recorded); `--peft-compile` adds the same under
  `torch.compile` (`peft_compiled`) where it runs.
With `--method prefix` (issue 23) the same paths train per-layer keys and values instead: PEFT's
`PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)` (its prefix handed to the model
as a cache of P positions per row), peft_best and peft_compiled the same with logits only where
read, and softprompt the step `softprompt train --method prefix` runs (training.prefix_method's
prefix through forward.batch_loss: the kv path, the prefix's keys and values broadcast to the rows
as a read-only cache, logits only at supervised positions). Both start from the same keys and
values: softprompt's text init (the model's own cache of "Continue the text."), given to PEFT in
its [P, layers * 2 * kv_heads * head_dim] layout (prompts.prefix.to_flat, what the PEFT export uses).
Every path first runs one untimed step per batch shape it will meet, and per shape once more
where the loss reads a single position (`warm_key`; its warm-up, timed and reported apart and
included in the whole-run figure), then the timed steps.
Steps alternate (PEFT, softprompt, PEFT, ...) so that both see the same machine state. Each path
batches the same examples its own way (PEFT as its recipe does: random order, padded to the
batch's longest row; softprompt: length-grouped). The script prints medians, tokens/s, achieved
GFLOP/s against the measured matmul peak, peak memory (each path in a fresh process on CPU) and
the softprompt/PEFT ratios. A second phase runs both on identical batches from the same prompt:
the loss trajectories must agree, and its time ratio isolates the compute path from batching.
A third check computes one batch's loss from the same start in float32 with PEFT's own forward
(`labels=`) and softprompt's: the two must agree within 1e-5 (`fp32_parity`).

    python bench/train_speed.py --model smollm2-135m-instruct --task acts sst2 --steps 20
    python bench/train_speed.py --model bloom-560m-random --task acts sst2 --steps 6 --check-steps 3
    python bench/train_speed.py --task lm512 --batch-size 8   # rows of exactly 512 tokens of LM text
    python bench/train_speed.py --method prefix --task sst2 acts --steps 20   # issue 23's prefix targets
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ACTS, PeakMemory, RESULTS, Results, SST2, count_flops, device_and_dtype, entry,  # noqa: E402
                    fmt_row, load_bench_model, matmul_peak_gflops, median, sync)

from softprompt.base.cpu_linear import KERNELS, resolve_kernel, use_linear_kernel  # noqa: E402
from softprompt.base.families import kv_geometry  # noqa: E402
from softprompt.base.gqa_attention import use_gqa_attention  # noqa: E402
from softprompt.base.swiglu import fuse_swiglu  # noqa: E402
from softprompt.core.config import DataConfig  # noqa: E402
from softprompt.data.batching import Example, batch_order, collate, pad_id  # noqa: E402
from softprompt.data.formatting import load_splits  # noqa: E402
from softprompt.forward.cuda_graphs import DenseLayout, GraphedStep  # noqa: E402
from softprompt.forward.hidden import batch_loss, needed_inputs  # noqa: E402
from softprompt.forward.packing import packable  # noqa: E402
from softprompt.prompts.prefix import PrefixPrompt, from_flat, text_key_values, to_flat  # noqa: E402
from softprompt.training.prefix_method import PrefixTuning  # noqa: E402

TASKS = {"acts": ACTS, "sst2": SST2}
LM_LENGTHS = (128, 512, 2048)  # --task lmN: language-modelling rows of exactly N tokens
TASK_CHOICES = sorted(TASKS) + [f"lm{n}" for n in LM_LENGTHS]
PEFT_PATHS = ("peft", "peft_best", "peft_compiled")
METHODS = ("prompt", "prefix")
PREFIX_INIT_TEXT = "Continue the text."  # prefix.init_prefix's default text
PARITY_TOL = 1e-5  # float32 loss difference allowed between PEFT's and softprompt's forward (issue 23)


def task_examples(name: str, tok, limit: int, seed: int):
    if name.startswith("lm"):
        return lm_examples(tok, int(name[2:]))
    dcfg = DataConfig(**TASKS[name], eval_fraction=0.0, limit=limit)
    return load_splits(dcfg, tok, seed)[1]


def lm_examples(tok, n: int) -> list[Example]:
    """awesome-chatgpt-prompts' texts, end to end with EOS between them, cut into rows of exactly n
    tokens, every token supervised: long-context language modelling at a set length."""
    dcfg = DataConfig(**{**ACTS, "max_length": 4096}, eval_fraction=0.0)
    stream = [t for e in load_splits(dcfg, tok, 0)[1] for t in [*e.ids, tok.eos_token_id]]
    rows = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    if not rows:
        raise SystemExit(f"--task lm{n}: the data has only {len(stream)} tokens")
    return [Example(ids=r, loss_start=0) for r in rows]


def batches_for(examples, tok, batch_size: int, n: int, seed: int, trainer_style: bool = False):
    """n batches over the same n * batch_size examples (a seeded sample of `examples`): length-grouped
    as softprompt trains, or in random order padded to each batch's longest row, as PEFT's recipe
    (Trainer's random sampler and DataCollatorForLanguageModeling) does."""
    g = torch.Generator().manual_seed(seed)
    # Epochs of seeded permutations, as a training run draws them, when n batches need more rows than
    # the data has (awesome-chatgpt-prompts has ~200).
    need = n * batch_size
    pick = torch.cat([torch.randperm(len(examples), generator=g) for _ in range(-(-need // len(examples)))])
    pick = pick[:need].tolist()
    examples = [examples[i] for i in pick]
    if trainer_style:
        order = [list(range(i, i + batch_size)) for i in range(0, len(examples), batch_size)]
    else:
        order = batch_order([len(e.ids) for e in examples], batch_size, seed, group=True)
    pad = pad_id(tok)
    return [collate([examples[i] for i in idx], pad) for idx in order]


class Path_:
    """One way of training the prompt: a step function over a Batch, and its own optimiser.

    `method` "prompt": `init` is the soft prompt [P, H]; "prefix": the prefix in PEFT's layout
    [P, layers * 2 * kv_heads * head_dim] (prompts.prefix.to_flat), so that both sides start equal."""

    def __init__(self, name: str, model, init: torch.Tensor, lr: float, device: torch.device,
                 graphs: bool = False, pad: int = 0, method: str = "prompt", kernel: str = "default"):
        self.name, self.model, self.device, self.method = name, model, device, method
        # The base's linear kernel while this path trains (base/cpu_linear.py); the paths share the base
        self.kernel = kernel
        fuse_swiglu(model, name == "softprompt")  # probes each MLP once, here, outside timed and counted steps
        # Grouped-query heads kept once for backward (base/gqa_attention.py), as train runs: softprompt only
        self.gqa_modules = use_gqa_attention(model, name == "softprompt")
        self.P = init.shape[0]
        self.graphed = None
        # The prompt's positions in PEFT's logits: a soft prompt's are in the sequence, a prefix's in the cache
        self.logit_offset = self.P if method == "prompt" else 0
        # softprompt keeps the prompt (and its optimiser state) in float32 over a half-precision base
        dtype = init.dtype if init.dtype == torch.float64 else torch.float32
        if name.startswith("peft"):
            from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

            config = PromptTuningConfig if method == "prompt" else PrefixTuningConfig
            self.peft = get_peft_model(model, config(task_type="CAUSAL_LM", num_virtual_tokens=self.P))
            emb = self.peft.prompt_encoder["default"].embedding.weight
            # The same values, in the dtype PEFT gives its prompt (float32), or float64 for the check
            emb.data = init.clone() if init.dtype == torch.float64 else init.to(emb.dtype)
            self.params = [emb]
            # torch.compile of PEFT's whole forward; dynamic, since batches differ in length
            self.forward = torch.compile(self.peft, dynamic=True) if name == "peft_compiled" else self.peft
        elif method == "prefix":
            # What `train --method prefix` trains: its PrefixTuning method's prefix, fed to batch_loss
            kv = from_flat(init.to(dtype), *kv_geometry(model))
            self.prefix = PrefixTuning(model, None, PrefixPrompt(kv).to(device=device, dtype=dtype))
            self.prompt = self.prefix.embeds()
            self.params = self.prefix.parameters()
        else:
            self.prompt = torch.nn.Parameter(init.to(dtype))
            self.params = [self.prompt]
            if graphs and device.type == "cuda":
                self.graphed = GraphedStep(model, self.prompt, pad)
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self.captured: list[bool] = []  # per recorded step: did it capture a CUDA graph (a one-off cost)?

    def loss(self, batch):
        use_linear_kernel(self.model, self.kernel)
        fuse_swiglu(self.model, self.name == "softprompt")  # as train runs it; PEFT runs transformers' MLP
        use_gqa_attention(self.model, self.name == "softprompt")  # as train runs it; PEFT, transformers' attention
        kept = self.name in ("peft_best", "peft_compiled")
        if kept:
            return self.kept_logits_loss(batch)
        if self.name.startswith("peft") and self.params[0].dtype == torch.float64:
            # transformers' loss casts logits to float32; for the float64 parity check take PEFT's
            # logits and apply the same shifted cross-entropy in float64.
            logits = self.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            P = logits.shape[1] - batch.input_ids.shape[1]  # 0 for a prefix (its positions are a cache)
            labels = torch.cat([batch.targets.new_full((batch.targets.shape[0], P), -100), batch.targets], 1)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if self.name.startswith("peft"):
            return self.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             labels=batch.targets).loss
        total, n = batch_loss(self.model, self.prompt, batch)
        return total / n

    def kept_logits_loss(self, batch):
        """PEFT's loss with logits only where it reads them: transformers' `logits_to_keep` given
        the indices (over the prompt-plus-text axis; the text's alone for a prefix) whose next token is
        supervised in any row. The same value as `labels=`'s loss: mean cross-entropy over the
        supervised tokens, in float32."""
        P = self.logit_offset
        labels = torch.cat([batch.targets.new_full((batch.targets.shape[0], P), -100), batch.targets], 1)
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # [k] positions predicting a label
        logits = self.forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              logits_to_keep=keep).logits  # [B, k, V]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.flatten(0, 1).to(dtype), labels[:, keep + 1].flatten(), ignore_index=-100)

    def step(self, batch_cpu, record: bool = True) -> float:
        batch = batch_cpu.to(self.device)
        sync(self.device)
        t = time.perf_counter()
        loss = None
        n_graphs = len(self.graphed.graphs) if self.graphed is not None else 0
        if self.graphed is not None:  # the layout is built from the host copy, as train does
            loss = self.graphed(batch_cpu.input_ids, batch_cpu.attention_mask, batch_cpu.targets,
                                1.0 / batch_cpu.num_targets)
        if loss is None:
            loss = self.loss(batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t)
            self.captured.append(self.graphed is not None and len(self.graphed.graphs) > n_graphs)
            self.losses.append(value)
            self.tokens.append(int(batch.attention_mask.sum()))
        return value

    def decoder_tokens(self, batch) -> int:
        """Positions the decoder runs per step, pads included: PEFT [B, P+T]; softprompt the prompt
        once plus the trimmed text, packed (no pads) or padded to its longest row. A prefix runs
        through no layer (it is their cache): PEFT [B, T], softprompt the trimmed text [B, T']."""
        P = self.P
        if self.name.startswith("peft"):
            return batch.input_ids.numel() + batch.input_ids.shape[0] * self.logit_offset
        if self.method == "prefix":
            return needed_inputs(batch.targets, batch.attention_mask).numel()
        if self.graphed is not None and not self.graphed.disabled:  # the bucket, fillers included
            return DenseLayout.build(P, batch.input_ids, batch.attention_mask, batch.targets, 0).shape[0]
        keep = needed_inputs(batch.targets, batch.attention_mask)
        return P + int(keep.sum() if packable(self.model, keep) else keep.numel())

    def flops(self, batch) -> int:
        """FLOPs of one step, counted on the eager forward: the compiled one does the same math, and
        FlopCounterMode's global module hooks would make it recompile (torch warns of them)."""
        batch = batch.to(self.device)
        compiled = self.name == "peft_compiled"
        if compiled:
            timed_forward, self.forward = self.forward, self.peft
        kernel, self.kernel = self.kernel, "default"  # FlopCounterMode counts aten's matmuls, not oneDNN's op

        def f():
            self.loss(batch).backward()
        try:
            n = count_flops(f)
        finally:
            self.kernel = kernel
            if compiled:
                self.forward = timed_forward
        self.opt.zero_grad(set_to_none=True)
        return n


def initial_prompt(model, P: int, seed: int) -> torch.Tensor:
    # Sampled vocabulary rows: a realistic scale for both paths (values do not change the speed).
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    return emb[torch.randint(0, min(emb.shape[0], 5000), (P,), generator=g).to(emb.device)].detach().float().clone()


def initial_prefix(model, tok, P: int) -> torch.Tensor:
    """softprompt's text init (the model's own keys and values of a text), in PEFT's flat layout
    [P, layers * 2 * kv_heads * head_dim]: the values both sides start from."""
    return to_flat(text_key_values(model, tok, PREFIX_INIT_TEXT, P)).contiguous()


def initial(method: str, model, tok, P: int, seed: int) -> torch.Tensor:
    return initial_prompt(model, P, seed) if method == "prompt" else initial_prefix(model, tok, P)


def memory_child(args) -> None:
    """Run in a fresh process: peak memory of a few training steps of one path."""
    dev, dtype = device_and_dtype(args.device, args.dtype)
    model, tok = load_bench_model(args.model, dev, dtype)
    batches = batches_for(task_examples(args.task[0], tok, args.limit, args.seed), tok, args.batch_size, 3,
                          args.seed, trainer_style=args.memory_child == "peft")
    init = initial(args.method, model, tok, args.virtual_tokens, args.seed).to(dtype)
    path = Path_(args.memory_child, model, init, args.lr, dev, args.graphs, pad_id(tok), args.method,
                 kernels(args, model, args.memory_child))
    with PeakMemory(dev) as pm:
        for b in batches:
            path.step(b, record=False)
    print("MEMORY " + json.dumps(pm.as_dict()))


def measure_memory(args, task: str, name: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", name, "--method", args.method, "--task", task,
           "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
           "--virtual-tokens", str(args.virtual_tokens), "--limit", str(args.limit), "--seed", str(args.seed),
           "--linear-kernel", args.linear_kernel, "--peft-kernel", args.peft_kernel]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("MEMORY ")]
    if out.returncode or not line:
        killed = " (killed: out of memory?)" if out.returncode == -9 else ""
        raise RuntimeError(f"memory child for {name} exited with {out.returncode}{killed}: {out.stderr[-1500:]}")
    return json.loads(line[0][7:])


def warm_key(batch, logit_offset: int = 0) -> tuple:
    """What a first step pays for: the shape [B, T], and whether the loss reads no, one or more
    positions, counted as `kept_logits_loss` counts them (a prompt's P columns come first; without
    them the first text column predicts nothing). torch.compile specialises sizes 0 and 1, so a
    compiled path meets a new graph there even at a warmed [B, T]."""
    supervised = (batch.targets != -100).any(0)  # [T]
    kept = int(supervised.sum() if logit_offset else supervised[1:].sum())
    return (*batch.input_ids.shape, min(kept, 2))


def warm_up(path, batches) -> dict:
    """One untimed step per `warm_key` the path will meet, the same rule for every path, so that no
    timed step pays a first-shape cost (kernel plans, compilation; on a GPU softprompt's CUDA graphs
    are captured per length bucket, and a bucket first met later counts as a capture step)."""
    shapes = {}
    for b in batches:
        shapes.setdefault(warm_key(b, getattr(path, "logit_offset", 0)), b)
    t = time.perf_counter()
    for b in shapes.values():
        path.step(b, record=False)
    return {"warmup_s": time.perf_counter() - t, "warmup_shapes": len(shapes)}


def warm_all(paths, sets) -> list[dict]:
    """`warm_up` for every path, softprompt's first: its first packed pass gives the model the
    attention name every path is then timed under (forward.packing.enable_packing; the same kernel
    outside packed passes), and a compiled PEFT warmed before that would recompile in its timed steps."""
    order = sorted(range(len(paths)), key=lambda i: paths[i].name != "softprompt")
    warm = {}
    for i in order:
        warm[i] = warm_up(paths[i], sets[i])
        print(f"  {paths[i].name}: warmed {warm[i]['warmup_shapes']} shapes in {warm[i]['warmup_s']:.1f} s", flush=True)
    return [warm[i] for i in range(len(paths))]


def alternate(paths, batches_per_path, record_from: int = 0) -> None:
    # Interleave the paths step by step, so that slow phases of the machine hit both alike.
    n = len(batches_per_path[0])
    every = max(1, n // 10)  # a timed CPU run is an hour or more: say how far it is
    for i in range(n):
        for p, bs in zip(paths, batches_per_path):
            p.step(bs[i], record=i >= record_from)
        if (i + 1) % every == 0 and i + 1 < n and paths[0].times:
            means = ", ".join(f"{p.name} {sum(p.times) / len(p.times):.3f} s" for p in paths)
            print(f"  step {i + 1}/{n}, mean step so far: {means}", flush=True)


def summarise(p, peak: float, batches, flop_samples: int) -> dict:
    med = median(p.times)
    out = {"median_step_s": med, "total_s": sum(p.times), "steps_per_s": 1 / med,
           "text_tokens_per_s": sum(p.tokens) / sum(p.times), "losses": p.losses}
    if flop_samples:
        # FLOPs of evenly spaced batches against those same batches' measured times: batches differ
        # in length, so one batch's FLOPs over the median step would mislead.
        pick = sorted({round(i * (len(batches) - 1) / max(1, flop_samples - 1)) for i in range(flop_samples)})
        try:
            flops = sum(p.flops(batches[i]) for i in pick) / 1e9
        except (AssertionError, RuntimeError) as e:  # torch's SDPA FLOP formula rejects grouped-query shapes
            out["flops_error"] = str(e)[:200]
            return out
        secs = sum(p.times[i] for i in pick)
        out.update(gflop_per_step=flops / len(pick), gflop_per_s=flops / secs,
                   fraction_of_matmul_peak=flops / secs / peak)
    return out


def fp32_parity(args, model, init: torch.Tensor, batch, dev) -> dict:
    """One batch's loss from the same start, in float32, through PEFT's own forward (`labels=`) and
    softprompt's step, with each path's linear kernel (a forward that records a graph: the kernel's
    condition): the two must agree within PARITY_TOL (no optimiser step is taken)."""
    m32 = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    paths = [Path_(name, m32, init.float(), args.lr, dev, method=args.method, kernel=kernels(args, m32, name))
             for name in ("peft", "softprompt")]
    peft_loss, ours = (float(p.loss(batch.to(dev))) for p in paths)
    diff = abs(peft_loss - ours)
    return {"peft_loss": peft_loss, "softprompt_loss": ours, "abs_diff": diff, "tolerance": PARITY_TOL,
            "equal": diff <= PARITY_TOL}


def kernels(args, model, name: str) -> str:
    """A path's linear kernel: softprompt's as `train` resolves --linear-kernel; PEFT's --peft-kernel."""
    return resolve_kernel(args.linear_kernel, model)[0] if name == "softprompt" else args.peft_kernel


def run_task(args, task: str, model, tok, dev, dtype, peak: float) -> dict:
    init = initial(args.method, model, tok, args.virtual_tokens, args.seed).to(dtype)
    res = {"task": task, "method": args.method, "steps": args.steps, "batch_size": args.batch_size,
           "virtual_tokens": args.virtual_tokens,
           "linear_kernel": {"softprompt": kernels(args, model, "softprompt"), "peft": args.peft_kernel,
                             "softprompt_reason": resolve_kernel(args.linear_kernel, model)[1]}}
    # 1. Throughput: each as its recipe batches the same examples (PEFT: random order padded to the
    #    batch's longest row; softprompt: length-grouped).
    examples = task_examples(task, tok, args.limit, args.seed)  # tokenised once for every phase
    trainer = batches_for(examples, tok, args.batch_size, args.steps, args.seed, trainer_style=True)
    grouped = batches_for(examples, tok, args.batch_size, args.steps, args.seed)
    names = ["peft", "peft_best", *(["peft_compiled"] if args.peft_compile else []), "softprompt"]
    own = {"peft": trainer}  # every other path trains on the length-grouped batches
    paths = [Path_(name, model, init, args.lr, dev, args.graphs, pad_id(tok), args.method, kernels(args, model, name))
             for name in names]
    sets = [own.get(p.name, grouped) for p in paths]
    warm = warm_all(paths, sets)
    alternate(paths, sets)
    for p, bs, w in zip(paths, sets, warm):
        res[p.name] = summarise(p, peak, bs, args.flop_samples)
        res[p.name].update(w, whole_run_s=w["warmup_s"] + res[p.name]["total_s"],
                           attn_implementation=model.config._attn_implementation, gqa_attention_modules=p.gqa_modules)
        if getattr(p, "graphed", None) is not None:
            g = p.graphed
            steady = [t for t, c in zip(p.times, p.captured) if not c]
            res[p.name]["cuda_graphs"] = {"buckets": len(g.graphs), "replays": g.replays,
                                          "capture_s": g.capture_seconds, "disabled": g.disabled,
                                          "capture_steps": sum(p.captured),
                                          "steady_mean_step_s": sum(steady) / len(steady) if steady else None}
        res[p.name]["decoder_tokens_per_step"] = sum(p.decoder_tokens(b) for b in bs) / len(bs)
    res["speedup_plain"] = res["peft"]["total_s"] / res["softprompt"]["total_s"]
    # The baseline the claims use: the fastest PEFT variant over the whole run, warm-up included
    best = min((n for n in names if n != "softprompt"), key=lambda n: res[n]["whole_run_s"])
    res["best_peft"] = best
    res["speedup"] = res[best]["total_s"] / res["softprompt"]["total_s"]
    res["speedup_whole_run"] = res[best]["whole_run_s"] / res["softprompt"]["whole_run_s"]
    steady = res["softprompt"].get("cuda_graphs", {}).get("steady_mean_step_s")
    if steady:  # a run captures each bucket once: over hundreds of steps that one-off cost vanishes
        res["speedup_steady"] = res[best]["total_s"] / args.steps / steady
    # 2. Same numbers: identical batches in the same order from the same prompt; the loss
    #    trajectories must agree, and the time ratio isolates the compute path from the batching.
    if args.check_steps:
        check = batches_for(examples, tok, args.batch_size, args.check_steps, args.seed + 1)
        # In float64 by default, so that rounding in the two paths' different summation orders is
        # ~1e-16, not float32's 1e-7, which AdamW at a high lr amplifies within a few steps.
        # (transformers' Llama RMSNorm still rounds to float32 inside; the control below measures
        # how far such a 1e-7 difference alone carries.)
        cdtype = getattr(torch, args.check_dtype)
        cmodel = model if cdtype == dtype else copy.deepcopy(model).to(cdtype)
        paths = [Path_(name, cmodel, init.to(cdtype), args.lr, dev, args.graphs, pad_id(tok), args.method)
                 for name in ("peft", "softprompt")]
        # Control: PEFT against itself from a prompt perturbed by 1e-7 (float32 rounding's size).
        # How far that drifts is how sensitive the optimisation itself is, whatever the path.
        g = torch.Generator().manual_seed(1)
        nudged = init * (1 + 1e-7 * torch.randn(init.shape, generator=g).to(init.device, init.dtype))
        paths.append(Path_("peft_perturbed", cmodel, nudged.to(cdtype), args.lr, dev, method=args.method))
        # The fair baseline must compute PEFT's own loss: logits kept only where read change no value
        paths.append(Path_("peft_best", cmodel, init.to(cdtype), args.lr, dev, method=args.method))
        alternate(paths, [check] * 4)
        rel = [abs(a - b) / abs(a) for a, b in zip(paths[0].losses, paths[1].losses)]
        ctrl = [abs(a - b) / abs(a) for a, b in zip(paths[0].losses, paths[2].losses)]
        best = [abs(a - b) / abs(a) for a, b in zip(paths[0].losses, paths[3].losses)]
        del cmodel, paths[0].peft, paths[2].peft, paths[3].peft
        res["same_batches"] = {"steps": args.check_steps, "dtype": args.check_dtype, "loss_rel_diff_step1": rel[0],
                               "peft_best_rel_diff_max": max(best),
                               "loss_rel_diff_max": max(rel), "control_rel_diff_max": max(ctrl),
                               "control_rel_diffs": ctrl,
                               "compute_speedup": sum(paths[0].times) / sum(paths[1].times),
                               "peft_losses": paths[0].losses, "softprompt_losses": paths[1].losses}
        res["fp32_parity"] = fp32_parity(args, model, init, check[0], dev)
    if args.memory:
        memory_phase(args, task, res, model, tok, init, own, grouped, dev)
    return res


def memory_phase(args, task: str, res: dict, model, tok, init, own: dict, grouped: list, dev) -> None:
    """Each path's peak memory over a few steps, and softprompt's ratios to PEFT's, into `res`; where
    a memory child fails (killed for memory), `memory_error` says so and the timings stay as they are."""
    peaks = {}
    for name in ("peft", "peft_best", "softprompt"):
        if dev.type == "cpu":  # a fresh process each: see common.PeakMemory
            try:
                peaks[name] = measure_memory(args, task, name)
            except RuntimeError as e:
                res["memory_error"] = str(e)[:2000]
                print(f"memory not measured: {str(e)[:300]}", flush=True)
                return
        else:
            p = Path_(name, model, init, args.lr, dev, args.graphs, pad_id(tok), args.method,
                      kernels(args, model, name))
            bs = own.get(name, grouped)
            with PeakMemory(dev) as pm:
                for b in bs[:3]:
                    p.step(b, record=False)
            peaks[name] = pm.as_dict()
    for name, peak in peaks.items():
        res[name].update(peak)
    # Against the fair baseline; the peak over the loaded model and (issue 24) the whole peak
    base = "peft_best"
    res["memory_ratio_over_model"] = res["softprompt"]["peak_over_model_mb"] / res[base]["peak_over_model_mb"]
    total = "peak_total_mb" if dev.type == "cuda" else "rss_peak_total_mb"
    res["memory_ratio_total"] = res["softprompt"][total] / res[base][total]
    res["memory_ratio_total_plain"] = res["softprompt"][total] / res["peft"][total]  # PEFT's recipe
    if dev.type == "cpu":
        res["memory_ratio_rss_over_model"] = (res["softprompt"]["rss_peak_over_model_mb"]
                                              / res[base]["rss_peak_over_model_mb"])


def report(r: dict) -> None:
    nan = float("nan")
    w = [13, 9, 9, 9, 11, 11, 8, 9, 10]
    print(f"\n== {r['task']}: {r['method']}, {r['steps']} steps each over the same examples, batch {r['batch_size']}, "
          f"P={r['virtual_tokens']}")
    print(fmt_row(["path", "median s", "mean s", "warm-up s", "text tok/s", "model tok", "GFLOP/s", "of peak",
                   "peak MB*"], w))
    for name in (*PEFT_PATHS, "softprompt"):
        if name not in r:
            continue
        x = r[name]
        print(fmt_row([name, f"{x['median_step_s']:.3f}", f"{x['total_s'] / r['steps']:.3f}", f"{x['warmup_s']:.1f}",
                       f"{x['text_tokens_per_s']:.0f}",
                       f"{x['decoder_tokens_per_step']:.0f}", f"{x.get('gflop_per_s', nan):.1f}",
                       f"{100 * x.get('fraction_of_matmul_peak', nan):.0f}%", f"{x.get('peak_over_model_mb', nan):.0f}"], w))
    k = r.get("linear_kernel")
    if k:
        print(f"linear kernel: softprompt {k['softprompt']} ({k['softprompt_reason']}); PEFT {k['peft']}")
    print(f"throughput ratio softprompt/{r['best_peft']} (the fastest PEFT variant): {r['speedup']:.2f}x over the "
          f"timed steps, {r['speedup_whole_run']:.2f}x over the whole run with warm-up; "
          f"against plain PEFT: {r['speedup_plain']:.2f}x")
    if "speedup_steady" in r:
        g = r["softprompt"]["cuda_graphs"]
        print(f"  CUDA graphs: {g['buckets']} buckets captured in {g['capture_s']:.2f} s ({g['capture_steps']} of the "
              f"timed steps), {g['replays']} replays; mean step without the one-off captures: "
              f"{r['speedup_steady']:.2f}x PEFT's mean step")
    elif r["softprompt"].get("cuda_graphs", {}).get("disabled"):
        print(f"  CUDA graphs off: {r['softprompt']['cuda_graphs']['disabled']}")
    if "gflop_per_step" in r["softprompt"]:
        print(f"work ratio PEFT/softprompt: {r['peft']['gflop_per_step'] / r['softprompt']['gflop_per_step']:.2f}x "
              "GFLOP per step (sampled batches): the speed-up if both ran at the same GFLOP/s")
    if "memory_ratio_over_model" in r:
        print(f"peak memory ratio softprompt/peft_best: {r['memory_ratio_over_model']:.2f}x (tensors allocated over "
              f"the model), {r['memory_ratio_total']:.2f}x (whole peak, the model included); whole peak against "
              f"plain PEFT: {r['memory_ratio_total_plain']:.2f}x")
        if "memory_ratio_rss_over_model" in r:  # peft_best's figure: the ratio's own denominator
            print(f"  resident memory (VmHWM over the model, allocator's kept memory included): "
                  f"{r['softprompt']['rss_peak_over_model_mb']:.0f} MB against peft_best's "
                  f"{r['peft_best']['rss_peak_over_model_mb']:.0f} MB, {r['memory_ratio_rss_over_model']:.2f}x")
    if "memory_error" in r:
        print(f"peak memory not measured: {r['memory_error'][:200]}")
    if "same_batches" in r:
        s = r["same_batches"]
        print(f"identical batches, {s['steps']} AdamW steps in {s['dtype']}: loss relative difference {s['loss_rel_diff_step1']:.1e} "
              f"at step 1, at most {s['loss_rel_diff_max']:.1e}; compute-only ratio {s['compute_speedup']:.2f}x")
        print(f"control, PEFT against PEFT from a prompt perturbed by 1e-7: at most {s['control_rel_diff_max']:.1e}; "
              f"peft_best against peft: at most {s['peft_best_rel_diff_max']:.1e}")
    if "fp32_parity" in r:
        q = r["fp32_parity"]
        print(f"float32 loss from the same start, one batch: PEFT {q['peft_loss']:.6f}, "
              f"softprompt {q['softprompt_loss']:.6f}, difference {q['abs_diff']:.1e} ({'equal' if q['equal'] else 'NOT equal'} within {q['tolerance']:.0e})")
    print("model tok: positions through the decoder per step, pads included; "
          "* peak tensor memory over the loaded model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", nargs="+", default=["acts", "sst2"], choices=TASK_CHOICES)
    ap.add_argument("--method", default="prompt", choices=METHODS,
                    help="prompt: PEFT's PromptTuning against a soft prompt; prefix: PEFT's PrefixTuning against "
                         "`train --method prefix`")
    ap.add_argument("--peft-compile", action="store_true",
                    help="add peft_compiled: peft_best under torch.compile (compiles per shape: slow to warm on a CPU)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per path")
    ap.add_argument("--check-steps", type=int, default=20, help="steps on identical batches for the loss check (0 = skip)")
    ap.add_argument("--check-dtype", default="float64", help="dtype of the loss check")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--limit", type=int, default=2000, help="rows read from each dataset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--linear-kernel", default="auto", choices=KERNELS,
                    help="softprompt's --linear-kernel (base/cpu_linear.py: oneDNN on an AMD CPU in float32)")
    ap.add_argument("--peft-kernel", default="default", choices=("default", "onednn"),
                    help="the PEFT paths' linear kernel: default is PEFT as documented; onednn gives them "
                         "softprompt's, to show what the kernel alone is worth")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="on CUDA, time softprompt's eager packed step instead of its CUDA-graph replay")
    ap.add_argument("--flop-samples", type=int, default=5, help="batches whose FLOPs are counted (0 = skip)")
    ap.add_argument("--out", default="")
    ap.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)
    dev, dtype = device_and_dtype(args.device, args.dtype)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 fp32, so the loss check means something
    peak = matmul_peak_gflops(dev, dtype)
    print(f"matmul peak ({dtype}, {dev}): {peak:.0f} GFLOP/s")
    t = time.time()
    model, tok = load_bench_model(args.model, dev, dtype, args.seed)
    print(f"model {args.model} loaded in {time.time() - t:.0f}s")
    tag = args.model.replace("/", "_").replace(":", "_")
    kind = "" if args.method == "prompt" else f"{args.method}_"  # the prompt's file keeps its name
    out = Results(args.out or RESULTS / f"train_speed_{kind}{tag}_{dev.type}.json",
                  {"bench": "train_speed", "method": args.method, "model": args.model, "device": str(dev), "dtype": args.dtype,
                   "attn_implementation": model.config._attn_implementation, "args": vars(args),
                   "warmup": "one untimed step per batch shape [B, T] and kept-position class (one or more), per path", "matmul_peak_gflops": peak}, key="tasks")
    for task in args.task:
        r = run_task(args, task, model, tok, dev, dtype, peak)
        report(r)
        out.add(r)  # row by row: a time limit loses the task in progress, not the file
    print(f"\nwrote {out.path}")


if __name__ == "__main__":
    entry(main)
