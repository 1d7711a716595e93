"""Generation throughput for many tasks (soft prompts) at equal batching: softprompt against PEFT
and against Hugging Face's fastest stock recipe (static cache + torch.compile), in one process, on
one model, with one attention implementation.

The workload: T tasks x R requests each, greedy, up to N new tokens. Two batchings, each compared
only with itself:
- per task (T batches of R rows, the same rows on every path):
  - `peft`: one PeftModel holding the T prompt adapters; `set_adapter` and one `generate()` per task;
  - `hf/per-task`: transformers' `generate` on hand-built inputs_embeds [prompt; text] (left
    padded), default dynamic cache: what PEFT's prompt tuning computes, without PEFT's wrapper;
  - `hf-static/per-task`: the same with `cache_implementation="static"` and (with --compile) HF's
    CompileConfig, HF's documented fast recipe. PEFT's prompt tuning refuses the static cache with
    peft 0.21.2 and transformers 5.24 (its prepare_inputs_for_generation reads a `cache_position`
    that transformers no longer passes: KeyError); the reason is probed and recorded as
    `peft_static_error`, and `peft-static` joins the rows if the probe passes;
  - `softprompt/per-task`: `generate_batch` over the same T batches;
- mixed (one batch of T x R rows):
  - `softprompt/mixed`: every row with its own prompt;
  - `hf/mixed`, `hf-static/mixed`: the hand-built inputs_embeds, each row its own prompt, in one
    `generate` (dynamic cache; static cache + compile): the best stock HF does at this batch size;
  - `peft/one-adapter`: PEFT with task 0's adapter on all T x R rows (PEFT cannot mix prompt
    adapters in one batch; this is its speed if it could; its outputs are not the tasks');
  - `plain`: `model.generate` on the T x R texts with no prompt at all (the machine's ceiling);
- prefixes (skipped with --no-prefix): the T prompts converted exactly into prefixes (each soft
  prompt's per-layer keys and values through the frozen model, prefix.prompt_key_values, the rule
  of `train --method prefix --init-from`), served by the same engine over the same workload:
  `softprompt-prefix/per-task`, `softprompt-prefix/mixed`, and `softprompt-both/mixed` (even
  tasks as prompts, odd tasks as prefixes, in one batch, as the server batches them). Their ratio
  to the prompt rows (`ratios.prefix_vs_prompt`) is issue 23's target: serving a prefix is at
  least as fast as serving a prompt. A converted prefix is the same keys and values, so its greedy
  tokens must be the prompt rows' (`checks.prefix_equals_prompt`, `checks.prefix_rows_differing`,
  recorded, never fatal: fp32 must be exact (the dry-run test asserts it); bf16 is the same bf16
  computation, cast through fp32 losslessly, so a mismatch there is worth a look, not an error);
- one at a time: each request alone through softprompt, untimed: the mixed batch must equal it.
The rival at a batching is the fastest of its PEFT/HF rows; softprompt's ratio to it is the
headline, its ratio to plain PEFT (`peft`, `peft/one-adapter`) the second row. A rival that cannot
run on the model (PEFT's generate on BLOOM) is recorded under `failed_paths` and left out.

Fairness, recorded in the JSON:
- warm-up: every path runs its own whole workload once, untimed, before any timing, so it has met
  every shape it will meet (compiles, CUDA-graph captures, allocator growth); that pass's time is
  recorded (for the compiled paths it is mostly compile time);
- timing: --repeats rounds, each path once per round in turn (so load drifts hit every path alike);
  mean and median new tokens/s; a new token is one before the row's end of sequence;
- attention: one implementation for every path (--attn; sdpa where the model has it); on CUDA every
  path runs under the same SDPA kernel set (memory-efficient + math, the one softprompt's CUDA
  graphs use); on CPU torch's default SDPA choice for all;
- static-cache inputs are left padded to the workload's longest row, so a compiled path meets one
  shape per batch size (HF's advice against recompiles); the padding's cost is theirs.
Every round's time is a row of the JSON, written as it is measured (bench/common.Results).

Defaults (each setting given on the command line wins): on a GPU 8 tasks x 8 requests, 32 new
tokens, compile on; on a CPU 4 x 4, 8 new tokens, compile off: a few minutes on two cores, most of
it PEFT (see below). --compile on a CPU costs 40 s (two quiet cores) to 1.5 minutes (loaded) per
batch size, less once inductor's on-disk cache holds the graphs; the warm-up rows show it.

PEFT's own rows, with peft 0.21.2 and transformers 5.24: each decode step re-feeds the whole
prompt (PEFT looks for the cache under `past_key_values`, which transformers now passes as
`cache`), so PEFT is slower than the computation it stands for and its tokens differ; the bench
probes and records it (`peft_decode_step_lengths`, `peft_refeeds_prompt`). The hf/* rows are
that computation done right, which is why the rival is the fastest row, not PEFT's.

    python bench/generate_speed.py --model smollm2-135m-instruct
    python bench/generate_speed.py --model smollm2-135m-instruct --dtype bfloat16
    python bench/generate_speed.py --device cpu                                   # CPU defaults
    python bench/generate_speed.py --device cpu --tasks 2 --per-task 2 --max-new-tokens 4   # a dry run
    python bench/generate_speed.py --model smollm2-135m-instruct --no-prefix         # without the prefix rows
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ACTS, PeakMemory, RESULTS, Results, device_and_dtype, entry, load_bench_model, sync  # noqa: E402

from softprompt.core.config import GenerateConfig, PromptConfig  # noqa: E402
from softprompt.data.formatting import read_rows  # noqa: E402
from softprompt.forward.cuda_graphs import capturable_attention  # noqa: E402
from softprompt.forward.prefill import PromptKV  # noqa: E402
from softprompt.generation.decode import DecodeBatch, eos_ids  # noqa: E402
from softprompt.generation.generate import generate_batch  # noqa: E402
from softprompt.generation.static_decode import StaticDecodeBatch, decode_batch_for  # noqa: E402
from softprompt.prompts.prefix import PrefixPrompt, prefix_meta, prompt_key_values  # noqa: E402
from softprompt.prompts.prompt import init_prompt  # noqa: E402

TASK_TEXTS = [
    "Write a detailed prompt that asks the assistant to act as the given role.",
    "Classify the sentiment of the text as negative or positive.",
    "Translate the text into French.",
    "Summarise the text in one sentence.",
    "Answer the question with a short fact.",
    "Rewrite the text in a formal business tone.",
    "Extract the names of people mentioned in the text.",
    "Write a short poem about the topic.",
]
# CPU: small enough for about two minutes on two cores, and no compile (40-90 s more per batch size there).
DEFAULTS = {"cpu": dict(tasks=4, per_task=4, max_new_tokens=8, compile=False),
            "gpu": dict(tasks=8, per_task=8, max_new_tokens=32, compile=True)}
# Which rows compete at each batching: softprompt's row, then its PEFT/HF rivals (the best is the reference).
BATCHINGS = {"per-task": ("softprompt/per-task", ["peft", "peft-static", "hf/per-task", "hf-static/per-task"]),
             "mixed": ("softprompt/mixed", ["peft/one-adapter", "hf/mixed", "hf-static/mixed"])}
# The prefix rows beside the prompt row they are compared with (speed ratio and greedy tokens).
PREFIX_ROWS = {"softprompt-prefix/per-task": "softprompt/per-task", "softprompt-prefix/mixed": "softprompt/mixed",
               "softprompt-both/mixed": "softprompt/mixed"}


def workload(tok, tasks: int, per_task: int) -> list[list[int]]:
    rows = read_rows(ACTS["data"])
    texts = [f"Act as a {r['act']}.\nPrompt:" for r in rows[: tasks * per_task]]
    return [tok(t).input_ids for t in texts]


def trim(ids: list[int], eos: set[int]) -> list[int]:
    """A row's new tokens up to its end of sequence (HF pads finished rows until the batch ends)."""
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out


def peft_model_with(model, prompts: list[torch.Tensor]):
    from peft import PromptTuningConfig, get_peft_model

    cfg = lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompts[0].shape[0])  # noqa: E731
    pm = get_peft_model(model, cfg(), adapter_name="task0")
    for k, p in enumerate(prompts):
        name = f"task{k}"
        if k:
            pm.add_adapter(name, cfg())
        pm.prompt_encoder[name].embedding.weight.data.copy_(p)
    pm.eval()
    return pm


def as_prefixes(model, prompts: list[torch.Tensor]) -> list[PrefixPrompt]:
    """Each soft prompt converted exactly into a prefix (its keys and values through the frozen model,
    as `train --method prefix --init-from` starts one), held as the server holds a loaded prefix:
    on the model's device, frozen."""
    dev = model.get_input_embeddings().weight.device
    return [PrefixPrompt(prompt_key_values(model, p), prefix_meta(model)).to(dev).requires_grad_(False)
            for p in prompts]


# ---------------------------------------------------------------- Hugging Face generate

def hf_options(tok, max_new: int, static: bool, compile_cfg) -> dict:
    """generate()'s keyword arguments: greedy; with `static`, HF's static cache, compiled through
    HF's own CompileConfig (its documented recipe) or explicitly not compiled."""
    opts = dict(do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
    if static:
        opts["cache_implementation"] = "static"
        if compile_cfg is None:
            opts["disable_compile"] = True  # else transformers compiles on its own on CUDA
        else:
            opts["compile_config"] = compile_cfg
    return opts


def compile_config_for(dev: torch.device):
    """HF's CompileConfig: its defaults on CUDA (inductor, reduce-overhead = CUDA graphs); on CPU mode
    'default' (reduce-overhead means CUDA graphs) and HF's switch to compile off CUDA. dynamic=False:
    one graph per batch size, each met in warm-up."""
    from transformers import CompileConfig

    cfg = CompileConfig(dynamic=False, mode="reduce-overhead" if dev.type == "cuda" else "default")
    if dev.type != "cuda":
        cfg._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return cfg


def left_pad_ids(tok, batch: list[list[int]], dev) -> dict[str, torch.Tensor]:
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok.pad({"input_ids": batch}, return_tensors="pt").to(dev)
    tok.padding_side = side
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


def prompt_embeds(model, prompts: list[torch.Tensor], batch: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    """inputs_embeds [B, width, H] = [prompt; text embeddings] per row, left padded with zeros, and
    its attention mask: what PEFT's prompt tuning feeds the model, built by hand."""
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    x = torch.zeros(len(batch), width, emb.weight.shape[1], dtype=emb.weight.dtype, device=dev)
    mask = torch.zeros(len(batch), width, dtype=torch.long, device=dev)
    for i, (p, ids) in enumerate(zip(prompts, batch)):
        row = torch.cat([p.to(x.dtype), emb(torch.tensor(ids, device=dev))])
        x[i, width - row.shape[0]:] = row
        mask[i, width - row.shape[0]:] = 1
    return {"inputs_embeds": x, "attention_mask": mask}


def hf_generate(model, inputs: dict, opts: dict, eos: set[int]) -> list[list[int]]:
    with torch.no_grad():
        gen = model.generate(**inputs, **opts)
    if "input_ids" in inputs:  # generate returns the input ids, then the new ones
        gen = gen[:, inputs["input_ids"].shape[1]:]
    return [trim(r, eos) for r in gen.tolist()]


def failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def probe_peft_static(pm, tok, inputs, dev) -> str | None:
    """Why PEFT's prompt-tuning generate cannot use HF's static cache here (None when it can)."""
    try:
        hf_generate(pm, left_pad_ids(tok, inputs[:2], dev), hf_options(tok, 2, True, None), set())
        return None
    except Exception as e:  # a version mismatch between PEFT and transformers shows as any error
        return failure(e)


def peft_step_lengths(pm, tok, inputs, dev) -> list[int] | str:
    """The sequence length PEFT's generate feeds the model at each forward of a 3-token greedy run
    (the prompt and text, then 1 per step if it reuses the cache), or why it failed."""
    fed = []

    def note(module, args, kwargs):
        x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        fed.append(int(x.shape[1]))
    hook = pm.get_base_model().register_forward_pre_hook(note, with_kwargs=True)
    try:
        hf_generate(pm, left_pad_ids(tok, inputs[:2], dev), hf_options(tok, 3, False, None), set())
    except Exception as e:
        return failure(e)
    finally:
        hook.remove()
    return fed


def probe_peft(pm, tok, inputs, dev) -> dict:
    """What PEFT's prompt-tuning generate does on this model and these versions, printed and recorded:
    whether it takes the static cache, and whether each decode step feeds the model one token or
    re-injects the whole prompt (peft 0.21.2 with transformers 5.24 does: it looks for the cache
    under `past_key_values`, which transformers now passes as `cache`; its outputs then differ)."""
    if pm is None:
        return {"peft_static_error": "--no-peft", "peft_decode_step_lengths": None, "peft_refeeds_prompt": None}
    static_error, lengths = probe_peft_static(pm, tok, inputs, dev), peft_step_lengths(pm, tok, inputs, dev)
    refeeds = isinstance(lengths, list) and any(n > 1 for n in lengths[1:])
    if static_error:
        print(f"PEFT prompt tuning with HF's static cache fails ({static_error}); "
              "its static-cache rival is HF generate on the prompt as inputs_embeds (hf-static/*)")
    if refeeds:
        print(f"PEFT's generate feeds the model {lengths} positions per forward: each decode step "
              "re-injects the prompt (slower, and its outputs differ); hf/* is what it should compute")
    return {"peft_static_error": static_error, "peft_decode_step_lengths": lengths, "peft_refeeds_prompt": refeeds}


# ---------------------------------------------------------------- the paths

def build_paths(args, model, tok, pm, prompts, prefixes, inputs, dev, eos, engine, peft_static_error) -> dict:
    """name -> a function running that path's whole workload and returning each row's new tokens
    (`prefixes`: the prompts converted, or None for no prefix rows)."""
    T, R, N = args.tasks, args.per_task, args.max_new_tokens
    cc = compile_config_for(dev) if args.compile else None
    rows = [(prompts[i // R], ids) for i, ids in enumerate(inputs)]
    task = lambda k: slice(k * R, (k + 1) * R)  # noqa: E731
    width = max(prompts[0].shape[0] + len(ids) for ids in inputs)
    row_prompts = [prompts[i // R] for i in range(len(inputs))]
    gcfg = GenerateConfig(max_new_tokens=N)

    def peft_per_task(static: bool):
        def run():
            out = []
            for k in range(T):
                pm.set_adapter(f"task{k}")
                out += hf_generate(pm, left_pad_ids(tok, inputs[task(k)], dev), hf_options(tok, N, static, cc), eos)
            return out
        return run

    def peft_one_adapter():
        pm.set_adapter("task0")
        return hf_generate(pm, left_pad_ids(tok, inputs, dev), hf_options(tok, N, False, None), eos)

    def hf_embeds(sl: slice, static: bool):
        """The static cache meets one width (the workload's longest row); the dynamic one its batch's."""
        w = width if static else max(prompts[0].shape[0] + len(ids) for ids in inputs[sl])
        return hf_generate(model, prompt_embeds(model, row_prompts[sl], inputs[sl], w),
                           hf_options(tok, N, static, cc), eos)

    paths = {}
    if pm is not None:
        paths["peft"] = peft_per_task(False)
        if peft_static_error is None:
            paths["peft-static"] = peft_per_task(True)
    paths["hf/per-task"] = lambda: sum((hf_embeds(task(k), False) for k in range(T)), [])
    paths["hf-static/per-task"] = lambda: sum((hf_embeds(task(k), True) for k in range(T)), [])
    paths["softprompt/per-task"] = lambda: sum((generate_batch(model, tok, rows[task(k)], gcfg, engine=engine)
                                                for k in range(T)), [])
    paths["softprompt/mixed"] = lambda: generate_batch(model, tok, rows, gcfg, engine=engine)
    if prefixes is not None:
        paths.update(prefix_paths(model, tok, prefixes, prompts, inputs, T, R, gcfg, engine))
    paths["hf/mixed"] = lambda: hf_embeds(slice(None), False)
    paths["hf-static/mixed"] = lambda: hf_embeds(slice(None), True)
    if pm is not None:
        paths["peft/one-adapter"] = peft_one_adapter
    paths["plain"] = lambda: hf_generate(model, left_pad_ids(tok, inputs, dev), hf_options(tok, N, False, None), eos)
    return paths


def prefix_paths(model, tok, prefixes, prompts, inputs, T: int, R: int, gcfg, engine) -> dict:
    """softprompt's generation with the converted prefixes on the same workload: per task, all in
    one batch, and one batch with even tasks as prompts and odd tasks as prefixes."""
    rows = [(prefixes[i // R], ids) for i, ids in enumerate(inputs)]
    both = [((prompts if (i // R) % 2 == 0 else prefixes)[i // R], ids) for i, ids in enumerate(inputs)]
    task = lambda k: slice(k * R, (k + 1) * R)  # noqa: E731
    return {"softprompt-prefix/per-task": lambda: sum((generate_batch(model, tok, rows[task(k)], gcfg, engine=engine)
                                                       for k in range(T)), []),
            "softprompt-prefix/mixed": lambda: generate_batch(model, tok, rows, gcfg, engine=engine),
            "softprompt-both/mixed": lambda: generate_batch(model, tok, both, gcfg, engine=engine)}


def batch_sizes(name: str, T: int, R: int) -> list[int]:
    """The batch sizes a path runs, for the record (equal batching is checked from these)."""
    per_task = BATCHINGS["per-task"][1] + [BATCHINGS["per-task"][0], "softprompt-prefix/per-task"]
    return [R] * T if name in per_task else [T * R]


def timed(dev, fn):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def measure(paths: dict, repeats: int, dev, results: Results) -> tuple[dict, dict, dict]:
    """Warm every path on its whole workload, then time `repeats` rounds of all paths in turn; every
    pass is a row of the result file. A rival whose warm-up fails is recorded (`failed_paths`) and
    dropped from `paths`. Returns each path's outputs, warm-up seconds and timed passes."""
    outs, warm, times = {}, {}, {name: [] for name in paths}
    for name, fn in list(paths.items()):
        try:
            outs[name], warm[name] = timed(dev, fn)
        except Exception as e:  # a rival that cannot run on this model (PEFT's generate on BLOOM) is recorded, not fatal
            if name.startswith("softprompt"):
                raise
            error = results.doc.setdefault("failed_paths", {})[name] = failure(e)
            results.add({"path": name, "pass": "warm-up", "error": error})
            print(f"  {name} cannot run here: {error}", flush=True)
            del paths[name], times[name]
            continue
        results.add({"path": name, "pass": "warm-up", "seconds": warm[name], "new_tokens": sum(map(len, outs[name]))})
        print(f"  warm-up {name:22s} {warm[name]:8.1f} s", flush=True)
    for r in range(repeats):
        for name, fn in paths.items():
            mem = PeakMemory(dev) if dev.type == "cuda" else contextlib.nullcontext()
            with mem:
                out, secs = timed(dev, fn)
            row = {"path": name, "pass": r, "seconds": secs, "new_tokens": sum(map(len, out)),
                   "same_output_as_warm_up": out == outs[name], **(mem.as_dict() if dev.type == "cuda" else {})}
            times[name].append(results.add(row))
        print(f"  round {r + 1} of {repeats} timed", flush=True)
    return outs, warm, times


def summarise(name: str, out, passes: list[dict], warm_s: float, T: int, R: int, reference) -> dict:
    tps = [p["new_tokens"] / p["seconds"] for p in passes]
    secs = [p["seconds"] for p in passes]
    s = {"batch_sizes": batch_sizes(name, T, R), "new_tokens": passes[0]["new_tokens"],
         "tok_s_mean": statistics.mean(tps), "tok_s_median": statistics.median(tps),
         "tok_s_all": tps, "seconds_median": statistics.median(secs), "warm_up_s": warm_s,
         "warm_up_over_median_s": warm_s - statistics.median(secs),
         "requests_per_s_median": len(out) / statistics.median(secs)}
    if reference is not None:
        s["rows_equal_to_softprompt"] = sum(a == b for a, b in zip(out, reference)) / len(out)
    return s


def ratios(summary: dict) -> dict:
    """softprompt's median new tokens/s over the best PEFT/HF row at the same batching, and over
    plain PEFT (the first rival listed) and the plain model."""
    med = {k: v["tok_s_median"] for k, v in summary.items()}
    out = {}
    for batching, (ours, rivals) in BATCHINGS.items():
        present = [r for r in rivals if r in med]
        if ours not in med or not present:
            continue
        best, plain = max(present, key=med.get), rivals[0]
        out[batching] = {"softprompt": ours, "best_rival": best, "vs_best": med[ours] / med[best],
                         "plain_peft": plain, "vs_plain_peft": med[ours] / med[plain] if plain in med else None}
    if "softprompt/mixed" in med and "plain" in med:
        out["mixed_vs_plain_model"] = med["softprompt/mixed"] / med["plain"]
    # Issue 23's target: a prefix row's median new tokens/s over its prompt row's (>= 1: as fast).
    pairs = {"per-task": "softprompt-prefix/per-task", "mixed": "softprompt-prefix/mixed",
             "both_mixed": "softprompt-both/mixed"}
    prefix = {k: med[n] / med[PREFIX_ROWS[n]] for k, n in pairs.items() if n in med and PREFIX_ROWS[n] in med}
    if prefix:
        out["prefix_vs_prompt"] = prefix
    return out


def print_table(summary: dict, rat: dict) -> None:
    print(f"\n{'path':26s} {'batches':>10s} {'tok/s mean':>11s} {'tok/s median':>13s} {'warm-up s':>10s} {'= softprompt':>13s}")
    for name, s in summary.items():
        sizes = s["batch_sizes"]
        b = f"{len(sizes)}x{sizes[0]}"
        eq = s.get("rows_equal_to_softprompt")
        print(f"{name:26s} {b:>10s} {s['tok_s_mean']:11.1f} {s['tok_s_median']:13.1f} {s['warm_up_s']:10.1f} "
              f"{'' if eq is None else f'{100 * eq:.0f}%':>13s}")
    for batching in BATCHINGS:
        if batching in rat:
            r = rat[batching]
            plain = f"{r['vs_plain_peft']:.2f}x" if r["vs_plain_peft"] else "(did not run)"
            print(f"{batching}: softprompt / best rival ({r['best_rival']}) = {r['vs_best']:.2f}x; "
                  f"/ {r['plain_peft']} = {plain}")
    if "mixed_vs_plain_model" in rat:
        print(f"softprompt mixed / plain model without prompts: {rat['mixed_vs_plain_model']:.2f}x")
    for k, v in rat.get("prefix_vs_prompt", {}).items():
        print(f"prefix / prompt ({k.replace('_', ' ')}): {v:.2f}x")


def checks(model, tok, engine, outs: dict, prompts, inputs, R: int, N: int, single: bool) -> dict:
    """softprompt's identity checks: the mixed batch equals the per-task batches and (with `single`)
    each request decoded alone; the attention implementation is still the pinned one."""
    mixed = outs["softprompt/mixed"]
    check = {"attn_implementation_after": model.config._attn_implementation,
             "mixed_equals_per_task": mixed == outs["softprompt/per-task"]}
    if single:
        gcfg = GenerateConfig(max_new_tokens=N)
        alone = [generate_batch(model, tok, [(prompts[i // R], ids)], gcfg, engine=engine)[0]
                 for i, ids in enumerate(inputs)]
        check["mixed_equals_single"] = mixed == alone
        check["rows_differing_from_single"] = sum(a != b for a, b in zip(mixed, alone))
    check.update(prefix_checks(outs))
    check["engine_cuda_graph_replays"] = getattr(engine, "replays", 0)
    check["engine_cuda_graph_error"] = getattr(engine, "graph_error", None)
    return check


def prefix_checks(outs: dict) -> dict:
    """A converted prefix is the same keys and values as its prompt: each prefix row's greedy tokens
    against its prompt row's (fp32: equal; bf16: mismatches are recorded)."""
    pairs = [(n, ref) for n, ref in PREFIX_ROWS.items() if n in outs]
    if not pairs:
        return {"prefix_equals_prompt": None, "prefix_rows_differing": None}
    differing = {n: sum(a != b for a, b in zip(outs[n], outs[ref])) for n, ref in pairs}
    return {"prefix_equals_prompt": not any(differing.values()), "prefix_rows_differing": sum(differing.values()),
            "prefix_rows_differing_by_path": differing}


def pin_attention(model, want: str) -> str:
    """One attention implementation for every path: `want`, or with 'auto' sdpa where the model
    has it and its own otherwise (BLOOM computes attention itself)."""
    if want == "auto":
        want = "sdpa" if getattr(model, "_supports_sdpa", False) else model.config._attn_implementation
    if model.config._attn_implementation != want:
        try:
            model.set_attn_implementation(want)
        except (ValueError, ImportError) as e:
            raise SystemExit(f"--attn {want}: {str(e).splitlines()[0]}") from None
    return model.config._attn_implementation


def settings(args, dev, attn: str, engine: str) -> dict:
    """What the result file records beside provenance(): the workload and how it was measured."""
    return {"bench": "generate_speed", "model": args.model, "device": str(dev), "dtype": args.dtype,
            "tasks": args.tasks, "per_task": args.per_task, "max_new_tokens": args.max_new_tokens,
            "virtual_tokens": args.virtual_tokens, "repeats": args.repeats, "attn_implementation": attn,
            "sdpa_kernels": "efficient+math (all paths)" if dev.type == "cuda" else "torch default (all paths)",
            "compile": args.compile, "compile_config": compile_config_for(dev).to_dict() if args.compile else None,
            "warmup": "one untimed pass of each path's whole workload before any timing; then --repeats rounds, "
                       "paths in turn", "static_cache_padding": "left padded to the workload's longest row",
            "engine": engine, "prefix": args.prefix}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", type=int, help="soft prompts (at most 8; default 4 on CPU, 8 on GPU)")
    ap.add_argument("--per-task", type=int, help="requests per task (default 4 on CPU, 8 on GPU)")
    ap.add_argument("--max-new-tokens", type=int, help="default 8 on CPU, 32 on GPU")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="auto", help="attention implementation for every path (auto: sdpa where the model has it)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the static-cache HF paths (HF's CompileConfig; default: on a GPU only); "
                         "compile time lands in their warm-up")
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="skip PEFT's paths")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the one-at-a-time check")
    ap.add_argument("--no-prefix", dest="prefix", action="store_false",
                    help="skip the prefix rows (the prompts converted into prefixes, served the same way)")
    ap.add_argument("--engine", default="auto", choices=["auto", "static", "growing"],
                    help="softprompt's decode engine (auto: static CUDA-graph slots on a GPU where the model allows)")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    dev, dtype = device_and_dtype(args.device, args.dtype)
    for k, v in DEFAULTS["gpu" if dev.type == "cuda" else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    T, R, N = args.tasks, args.per_task, args.max_new_tokens
    if not 1 <= T <= len(TASK_TEXTS) or R < 1 or N < 1 or args.repeats < 1:
        raise SystemExit(f"--tasks must be 1..{len(TASK_TEXTS)}; --per-task, --max-new-tokens and --repeats at least 1")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = load_bench_model(args.model, dev, dtype)
    attn = pin_attention(model, args.attn)
    prompts = [init_prompt(model, tok, PromptConfig(virtual_tokens=args.virtual_tokens, init="text",
                                                    init_text=TASK_TEXTS[k])).embeds.detach().to(dev, dtype)
               for k in range(T)]
    prefixes = as_prefixes(model, prompts) if args.prefix else None
    inputs = workload(tok, T, R)
    eos = eos_ids(model, tok)
    pm = peft_model_with(model, prompts) if args.peft else None
    probes = probe_peft(pm, tok, inputs, dev)
    peft_static_error = probes["peft_static_error"]
    engine = (StaticDecodeBatch(model, tok, PromptKV(model)) if args.engine == "static" else
              DecodeBatch(model, tok, PromptKV(model)) if args.engine == "growing" else
              decode_batch_for(model, tok, PromptKV(model)))
    kernels = capturable_attention() if dev.type == "cuda" else contextlib.nullcontext()
    tag = args.model.replace("/", "_").replace(":", "_")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, args.dtype)
    out = args.out or RESULTS / f"generate_speed_{tag}_{short}_{dev.type}.json"
    results = Results(out, {**settings(args, dev, attn, type(engine).__name__), **probes})
    paths = build_paths(args, model, tok, pm, prompts, prefixes, inputs, dev, eos, engine, peft_static_error)
    with kernels:
        outs, warm, times = measure(paths, args.repeats, dev, results)
        check = checks(model, tok, engine, outs, prompts, inputs, R, N, args.single)
    # Rows that run the same prompts on the same texts must give softprompt's greedy tokens.
    ref = {"peft": "softprompt/per-task", "peft-static": "softprompt/per-task", "hf/per-task": "softprompt/per-task",
           "hf-static/per-task": "softprompt/per-task", "hf/mixed": "softprompt/mixed",
           "hf-static/mixed": "softprompt/mixed", **PREFIX_ROWS}
    summary = {n: summarise(n, outs[n], times[n], warm[n], T, R, outs.get(ref.get(n))) for n in paths}
    rat = ratios(summary)
    results.doc.update(paths=summary, ratios=rat, checks=check)
    results.save()
    print_table(summary, rat)
    print(f"attention: {attn}; checks: {check}")
    print(f"wrote {out}")


if __name__ == "__main__":
    entry(main)
