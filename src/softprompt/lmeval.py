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

from .utils import SoftpromptError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    # lm_eval's own flag names, so that a command line moves between the two unchanged.
    parser.add_argument("--model_args", default="", help="pretrained=MODEL,prompt=DIR or hf://REPO_ID (and dtype=, "
                                                         "device=, chat=, max_length=)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    parser.add_argument("--include_path", default=None, help="folder of extra task YAML files")
    parser.add_argument("--num_fewshot", type=int, default=None, help="examples in context")
    parser.add_argument("--limit", type=float, default=None, help="at most this many rows per task (or a fraction)")
    parser.add_argument("--batch_size", default="16", help="rows per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--output_path", default="", help="write the results JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed for lm_eval's sampling of few-shot examples")


def evaluate_tasks(model_args: str, tasks: list[str], include_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """lm_eval's simple_evaluate with the `softprompt` model."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SoftpromptError("lm-eval needs lm-evaluation-harness: pip install 'softprompt[lm-eval]'") from None

    from . import lmeval_model  # noqa: F401  (registers the model)

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SoftpromptError(f"--tasks: unknown lm_eval task(s) {', '.join(unknown)}"
                              + ("" if include_path else " (a local task needs --include_path FOLDER)"))
    seed = kw.pop("seed", 0)
    return simple_evaluate(model="softprompt", model_args=model_args, tasks=tasks, task_manager=manager,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                           **kw)


def run(args: argparse.Namespace) -> int:
    res = evaluate_tasks(args.model_args, [t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path,
                         num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size, device=args.device,
                         seed=args.seed)
    from lm_eval.utils import make_table

    print(make_table(res))
    if args.output_path:
        from .utils import write_json

        write_json(args.output_path, {k: res[k] for k in ("results", "versions", "n-shot", "configs") if k in res})
    return 0
