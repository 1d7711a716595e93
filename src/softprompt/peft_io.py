"""PEFT interoperability: read and write PEFT's prompt-tuning and prefix-tuning adapter layouts.

A PEFT prompt-tuning adapter is `adapter_config.json` (peft_type PROMPT_TUNING) plus
`adapter_model.safetensors` holding one tensor, `prompt_embeddings` [P, H] — the same tensor a
softprompt folder holds, so conversion is exact both ways. A prefix (kind "prefix") is PEFT's
PREFIX_TUNING, whose layout peft_prefix.py reads and writes. No `peft` import is needed here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import BUILTIN_MODEL
from . import peft_prefix
from .families import kv_head_count, layer_and_head_counts
from .hub import download, is_hub
from .inits import peft_init
from .models import builtin_model_dir
from .prefix import TENSOR_NAME as PREFIX_TENSOR
from .prompt import CONFIG_FILE, FORMAT, TENSOR_NAME, SoftPrompt, load_prompt, read_prompt_tensor
from .utils import SoftpromptError, atomic_dir, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def model_config(name: str) -> dict:
    """A local model folder's config.json (the built-in model's too), or {} when it cannot be read."""
    try:
        folder = builtin_model_dir() if name == BUILTIN_MODEL else Path(name)
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, SoftpromptError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def model_geometry(name: str) -> dict:
    """num_layers / num_attention_heads for PEFT's config, read from a local model folder if we can."""
    cfg = model_config(name)
    if not cfg:
        return {}
    layers, heads = layer_and_head_counts(cfg)
    return {"num_layers": layers, "num_attention_heads": heads}


def export_prefix(prompt, out: str | Path, model: str) -> Path:
    """A prefix -> PEFT PREFIX_TUNING adapter folder (atomically)."""
    from safetensors.torch import save_file

    cfg, flat = peft_prefix.adapter(prompt, model, model_geometry(model))
    with atomic_dir(out) as tmp:
        save_file({TENSOR_NAME: flat}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "softprompt_config.json").write_text(json.dumps(prompt.meta, indent=2, default=str) + "\n")
    return Path(out)


def export_peft(prompt_dir: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """softprompt folder -> PEFT adapter folder (written atomically)."""
    from safetensors.torch import save_file

    prompt = load_prompt(prompt_dir)
    if prompt.kind == peft_prefix.KIND:
        return export_prefix(prompt, out, base_model or prompt.meta.get("model", ""))
    embeds = prompt.input_embeds()
    if embeds is None:  # PEFT's prompt tuning is input embeddings: other kinds have no such adapter
        raise SoftpromptError(f"{prompt_dir}: a {prompt.kind!r} prompt has no input embeddings to export as "
                              "PEFT prompt tuning")
    meta = prompt.meta
    model = base_model or meta.get("model", "")
    init = meta.get("init", "random")
    cfg = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model,
        "num_virtual_tokens": prompt.length,
        "token_dim": prompt.hidden_size,
        "num_transformer_submodules": 1,
        **model_geometry(model),
        "prompt_tuning_init": peft_init(init),
        "prompt_tuning_init_text": meta.get("init_text") if init == "text" else None,
        "tokenizer_name_or_path": model if init == "text" else None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    with atomic_dir(out) as tmp:
        save_file({TENSOR_NAME: embeds.detach().contiguous()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        # Keep our own record beside PEFT's so a round trip loses nothing.
        (tmp / "softprompt_config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out)


def import_peft(peft_dir: str | Path, out: str | Path, model_name: str | None = None) -> Path:
    """PEFT prompt-tuning adapter folder (or `hf://REPO_ID[@REV]`) -> softprompt folder (written atomically)."""
    from safetensors.torch import save_file

    source = str(peft_dir)
    peft_dir = download(peft_dir) if is_hub(peft_dir) else Path(peft_dir)
    cfg = read_json(peft_dir / ADAPTER_CONFIG)
    if not isinstance(cfg, dict) or cfg.get("peft_type") not in ("PROMPT_TUNING", peft_prefix.PEFT_TYPE):
        found = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise SoftpromptError(f"{peft_dir / ADAPTER_CONFIG}: peft_type is {found!r}, only PROMPT_TUNING and "
                              "PREFIX_TUNING adapters can be imported")
    weights = peft_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise SoftpromptError(f"{peft_dir}: adapter_model.bin is a pickle file, which softprompt does not "
                                  "read; re-save the adapter with safe_serialization=True")
        raise SoftpromptError(f"missing adapter file: {weights}")
    if cfg["peft_type"] == peft_prefix.PEFT_TYPE:
        return import_prefix(cfg, peft_dir, weights, out, model_name or cfg.get("base_model_name_or_path") or "",
                             source)
    t = read_prompt_tensor(weights, "adapter")
    P = cfg.get("num_virtual_tokens", t.shape[0]) * cfg.get("num_transformer_submodules", 1)
    if t.shape[0] != P:
        raise SoftpromptError(f"{weights}: prompt_embeddings has shape {list(t.shape)}, expected [{P}, hidden]")
    ours = peft_dir / "softprompt_config.json"
    meta = read_json(ours) if ours.is_file() else {"init": "peft"}
    meta.update({"format": FORMAT, "kind": SoftPrompt.kind,
                 "model": model_name or cfg.get("base_model_name_or_path", ""),
                 "num_virtual_tokens": t.shape[0], "hidden_size": t.shape[1], "imported_from": source})
    with atomic_dir(out) as tmp:
        save_file({TENSOR_NAME: t.contiguous()}, str(tmp / "prompt.safetensors"))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out)


def import_prefix(cfg: dict, peft_dir: Path, weights: Path, out: str | Path, model: str, source: str) -> Path:
    """A PEFT PREFIX_TUNING adapter -> prefix folder (atomically); checked against the base model's
    layer and key/value head counts when its config can be read."""
    from safetensors.torch import save_file

    base = model_config(model)
    geometry = ({"num_layers": layer_and_head_counts(base)[0], "num_key_value_heads": kv_head_count(base)}
                if base else {})
    kv, meta = peft_prefix.read_adapter(cfg, weights, peft_dir / ADAPTER_CONFIG, geometry)
    ours = peft_dir / "softprompt_config.json"
    record = read_json(ours) if ours.is_file() else {"init": "peft"}
    record.update({"format": FORMAT, **meta, "model": model, "num_virtual_tokens": kv.shape[3],
                   "hidden_size": base.get("hidden_size") or record.get("hidden_size"), "imported_from": source})
    with atomic_dir(out) as tmp:
        save_file({PREFIX_TENSOR: kv}, str(tmp / "prompt.safetensors"))
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Path(out)


# ---------------------------------------------------------------- the `export-peft` and `import-peft` commands

def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt_dir", metavar="DIR", help="softprompt prompt folder or hf://REPO_ID[@REV]")
    parser.add_argument("out", metavar="OUT", help="PEFT adapter folder to write")
    parser.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the prompt's)")


def run_export(args: argparse.Namespace) -> int:
    print(export_peft(args.prompt_dir, args.out, args.base_model))
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("peft_dir", metavar="PEFT_DIR",
                        help="folder with adapter_config.json + adapter_model.safetensors, or hf://REPO_ID[@REV]")
    parser.add_argument("out", metavar="OUT", help="softprompt prompt folder to write")
    parser.add_argument("--model", default=None, help="model name to record (default: the adapter's base model)")


def run_import(args: argparse.Namespace) -> int:
    print(import_peft(args.peft_dir, args.out, args.model))
    return 0
