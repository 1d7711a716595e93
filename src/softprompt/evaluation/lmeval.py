"""The `softprompt lm-eval` command: lm-evaluation-harness's `simple_evaluate` with the `softprompt`
model (lmeval_model.py), taking lm_eval's own flags (`--model_args pretrained=MODEL,prompt=DIR
--tasks ... --include_path ...`).

lm_eval finds models by name in its own registry and loads no plugins, so `lm_eval --model
softprompt` cannot see this one: this command registers it and calls lm_eval's Python API with
the same arguments. Needs the lm-eval extra.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..core.utils import SoftpromptError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    # lm_eval's own flag names, so that a command line moves between the two unchanged; no abbreviations,
    # as lm_eval's --model (which this command does not take) would otherwise be read as --model_args.
    parser.allow_abbrev = False
    parser.add_argument("--model_args", default="", help="pretrained=MODEL,prompt=DIR or hf://REPO_ID (and dtype=, "
                                                         "device=, chat=, max_length=)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    parser.add_argument("--include_path", default=None, help="folder of extra task YAML files")
    parser.add_argument("--num_fewshot", type=int, default=None, help="examples in context")
    parser.add_argument("--limit", type=float, default=None, help="at most this many rows per task (or a fraction)")
    parser.add_argument("--batch_size", default="16", help="rows per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--output_path", default="", help="folder (or .json file) for the results, and with "
                        "--log_samples the samples, written by lm_eval's own EvaluationTracker as lm_eval writes them")
    parser.add_argument("--log_samples", action="store_true", help="also write every request and answer "
                                                                   "(needs --output_path)")
    parser.add_argument("--apply_chat_template", nargs="?", const=True, default=False, metavar="TEMPLATE",
                        help="render contexts through the model's chat template (lm_eval's multi-turn few-shot); "
                             "the prompt's own chat wrapping is then off")
    parser.add_argument("--fewshot_as_multiturn", action="store_true", help="few-shot examples as chat turns")
    parser.add_argument("--system_instruction", default=None, help="system message before each context")
    parser.add_argument("--gen_kwargs", default=None, help="generation settings for generate_until tasks, "
                                                           "as 'temperature=0,max_gen_toks=64'")
    parser.add_argument("--seed", type=int, default=0, help="seed for lm_eval's sampling of few-shot examples")


def task_manager(manager_class: Any, tasks: list[str], include_path: str | None) -> Any:
    """lm_eval's index of the tasks. Tasks that are all plain tasks of --include_path are read from that
    folder alone: indexing lm_eval's own ~13k task files was half of an 18 s run on a local task here."""
    if include_path:
        local = manager_class(include_path=include_path, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    return manager_class(include_path=include_path)


def evaluate_tasks(model_args: str, tasks: list[str], include_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """lm_eval's simple_evaluate with the `softprompt` model."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SoftpromptError("lm-eval needs lm-evaluation-harness: pip install 'softprompt[lm-eval]'") from None

    from . import lmeval_model  # noqa: F401  (registers the model)

    manager = task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SoftpromptError(f"--tasks: unknown lm_eval task(s) {', '.join(unknown)}"
                              + ("" if include_path else " (a local task needs --include_path FOLDER)"))
    seed = kw.pop("seed", 0)
    return simple_evaluate(model="softprompt", model_args=model_args, tasks=tasks, task_manager=manager,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                           **kw)


def run(args: argparse.Namespace) -> int:
    if args.log_samples and not args.output_path:
        raise SoftpromptError("--log_samples needs --output_path (where lm_eval writes the samples)")
    model_args = args.model_args
    asked = dict(a.split("=", 1) for a in model_args.split(",") if "=" in a)
    if args.apply_chat_template and "chat" not in asked:  # lm_eval renders the template: not twice
        model_args = ",".join(a for a in (model_args, "chat=False") if a)
    elif args.apply_chat_template and asked["chat"].lower() in ("true", "yes", "1"):  # lmeval_model.SWITCH's
        raise SoftpromptError("--apply_chat_template renders each context through the chat template, and "
                              "--model_args chat=true would wrap that rendering again: give one of them")
    tracker = None
    if args.output_path:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=args.output_path)
    res = evaluate_tasks(model_args, [t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path,
                         num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size, device=args.device,
                         seed=args.seed, log_samples=args.log_samples, evaluation_tracker=tracker,
                         apply_chat_template=args.apply_chat_template,
                         fewshot_as_multiturn=args.fewshot_as_multiturn or bool(args.apply_chat_template),
                         system_instruction=args.system_instruction, gen_kwargs=args.gen_kwargs)
    from lm_eval.utils import make_table

    print(make_table(res))
    if tracker is not None:  # as lm_eval's own command line saves them
        samples = res.pop("samples", None) if args.log_samples else None
        tracker.save_results_aggregated(results=res, samples=samples)
        for task in res.get("configs", {}) if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return 0
