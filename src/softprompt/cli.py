"""The `softprompt` command line: one sub-command per job, flags generated from the config dataclasses.

Errors the user can fix are printed as one line (`softprompt: error: ...`) with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import (CompareConfig, DataConfig, GenerateConfig, ModelConfig, PromptConfig, ServeConfig,
                     TrainConfig, add_args, from_args)
from .utils import SoftpromptError


# ---------------------------------------------------------------- Python API behind each command

def eval_prompt(mcfg: ModelConfig, dcfg: DataConfig, prompt: str = "none", batch_size: int = 16,
                model=None, tok=None) -> dict[str, Any]:
    """Score `prompt` (a folder, or 'none' for the untuned model) on every row of `dcfg.data`."""
    from dataclasses import replace

    from .data import load_splits
    from .evaluate import evaluate
    from .models import load_model
    from .prompt import load_prompt

    if model is None:
        model, tok = load_model(mcfg)
    p = None if prompt in ("", "none") else load_prompt(prompt, model).to(model.device)
    fmt, rows, _ = load_splits(replace(dcfg, eval_fraction=0.0, eval_data=""), tok)
    return {"prompt": prompt, "model": mcfg.model, "data": dcfg.data,
            **evaluate(model, tok, p, fmt, rows, batch_size=batch_size, progress=True)}


def generate_cmd(mcfg: ModelConfig, gcfg: GenerateConfig, texts: list[str], prompt: str = "",
                 compare: bool = False, chat: bool = False, model=None, tok=None) -> list[dict[str, str]]:
    """Continuations of `texts`; with `compare`, the untuned model's beside the tuned one's."""
    from .decode import PromptKV
    from .generate import encode_for_generation, generate_batch
    from .models import load_model
    from .prompt import load_prompt

    if not texts:
        raise SoftpromptError("give at least one TEXT to continue")
    if model is None:
        model, tok = load_model(mcfg)
    if compare and not prompt:
        raise SoftpromptError("--compare needs --prompt DIR")
    sp = load_prompt(prompt, model) if prompt and prompt != "none" else None
    p = sp.embeds.detach() if sp is not None else None
    chat = chat or bool(sp is not None and sp.meta.get("chat"))
    variants = [("baseline", None), ("tuned", p)] if compare else [("tuned" if p is not None else "baseline", p)]
    rows = [(q, encode_for_generation(tok, t, chat)) for t in texts for _, q in variants]
    outs = generate_batch(model, tok, rows, gcfg, PromptKV(model))  # baseline and tuned share one batch
    res = []
    for i, t in enumerate(texts):
        r = {"input": t}
        for j, (name, _) in enumerate(variants):
            r[name] = tok.decode(outs[i * len(variants) + j], skip_special_tokens=True)
        res.append(r)
    return res


def parse_prompt_specs(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` pairs from repeated --prompt flags."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SoftpromptError(f"--prompt {spec!r}: expected NAME=DIR")
        if name in out:
            raise SoftpromptError(f"--prompt {name!r} given twice")
        out[name] = path
    return out


def serve_cmd(mcfg: ModelConfig, scfg: ServeConfig, prompt_specs: list[str]) -> None:
    """Serve the prompts from one frozen model over HTTP until interrupted."""
    import importlib.util
    import os
    from dataclasses import replace

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SoftpromptError(f"softprompt serve needs {' and '.join(missing)}: pip install 'softprompt[serve]'")
    prompts = parse_prompt_specs(prompt_specs)
    if not scfg.admin_token and os.environ.get("SOFTPROMPT_ADMIN_TOKEN"):
        scfg = replace(scfg, admin_token=os.environ["SOFTPROMPT_ADMIN_TOKEN"])
    from .models import load_model
    from .serve import serve

    model, tok = load_model(mcfg)
    # Clients pass this as `model` for no prompt: a Hub id or the built-in name as is, a local path's last part.
    local = Path(mcfg.model).expanduser().exists()
    serve(model, tok, prompts, scfg, Path(mcfg.model).name if local else mcfg.model)


# ---------------------------------------------------------------- argument parsing

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning for frozen causal language models.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a soft prompt", description="Train a soft prompt on a frozen model.")
    for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig):
        add_args(p, cls)

    p = sub.add_parser("eval", help="score a prompt (or the untuned model) on data",
                       description="Held-out loss, perplexity and (with --labels) rank-classification accuracy.")
    add_args(p, ModelConfig)
    add_args(p, DataConfig, skip=("eval_data", "eval_fraction", "eval_limit"))
    p.add_argument("--prompt", default="none", help="prompt folder, or 'none' for the untuned model")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = sub.add_parser("generate", help="generate text, optionally baseline vs tuned",
                       description="Continue each TEXT; greedy unless --sample.")
    add_args(p, ModelConfig)
    add_args(p, GenerateConfig)
    p.add_argument("--prompt", default="", help="prompt folder (default: none, the untuned model)")
    p.add_argument("--compare", action="store_true", help="show the untuned model's output beside the tuned one")
    p.add_argument("--chat", action="store_true", help="wrap TEXT in the model's chat template")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="inputs to continue")

    p = sub.add_parser("serve", help="serve prompts over HTTP (OpenAI-compatible, batched)",
                       description="Serve many soft prompts from one frozen model over HTTP: OpenAI-compatible "
                                   "/v1/completions and /v1/chat/completions (model = prompt name), /v1/classify, "
                                   "/v1/models, /health, /metrics; API docs at /docs. Needs the serve extra.")
    add_args(p, ModelConfig)
    add_args(p, ServeConfig)
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=DIR",
                   help="a prompt folder to serve under NAME (repeatable)")

    p = sub.add_parser("export-peft", help="write a prompt as a PEFT prompt-tuning adapter")
    p.add_argument("prompt_dir", metavar="DIR", help="softprompt prompt folder")
    p.add_argument("out", metavar="OUT", help="PEFT adapter folder to write")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the prompt's)")

    p = sub.add_parser("import-peft", help="convert a PEFT prompt-tuning adapter into a softprompt folder")
    p.add_argument("peft_dir", metavar="PEFT_DIR", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", help="softprompt prompt folder to write")
    p.add_argument("--model", default=None, help="model name to record (default: the adapter's base model)")

    p = sub.add_parser("compare", help="prompt engineering vs prompt tuning vs full fine-tuning, measured",
                       description="Run prompt engineering (zero-/k-shot), prompt tuning and full fine-tuning on one "
                                   "split; report trainable parameters, artifact size, peak memory, training time, "
                                   "inference time per example and quality as compare.md, compare.json and "
                                   "compare.png in --out. Prompt tuning takes the train flags (--max-steps, --lr, ...); "
                                   "full fine-tuning the same ones with --ft-lr/--ft-steps/--ft-batch-size.")
    for cls in (ModelConfig, DataConfig, PromptConfig):
        add_args(p, cls)
    add_args(p, TrainConfig, skip=("out", "method", "resume", "keep_best", "save_every", "eval_every", "patience",
                                   "eval_untuned"))
    add_args(p, CompareConfig)

    p = sub.add_parser("ensemble", help="score K prompts together: each alone, majority vote, mean log-prob",
                       description="Score every row of --data with K prompt folders in one batch per group of rows; "
                                   "report each prompt's accuracy, the best single one, and the ensemble's by "
                                   "majority vote and by mean log-probability.")
    add_args(p, ModelConfig)
    add_args(p, DataConfig, skip=("eval_data", "eval_fraction", "eval_limit"))
    p.add_argument("prompts", nargs="+", metavar="DIR", help="prompt folders (two or more)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    p = sub.add_parser("inspect", help="nearest vocabulary tokens of each virtual token",
                       description="For each virtual token of a prompt, its nearest vocabulary tokens by cosine "
                                   "similarity to the model's input embeddings.")
    p.add_argument("prompt_dir", metavar="DIR", help="prompt folder")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the model the prompt was trained for")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--top-k", type=int, default=5, help="neighbours per virtual token")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("demo", help="train and compare a prompt on the built-in model, offline",
                       description="Offline demo: train a soft prompt on the built-in model and the bundled "
                                   "countries data, then compare held-out loss and generations.")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--max-steps", type=int, default=120, help="training steps")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model (default: the built-in one)")
    return ap


def _print_eval(m: dict[str, Any]) -> None:
    line = f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  ({m['tokens']} tokens)"
    if "accuracy" in m:
        line += f"  accuracy {100 * m['accuracy']:.2f}% of {m['n']}"
    print(line)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        from .train import train

        s = train(from_args(ModelConfig, args), from_args(DataConfig, args), from_args(PromptConfig, args),
                  from_args(TrainConfig, args))
        if "final_eval" in s:
            print(json.dumps({k: s[k] for k in ("steps", "train_seconds", "tokens_per_second", "final_eval",
                                                "best_eval_score", "base_weights_unchanged", "prompt_dir")}))
    elif args.cmd == "eval":
        m = eval_prompt(from_args(ModelConfig, args), from_args(DataConfig, args), args.prompt, args.batch_size)
        print(json.dumps(m)) if args.json else _print_eval(m)
    elif args.cmd == "generate":
        res = generate_cmd(from_args(ModelConfig, args), from_args(GenerateConfig, args), args.texts,
                           args.prompt, args.compare, args.chat)
        if args.json:
            print(json.dumps(res, indent=2))
        for r in [] if args.json else res:
            print(f"=== {r['input']!r}")
            for k in ("baseline", "tuned"):
                if k in r:
                    print(f"--- {k}: {r[k]!r}")
    elif args.cmd == "serve":
        serve_cmd(from_args(ModelConfig, args), from_args(ServeConfig, args), args.prompt)
    elif args.cmd == "export-peft":
        from .peft_io import export_peft

        print(export_peft(args.prompt_dir, args.out, args.base_model))
    elif args.cmd == "import-peft":
        from .peft_io import import_peft

        print(import_peft(args.peft_dir, args.out, args.model))
    elif args.cmd == "compare":
        from .compare import compare, markdown_table

        # --out is the comparison's folder; each method's run folder is made inside it.
        r = compare(from_args(ModelConfig, args), from_args(DataConfig, args), from_args(PromptConfig, args),
                    from_args(TrainConfig, args), from_args(CompareConfig, args))
        print(markdown_table(r))
    elif args.cmd == "ensemble":
        from .ensemble import ensemble_cmd, format_report

        r = ensemble_cmd(from_args(ModelConfig, args), from_args(DataConfig, args), args.prompts)
        print(json.dumps(r)) if args.json else print(format_report(r), end="")
    elif args.cmd == "inspect":
        from .interpret import format_inspection, inspect_cmd

        r = inspect_cmd(args.prompt_dir, args.model, args.top_k, args.device)
        print(json.dumps(r, indent=2)) if args.json else print(format_inspection(r), end="")
    elif args.cmd == "demo":
        from .demo import demo

        demo(out=args.out, max_steps=args.max_steps, model=args.model)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except SoftpromptError as e:
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
