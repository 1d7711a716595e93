"""Real-size bases on this machine: peak memory and seconds per training step of prompt tuning
(softprompt's and PEFT's) over the built-in model and Llama-3.2-1B / 3B / Llama-3.1-8B geometries,
in float32, bfloat16, 8-bit and 4-bit (bitsandbytes), each with and without activation checkpointing.

The geometries get random weights (speed and memory do not depend on their values): written once as
a bfloat16 safetensors checkpoint (norms 1, the rest N(0, 0.02)) beside the built-in tokenizer, and
loaded through softprompt.base.models.load_model, the path a user's `--model DIR --dtype --quantize`
takes (transformers quantizes each tensor as it is read, so an 8B base never exists in full
precision). Each cell runs in a fresh process: B=8 rows of 128 tokens, P=20, the LM loss on every
token, AdamW; B=1 where B=8 cannot fit. A one-row, 16-token warm-up step (lazy kernels, optimiser
state) comes first and is not timed; then the timed full-size steps. Memory: the process's peak
resident set (VmHWM, loading included) and the training's part of it (the peak during the timed
steps above the resident set before them). A cell whose weights alone exceed the memory available
is skipped with the arithmetic; one that overruns its time is reported as such; one the kernel
kills reports that.

With no flags it runs PLAN, sized to about an hour on this 2-core machine: every setting with and
without checkpointing on the built-in model and the 1B geometry, and the smallest setting
(4-bit, checkpointed, B=1) on the 3B and 8B geometries. bfloat16 cells are skipped, with the
measured matmul rates, on a CPU whose bfloat16 input-gradient matmul runs at under 1/20 of
float32's (no native bf16: a 2-step bf16 cell takes ~9 minutes on the built-in model and over an
hour on the 1B geometry); naming `--settings bf16` runs them anyway. Flags replace the plan:

    python bench/scale.py                                       # the plan, about an hour
    python bench/scale.py --models builtin,llama-1b --settings fp32,8bit --steps 2
    python bench/scale.py --models llama-8b --settings 8bit --ckpt on --batch 1 --methods softprompt,peft

Results: bench/results/scale_<model>.json (cells merged into what the file already holds) and
bench/results/scale_plan.json (the cells run and the whole run's wall time).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

# Llama 3.x geometries (their config.json values; rope scaling left out: it changes no cost).
LLAMA = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=500000.0, hidden_act="silu")
GEOMETRIES = {
    "llama-1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     head_dim=64, tie_word_embeddings=True),
    "llama-3b": dict(LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     head_dim=128, tie_word_embeddings=True),
    "llama-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     head_dim=128, tie_word_embeddings=False),
}
SETTINGS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "8bit": ("float32", "8bit"),
            "4bit": ("float32", "4bit")}
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "8bit": 1.0, "4bit": 0.55}  # 4-bit: NF4 plus its scales
P, T = 20, 128
WARMUP_T = 16
WARMUP = f"one untimed step of 1 row x {WARMUP_T} tokens before the timed steps, in the same process"
# model -> (settings, checkpointing, batch, timed steps): about an hour here (see the docstring)
PLAN = {
    "builtin": ("fp32,bf16,8bit,4bit", "off,on", 8, 2),
    "llama-1b": ("fp32,bf16,8bit,4bit", "off,on", 8, 1),
    "llama-3b": ("4bit", "on", 1, 1),
    "llama-8b": ("4bit", "on", 1, 2),
}


def params_of(name: str) -> tuple[int, int]:
    """(decoder-layer weights, embedding + head weights) of a model, from its geometry."""
    if name == "builtin":
        return 106_000_000, 28_300_000
    g = GEOMETRIES[name]
    H, F, L, V = g["hidden_size"], g["intermediate_size"], g["num_hidden_layers"], g["vocab_size"]
    kv = g["num_key_value_heads"] * g["head_dim"]
    layer = H * (g["num_attention_heads"] * g["head_dim"]) * 2 + H * kv * 2 + 3 * H * F
    return L * layer, V * H * (1 if g["tie_word_embeddings"] else 2)


def weight_gb(name: str, setting: str) -> float:
    """Resident weights: quantized decoder layers, the embeddings and head in float32 (bf16 for bf16)."""
    layers, embed = params_of(name)
    return (layers * BYTES_PER_WEIGHT[setting] + embed * (2.0 if setting == "bf16" else 4.0)) / 2**30


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def random_checkpoint(name: str) -> Path:
    """A folder with the geometry's config, random bfloat16 weights in ~2 GB shards and the built-in
    tokenizer (its 49,152 ids fit in Llama 3's vocabulary); written once, tensor by tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from softprompt.base.models import builtin_model_dir, cache_root

    dest = cache_root() / "bench" / f"{name}-random"
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**GEOMETRIES[name], torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    index, shard, size, n = {}, {}, 0, 0
    for key, shape in shapes.items():
        t = torch.ones(shape, dtype=torch.bfloat16) if "norm" in key else \
            torch.empty(shape).normal_(0, 0.02, generator=g).to(torch.bfloat16)
        shard[key], size = t, size + t.numel() * 2
        if size > 2 * 2**30 or key == list(shapes)[-1]:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(dest / fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, size, n = {}, 0, n + 1
    cfg.save_pretrained(dest)
    AutoTokenizer.from_pretrained(builtin_model_dir()).save_pretrained(dest)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return dest


def cell(spec: dict) -> dict:
    """One cell, in this (fresh) process: load, a one-row warm-up step, then `steps` timed steps."""
    import torch
    from common import status_kb

    from softprompt.data.batching import Batch
    from softprompt.core.config import BUILTIN_MODEL, ModelConfig
    from softprompt.forward.hidden import batch_loss
    from softprompt.training.measure import peak_rss, reset_peak_rss
    from softprompt.base.models import load_model, set_checkpointing
    from softprompt.base.quantize import weight_bytes

    torch.manual_seed(0)
    dtype, quantize = SETTINGS[spec["setting"]]
    name = BUILTIN_MODEL if spec["model"] == "builtin" else str(random_checkpoint(spec["model"]))
    t0 = time.perf_counter()
    model, tok = load_model(ModelConfig(model=name, dtype=dtype, quantize=quantize, device="cpu"))
    for t in model.state_dict().values():  # safetensors are memory-mapped: make every weight resident
        t.float().sum() if t.is_floating_point() else t.sum()
    load_s = time.perf_counter() - t0
    if spec["ckpt"]:
        set_checkpointing(model, True)
    def make_batch(B: int, T: int) -> Batch:
        ids = torch.randint(0, len(tok), (B, T), generator=torch.Generator().manual_seed(1))
        return Batch(ids, torch.ones_like(ids), torch.cat([ids[:, 1:], ids.new_full((B, 1), -100)], 1),
                     ids.new_full((B,), -1), ids.new_zeros(B))

    warmup, full = make_batch(1, WARMUP_T), make_batch(spec["batch"], T)
    init = model.get_input_embeddings().weight[:P].detach().float().clone()
    if spec["method"] == "peft":
        from peft import PromptTuningConfig, get_peft_model

        net = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        params = [net.prompt_encoder["default"].embedding.weight]
        params[0].data.copy_(init)
        loss_fn = lambda b: net(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.input_ids).loss
    else:
        prompt = torch.nn.Parameter(init)
        params = [prompt]

        def loss_fn(b):
            s, n = batch_loss(model, prompt, b)
            return s / n
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step(b) -> tuple[float, float]:
        t = time.perf_counter()
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, float(loss.detach())

    warmup_s, _ = step(warmup)
    loaded_mb = peak_rss() / 2**20
    if not reset_peak_rss():  # the high-water mark := the resident set now, or train_extra_mb would lie
        raise SystemExit("scale: the kernel's high-water mark (VmHWM) could not be reset to the RSS")
    base_mb = status_kb("VmRSS") / 1024
    times, losses = zip(*(step(full) for _ in range(spec["steps"])))
    train_peak = peak_rss() / 2**20
    return {"load_seconds": round(load_s, 1), "weights_mb": round(weight_bytes(model) / 2**20, 1),
            "peak_rss_mb": round(max(loaded_mb, train_peak), 1), "train_extra_mb": round(train_peak - base_mb, 1),
            "seconds_per_step": round(sum(times) / len(times), 2), "step_seconds": [round(x, 2) for x in times],
            "warmup_seconds": round(warmup_s, 2),
            "losses": [round(x, 4) for x in losses], "tokens_per_step": int(full.attention_mask.sum()),
            "prompt_dtype": str(params[0].dtype), "threads": torch.get_num_threads(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None), "status": "ok"}


def run_cell(spec: dict, timeout: float) -> dict:
    """The cell in a child process; its outcome (measured, over time, out of memory or failed)."""
    need = weight_gb(spec["model"], spec["setting"])
    if need > 0.9 * available_gb():
        return {**spec, "status": "skipped", "why": f"its weights alone need ~{need:.1f} GiB, "
                                                    f"{available_gb():.1f} GiB is available"}
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "why": f"over {timeout:.0f} s for load + {spec['steps']} steps"}
    wall = round(time.perf_counter() - t, 1)
    if r.returncode == 0 and r.stdout.strip():
        return {**spec, **json.loads(r.stdout.strip().splitlines()[-1]), "wall_seconds": wall}
    if r.returncode in (-9, 137):
        return {**spec, "status": "oom", "why": "killed (out of memory)", "wall_seconds": wall}
    return {**spec, "status": "error", "why": (r.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_seconds": wall}


def matmul_rates() -> dict[str, float]:
    """GFLOP/s of the two matmuls a frozen linear layer runs in training, x @ W.T (forward) and
    g @ W (the input's gradient), in float32 and bfloat16: on CPUs without native bf16 the second
    one falls to a slow path in bfloat16, which decides whether a bf16 base can train here."""
    import torch

    out = {}
    for dt in (torch.float32, torch.bfloat16):
        w, x, g = (torch.randn(*s).to(dt) for s in ((2048, 2048), (128, 2048), (128, 2048)))
        for name, f in (("forward", lambda: x @ w.t()), ("input_grad", lambda: g @ w)):
            f()
            t = time.perf_counter()
            f()
            out[f"{str(dt)[6:]}_{name}"] = round(2 * 2048 * 2048 * 128 / (time.perf_counter() - t) / 1e9, 2)
    return out


def save(results: list[dict]) -> None:
    """Rewrite each model's file after every cell (a time limit loses one cell, not the file). The
    provenance is this run's; each cell also names the commit that measured it, since cells from
    earlier runs are kept."""
    from common import provenance, write_result

    for model in sorted({r["model"] for r in results}):
        path = ROOT / "bench" / "results" / f"scale_{model}.json"
        old = json.loads(path.read_text())["cells"] if path.is_file() else []
        key = lambda r: (r["setting"], r["ckpt"], r["method"], r["batch"])
        new = {key(r): r for r in old}
        new.update({key(r): r for r in results if r["model"] == model})
        rates = json.loads(path.read_text()).get("matmul_gflops") if path.is_file() else None
        write_result(path, {**provenance(), "model": model, "P": P, "T": T, "warmup": WARMUP,
                            "matmul_gflops": rates or matmul_rates(),
                            "cells": sorted(new.values(), key=lambda r: str(key(r)))})


def show(r: dict) -> str:
    head = f"{r['model']:9s} {r['setting']:5s} ckpt={'on ' if r['ckpt'] else 'off'} B={r['batch']} {r['method']:10s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('why', '')}"
    return (f"{head} {r['seconds_per_step']:8.2f} s/step  peak RSS {r['peak_rss_mb'] / 1024:6.2f} GiB  "
            f"training +{r['train_extra_mb'] / 1024:6.2f} GiB  weights {r['weights_mb'] / 1024:5.2f} GiB")


def plan(args) -> list[dict]:
    """The cells to run: PLAN, or the flags' grid when any of --models/--settings/--ckpt/--batch/--steps
    is given (the others then take the plan's value for each model, or 8 rows and 2 steps)."""
    cells = []
    for model in (args.models or ",".join(PLAN)).split(","):
        settings, ckpts, batch, steps = PLAN.get(model, ("fp32", "off", 8, 2))
        for setting in (args.settings or settings).split(","):
            for ckpt in (args.ckpt or ckpts).split(","):
                for method in args.methods.split(","):
                    cells.append(dict(model=model, setting=setting, ckpt=ckpt == "on", method=method,
                                      batch=args.batch or batch, steps=args.steps or steps))
    return cells


def bf16_too_slow(rates: dict[str, float]) -> str:
    """Why a bf16 cell is left out here, or '' where bf16 matmuls run at a useful rate."""
    if rates["bfloat16_input_grad"] * 20 >= rates["float32_input_grad"]:
        return ""
    return (f"no native bf16 matmul on this CPU: the input-gradient matmul runs at {rates['bfloat16_input_grad']} "
            f"GFLOP/s in bf16 against {rates['float32_input_grad']} in fp32; run it with --settings bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"default: {','.join(PLAN)}")
    ap.add_argument("--settings", help="fp32, bf16, 8bit, 4bit, comma-separated; default: the plan's")
    ap.add_argument("--ckpt", help="activation checkpointing: off, on or off,on; default: the plan's")
    ap.add_argument("--methods", default="softprompt,peft")
    ap.add_argument("--batch", type=int, help="rows per step; default: the plan's (8, or 1 for 3B/8B)")
    ap.add_argument("--steps", type=int, help="timed optimiser steps per cell, after the warm-up; default: the plan's")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(json.loads(args.cell))))
        return
    from common import git_commit, provenance, write_result

    t0 = time.perf_counter()
    commit = git_commit()
    skip_bf16 = "" if args.settings else bf16_too_slow(matmul_rates())
    results, lines = [], []
    for spec in plan(args):
        if spec["model"] != "builtin":
            random_checkpoint(spec["model"])  # written once, outside any cell's time
        if spec["setting"] == "bf16" and skip_bf16:
            r = {**spec, "status": "skipped", "why": skip_bf16}
        else:
            r = {**run_cell(spec, args.timeout), "commit": commit}
            results.append(r)
            save(results)
        lines.append(show(r))
        print(lines[-1], flush=True)
    wall = round(time.perf_counter() - t0, 1)
    summary = {**provenance(), "wall_seconds": wall,
               "bf16_skipped": skip_bf16, "cells": lines}
    write_result(ROOT / "bench" / "results" / ("scale_plan.json" if len(sys.argv) == 1 else "scale_last_run.json"),
                 summary)
    print(f"{len(results)} cells in {wall / 60:.1f} minutes")


if __name__ == "__main__":
    main()
