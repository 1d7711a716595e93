"""Ablations in the spirit of Lester et al. 2021 (figure 3) on SST-2, plus prompt ensembling, in one command:

    PYTHONPATH=src python experiments/ablations.py            # defaults: SST-2 subset, dev.tsv, built-in model

- prompt length P in --lengths (default 1, 5, 20, 100), all with --length-init (default labels);
- initialisation in --inits (default random, vocab, text, labels), all at P = --ensemble-length (20);
- ensembling: the prompts of that length (one per init) scored together in one batch per group of
  rows, majority vote and mean log-probability against the best single prompt.
Every run uses the same training subset, seed, steps and learning rate, and is scored once, after
its last step, on the held-out data (no checkpoint picked on it). The untuned model is the P = 0
reference. Writes ablations.md, ablations.json and ablations.png (plus one run folder per prompt
under runs/) into --out; --reuse skips runs whose summary.json is already there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", default="smollm2-135m-instruct")
    a("--device", default="cpu")
    a("--data", default=str(SST2 / "train.tsv"))
    a("--eval-data", default=str(SST2 / "dev.tsv"), help="held-out file ('' = hold out --eval-fraction of --data)")
    a("--eval-fraction", type=float, default=0.0)
    a("--template", default="Review: {sentence}\\nSentiment:")
    a("--labels", default="negative,positive")
    a("--label-col", default="label")
    a("--limit", type=int, default=5000, help="training rows (after a seeded shuffle)")
    a("--eval-limit", type=int, default=0, help="held-out rows (0 = all; SST-2 dev has 872)")
    a("--max-length", type=int, default=96)
    a("--lengths", default="1,5,20,100", help="prompt lengths P for the length ablation")
    a("--length-init", default="labels", help="initialisation used for the length ablation")
    a("--inits", default="random,vocab,text,labels", help="initialisations for the init ablation")
    a("--ensemble-length", type=int, default=20, help="P of the init ablation; its prompts form the ensemble")
    a("--max-steps", type=int, default=300)
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-2)
    a("--schedule", default="cosine")
    a("--loss", default="classes")
    a("--seed", type=int, default=0)
    a("--out", default=str(ROOT / "experiments" / "results" / "ablations"))
    a("--reuse", action="store_true", help="skip runs whose summary.json exists in --out")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
    from softprompt.data.formatting import load_splits
    from softprompt.evaluation.ensemble import ensemble_report, ensemble_scores, format_report
    from softprompt.evaluation.evaluate import evaluate
    from softprompt.base.models import load_model
    from softprompt.prompts.prompt import load_prompt
    from softprompt.training.train import train
    from softprompt.core.utils import atomic_write_text, write_json

    out = Path(args.out)
    mcfg = ModelConfig(model=args.model, device=args.device)
    dcfg = DataConfig(data=args.data, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
                      template=args.template, labels=args.labels, label_col=args.label_col, limit=args.limit,
                      eval_limit=args.eval_limit, max_length=args.max_length)
    model, tok = load_model(mcfg)
    splits = load_splits(dcfg, tok, args.seed)
    fmt, train_ex, eval_ex = splits
    print(f"[ablations] {len(train_ex)} training / {len(eval_ex)} held-out examples", flush=True)
    untuned = evaluate(model, tok, None, fmt, eval_ex)

    lengths = [int(x) for x in args.lengths.split(",") if x]
    inits = [x for x in args.inits.split(",") if x]
    plan = [(P, args.length_init) for P in lengths]
    plan += [(args.ensemble_length, i) for i in inits if (args.ensemble_length, i) not in plan]
    runs = []
    for P, init in plan:
        run_dir = out / "runs" / f"P{P}-{init}"
        tcfg = TrainConfig(out=str(run_dir), method="prompt", lr=args.lr, batch_size=args.batch_size,
                           max_steps=args.max_steps,
                           schedule=args.schedule, loss=args.loss, seed=args.seed, eval_every=0, keep_best=False,
                           save_every=0, eval_untuned=False)
        if args.reuse and (run_dir / "summary.json").is_file():
            s = json.loads((run_dir / "summary.json").read_text())
        else:
            s = train(mcfg, dcfg, PromptConfig(virtual_tokens=P, init=init), tcfg, model=model, tok=tok,
                      quiet=True, splits=splits)
        ev = s["final_eval"]
        runs.append({"virtual_tokens": P, "init": init, "accuracy": ev["accuracy"], "loss": ev["loss"],
                     "trainable_params": s["trainable_params"], "train_seconds": s["train_seconds"],
                     "steps": s["steps"], "dir": str(run_dir)})
        print(f"[ablations] P={P:<4} init={init:<7} accuracy {100 * ev['accuracy']:.2f}%  "
              f"({s['train_seconds']:.0f} s)", flush=True)

    ens_runs = [r for r in runs if r["virtual_tokens"] == args.ensemble_length]
    ensemble = None
    if len(ens_runs) >= 2:
        prompts = [load_prompt(r["dir"], model).embeds.detach() for r in ens_runs]
        scores = ensemble_scores(model, prompts, fmt, eval_ex)
        gold = torch.tensor([e.label for e in eval_ex])
        ensemble = ensemble_report(scores, gold, [f"P={r['virtual_tokens']} init={r['init']}" for r in ens_runs])

    result = {"model": args.model, "data": args.data, "eval_data": args.eval_data or f"{args.data} (held out)",
              "train_examples": len(train_ex), "eval_examples": len(eval_ex), "untuned": untuned,
              "config": vars(args), "runs": runs, "ensemble": ensemble}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablations.json", result)
    atomic_write_text(out / "ablations.md", markdown(result, args, format_report))
    plot(result, args, out / "ablations.png")
    print((out / "ablations.md").read_text())
    return result


def markdown(r: dict, args, format_report) -> str:
    pct = lambda x: f"{100 * x:.2f}%"
    lines = [f"Model `{r['model']}`; {r['train_examples']} training examples, {args.max_steps} steps at batch "
             f"{args.batch_size}, lr {args.lr} ({args.schedule}, loss {args.loss}); accuracy on "
             f"{r['eval_examples']} rows of `{r['eval_data']}` after the last step. "
             f"Untuned model (P = 0): {pct(r['untuned']['accuracy'])}.", "",
             f"### Prompt length (init {args.length_init})", "", "| P | trainable params | accuracy | train time |",
             "| --- | --- | --- | --- |"]
    for x in r["runs"]:
        if x["init"] == args.length_init and x["virtual_tokens"] in [int(v) for v in args.lengths.split(",")]:
            lines.append(f"| {x['virtual_tokens']} | {x['trainable_params']:,} | {pct(x['accuracy'])} | "
                         f"{x['train_seconds']:.0f} s |")
    lines += ["", f"### Initialisation (P = {args.ensemble_length})", "", "| init | accuracy | held-out loss |",
              "| --- | --- | --- |"]
    lines += [f"| {x['init']} | {pct(x['accuracy'])} | {x['loss']:.4f} |" for x in r["runs"]
              if x["virtual_tokens"] == args.ensemble_length]
    if r["ensemble"]:
        lines += ["", f"### Ensemble of the P = {args.ensemble_length} prompts (one batch per group of rows)", "",
                  format_report(r["ensemble"]).rstrip()]
    return "\n".join(lines) + "\n"


def plot(r: dict, args, dest: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lens = sorted((x["virtual_tokens"], 100 * x["accuracy"]) for x in r["runs"] if x["init"] == args.length_init)
    a.plot([p for p, _ in lens], [v for _, v in lens], "o-", label=f"prompt tuning (init {args.length_init})")
    a.axhline(100 * r["untuned"]["accuracy"], color="gray", ls="--", label="untuned model")
    a.set_xscale("log"), a.set_xlabel("prompt length P (virtual tokens)"), a.set_ylabel("accuracy (%)")
    a.set_xticks([p for p, _ in lens], [str(p) for p, _ in lens]), a.minorticks_off()
    a.set_title("prompt length"), a.grid(alpha=0.3), a.legend(fontsize=8)
    ini = [x for x in r["runs"] if x["virtual_tokens"] == args.ensemble_length]
    bars = b.bar([x["init"] for x in ini], [100 * x["accuracy"] for x in ini], color=[f"C{i}" for i in range(len(ini))])
    b.bar_label(bars, fmt="%.1f", fontsize=8)
    if r["ensemble"]:
        b.axhline(100 * r["ensemble"]["mean_logprob_accuracy"], color="k", ls=":", label="ensemble (mean log-prob)")
        b.legend(fontsize=8)
    b.axhline(100 * r["untuned"]["accuracy"], color="gray", ls="--")
    lo = min([100 * r["untuned"]["accuracy"]] + [100 * x["accuracy"] for x in r["runs"]])
    b.set_ylim(max(0, lo - 5), 101), a.set_ylim(max(0, lo - 5), 101)
    b.set_title(f"initialisation (P = {args.ensemble_length})"), b.set_ylabel("accuracy (%)"), b.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{Path(r['data']).parent.name or r['data']}: prompt tuning ablations ({r['model']})", fontsize=10)
    fig.tight_layout()
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(dest)


if __name__ == "__main__":
    main()
