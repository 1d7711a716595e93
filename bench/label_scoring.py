"""Label words of several tokens, scored two ways side by side: every (row, label word) pair as its
own sequence (softprompt before 2026-12-07, and what a per-candidate loop over PEFT does), against
softprompt's `label_scores` (each row once, its label words over its cache: forward/prefill.py).

RTE's validation rows with the README's labels (" entailment" is 2 tokens here, " not_entailment"
5), after a random soft prompt and after a random prefix; after an untimed call each, the two ways
alternate for `--repeats` rounds (medians); the scores must agree (max difference, same argmax).

    python bench/label_scoring.py                       # the built-in model, 64 rows (~8 min on 2 cores)
    python bench/label_scoring.py --rows 16 --repeats 1   # a quick look
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, Results, device_and_dtype, entry, load_bench_model, median, sync  # noqa: E402

from softprompt.core.config import DataConfig  # noqa: E402
from softprompt.data.batching import pad_id  # noqa: E402
from softprompt.data.formatting import load_splits  # noqa: E402
from softprompt.forward.classify import continuation_logprobs, label_scores, row_candidates  # noqa: E402
from softprompt.prompts.prefix import PrefixPrompt, prefix_meta, prompt_key_values  # noqa: E402

TEMPLATE = "Premise: {premise}\\nHypothesis: {hypothesis}\\nAnswer:"  # the README's RTE example
LABELS = "entailment,not_entailment"


def per_pair(model, rows, cands, pad: int, batch_size: int) -> torch.Tensor:
    """[N, C]: each (row, label word) pair run as its own sequence, longest pairs first, batch_size at a time."""
    pairs = sorted(((i, k) for i in range(len(rows)) for k in range(len(cands[i]))),
                   key=lambda ik: -(len(rows[ik[0]][1]) + len(cands[ik[0]][ik[1]])))
    scores = torch.full((len(rows), max(map(len, cands))), -torch.inf)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        v = continuation_logprobs(model, [rows[i] for i, _ in chunk], [cands[i][k] for i, k in chunk], pad)
        for (i, k), x in zip(chunk, v.float().cpu()):
            scores[i, k] = x
    return scores


def timed_side_by_side(ways: dict, device, repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds of each way and its scores: one untimed call each, then `repeats` rounds in which
    every way runs once, so that a drift in the machine's speed falls on all of them alike."""
    out = {name: f() for name, f in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, f in ways.items():
            sync(device)
            t = time.perf_counter()
            out[name] = f()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: median(ts) for name, ts in times.items()}, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64, help="RTE validation rows (of 277)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows (or pairs) per forward, eval's default")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(RESULTS / "label_scoring.json"))
    args = ap.parse_args()
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tok = load_bench_model(args.model, device, dtype)
    cfg = DataConfig(data=str(SHARED / "rte" / "val.jsonl"), template=TEMPLATE, labels=LABELS, eval_fraction=0,
                     limit=args.rows)
    fmt, examples, _ = load_splits(cfg, tok)
    cands = row_candidates(fmt, examples)
    torch.manual_seed(0)
    soft = (torch.randn(args.virtual_tokens, model.config.hidden_size) * 0.02).to(device, dtype)
    prompts = {"prompt": soft, "prefix": PrefixPrompt(prompt_key_values(model, soft), prefix_meta(model))}
    res = Results(args.out, {"bench": "label_scoring", "model": args.model, "args": vars(args),
                             "device": str(device), "dtype": str(dtype), "task": "rte", "labels": LABELS,
                             "label_tokens": sorted({len(w) for c in cands for w in c}),
                             "warmup": "one untimed call per way and prompt; medians of --repeats rounds, "
                                       "the ways alternating"})
    pad = pad_id(tok)
    with torch.no_grad():
        for kind, p in prompts.items():
            rows = [(p, e.ids[:e.loss_start]) for e in examples]
            secs, got = timed_side_by_side({
                "per_pair": lambda: per_pair(model, rows, cands, pad, args.batch_size),
                "label_scores": lambda: label_scores(model, rows, cands, pad, args.batch_size)}, device, args.repeats)
            (before, after), (old, new) = secs.values(), got.values()
            r = res.add({"prompt_kind": kind, "rows": len(rows), "text_tokens": sum(len(x[1]) for x in rows),
                         "per_pair_s": before, "label_scores_s": after, "speedup": before / after,
                         "max_abs_diff": float((old - new).abs().max()),
                         "same_argmax": bool((old.argmax(1) == new.argmax(1)).all())})
            print(f"{kind}: {r['rows']} rows, per pair {before:.2f} s, label_scores {after:.2f} s: "
                  f"{r['speedup']:.2f}x; max difference {r['max_abs_diff']:.1e}, same argmax {r['same_argmax']}",
                  flush=True)
    print(f"wrote {res.path}")


if __name__ == "__main__":
    entry(main)
