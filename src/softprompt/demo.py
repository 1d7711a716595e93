"""`softprompt demo`: the whole workflow offline in a few minutes on 2 CPU cores.

Trains a 20-token prompt (the default method: a prefix) on the built-in SmolLM2-135M-Instruct with
the bundled countries data (written for this project) so that "Country: X\\nFacts:" is answered as
" capital=...; continent=...; language=...", then prints held-out loss before and after and the
untuned model's generations beside the tuned model's for held-out countries.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .base.models import cpu_bf16_method, load_model
from .core.config import DataConfig, GenerateConfig, ModelConfig, PromptConfig, TrainConfig
from .core.utils import SoftpromptError, read_json
from .core.prompt_protocol import forward_input
from .data.formatting import load_splits
from .forward.prefill import PromptKV
from .generation.generate import encode_for_generation, generate_batch
from .prompts.prompt import load_prompt
from .training.auto_method import resolve_method
from .training.train import train

EXAMPLE_DATA = Path(__file__).parent / "examples" / "countries.jsonl"


def demo_configs(out: str = "runs/demo", max_steps: int = 120, model: str = "smollm2-135m-instruct",
                 overwrite: bool = False):
    mcfg = ModelConfig(model=model, device="cpu")
    dcfg = DataConfig(data=str(EXAMPLE_DATA), template="Country: {country}\nFacts:",
                      target=" capital={capital}; continent={continent}; language={language}",
                      eval_fraction=0.15, max_length=64)
    pcfg = PromptConfig(virtual_tokens=20, init="text",
                        init_text="Give the country's capital, continent and main language as key=value pairs.")
    # A tenth of a short run warms up (demo has no --warmup-steps for train's warning to name).
    warmup = min(10, max_steps // 10) if max_steps else 10
    tcfg = TrainConfig(out=out, lr=3e-2, batch_size=8, max_steps=max_steps, warmup_steps=warmup, eval_every=40,
                       save_every=40, seed=0, overwrite=overwrite)
    return mcfg, dcfg, pcfg, tcfg


def previous_demo(out: Path) -> bool:
    """Whether `out` holds a run this command wrote: its record trained on the bundled countries."""
    try:
        return read_json(out / "run_config.json")["DataConfig"]["data"] == str(EXAMPLE_DATA)
    except (SoftpromptError, OSError, KeyError, TypeError):  # no record, or not a demo's
        return False


def demo(out: str = "runs/demo", max_steps: int = 120, model: str = "smollm2-135m-instruct",
         show: int = 6, overwrite: bool = False) -> dict:
    # Run again (`make demo` twice), the demo replaces its own last run; anything else in --out it
    # leaves alone, and says so before the model loads.
    used = Path(out).is_dir() and any(Path(out).iterdir())
    if used and not (overwrite or previous_demo(Path(out))):
        raise SoftpromptError(f"--out {out} already holds files that no demo wrote: pass --overwrite to replace "
                              "a run there, or choose another --out")
    mcfg, dcfg, pcfg, tcfg = demo_configs(out, max_steps, model, overwrite or used)
    t0 = time.perf_counter()
    m, tok = load_model(mcfg, cpu_bf16=cpu_bf16_method(resolve_method(pcfg, tcfg)[0].method))  # as train loads it
    fmt, train_ex, eval_ex = load_splits(dcfg, tok, tcfg.seed)
    print(f"model {mcfg.model} ({sum(p.numel() for p in m.parameters()) / 1e6:.3g}M params, frozen); "
          f"{len(train_ex)} training / {len(eval_ex)} held-out examples from {EXAMPLE_DATA.name}")
    summary = train(mcfg, dcfg, pcfg, tcfg, model=m, tok=tok)
    prompt = load_prompt(out, m)
    # train() scored the untuned model first, and the kept prompt records its held-out score.
    before, after = summary["untuned_eval"], prompt.meta["eval"]
    print(f"held-out loss of the untuned model: {before['loss']:.4f} (perplexity {before['perplexity']:.2f})")
    print(f"held-out loss with the tuned prompt: {after['loss']:.4f} (perplexity {after['perplexity']:.2f}); "
          f"{summary['steps']} steps in {summary['train_seconds']:.0f} s, "
          f"base weights unchanged: {summary['base_weights_unchanged']}")
    texts = [ex.text for ex in eval_ex[:show]]
    gcfg = GenerateConfig(max_new_tokens=24)
    tuned = forward_input(prompt)  # [P, H], or a prefix itself (its keys and values are the decoder's cache)
    rows = [(q, encode_for_generation(tok, t)) for t in texts for q in (None, tuned)]
    outs = generate_batch(m, tok, rows, gcfg, PromptKV(m))
    print("\nbaseline (untuned) vs tuned, greedy, held-out countries:")
    for i, t in enumerate(texts):
        print(f"=== {t!r}")
        print(f"--- baseline: {tok.decode(outs[2 * i], skip_special_tokens=True)!r}")
        print(f"--- tuned:    {tok.decode(outs[2 * i + 1], skip_special_tokens=True)!r}")
    print(f"\nprompt, metrics.jsonl and loss.png in {out}/ ({time.perf_counter() - t0:.0f} s in all)")
    return {"before": before, "after": after, "summary": summary}


# ---------------------------------------------------------------- the `demo` command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder")
    parser.add_argument("--max-steps", type=int, default=120, help="training steps (0: one pass over the data)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model (default: the built-in one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (a previous "
                                                                 "demo's is replaced without it)")


def run(args: argparse.Namespace) -> int:
    demo(out=args.out, max_steps=args.max_steps, model=args.model, overwrite=args.overwrite)
    return 0
