"""PEFT interoperability: read and write PEFT's prompt-tuning adapter layout.

A PEFT prompt-tuning adapter is `adapter_config.json` (peft_type PROMPT_TUNING) plus
`adapter_model.safetensors` holding one tensor, `prompt_embeddings` [P, H] — the same tensor a
softprompt folder holds, so conversion is exact both ways. No `peft` import is needed here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .inits import peft_init
from .prompt import CONFIG_FILE, TENSOR_NAME, load_prompt, read_prompt_tensor
from .utils import SoftpromptError, atomic_dir, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _model_geometry(name: str) -> dict:
    """num_layers / num_attention_heads for PEFT's config, read from a local model folder if we can."""
    from .config import BUILTIN_MODEL
    from .models import cache_root

    try:  # the built-in model's converted copy, when there is one (converting it here would take ~20 s)
        folder = cache_root() / "models" / BUILTIN_MODEL if name == BUILTIN_MODEL else Path(name)
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, SoftpromptError):
        return {}
    # The names differ by family: num_hidden_layers (Llama...), n_layer (GPT-2, BLOOM), n_layers (MPT).
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "n_layers") if cfg.get(k)), None)
    heads = next((cfg[k] for k in ("num_attention_heads", "n_head", "n_heads") if cfg.get(k)), None)
    return {"num_layers": layers, "num_attention_heads": heads}


def export_peft(prompt_dir: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """softprompt folder -> PEFT adapter folder (written atomically): the one adapter_config.json
    writer, which `push` uses too."""
    from safetensors.torch import save_file

    from .hub import hub_model_id

    prompt = load_prompt(prompt_dir)
    meta = prompt.meta
    # A Hub id that AutoPeftModelForCausalLM can resolve (the built-in model's original), not our alias.
    model = base_model or hub_model_id(meta.get("model", ""))
    init = meta.get("init", "random")
    cfg = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model,
        "num_virtual_tokens": prompt.num_tokens,
        "token_dim": prompt.hidden_size,
        "num_transformer_submodules": 1,
        **_model_geometry(meta.get("model", "") if model == hub_model_id(meta.get("model", "")) else model),
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
        save_file({TENSOR_NAME: prompt.embeds.detach().contiguous()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        # Keep our own record beside PEFT's so a round trip loses nothing.
        (tmp / "softprompt_config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out)


def import_peft(peft_dir: str | Path, out: str | Path, model_name: str | None = None) -> Path:
    """PEFT prompt-tuning adapter folder (or `hf://REPO_ID[@REV]`) -> softprompt folder (written atomically)."""
    from safetensors.torch import save_file

    from .hub import download, is_hub

    source = str(peft_dir)
    peft_dir = download(peft_dir) if is_hub(peft_dir) else Path(peft_dir)
    cfg = read_json(peft_dir / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise SoftpromptError(f"{peft_dir / ADAPTER_CONFIG}: peft_type is {cfg.get('peft_type')!r}, "
                              "only PROMPT_TUNING adapters can be imported")
    weights = peft_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise SoftpromptError(f"{peft_dir}: adapter_model.bin is a pickle file, which softprompt does not "
                                  "read; re-save the adapter with safe_serialization=True")
        raise SoftpromptError(f"missing adapter file: {weights}")
    t = read_prompt_tensor(weights, "adapter")
    P = cfg.get("num_virtual_tokens", t.shape[0]) * cfg.get("num_transformer_submodules", 1)
    if t.shape[0] != P:
        raise SoftpromptError(f"{weights}: prompt_embeddings has shape {list(t.shape)}, expected [{P}, hidden]")
    ours = peft_dir / "softprompt_config.json"
    meta = read_json(ours) if ours.is_file() else {"init": "peft"}
    meta.update({"format": "softprompt/1", "model": model_name or cfg.get("base_model_name_or_path", ""),
                 "num_virtual_tokens": t.shape[0], "hidden_size": t.shape[1], "imported_from": source})
    with atomic_dir(out) as tmp:
        save_file({TENSOR_NAME: t.contiguous()}, str(tmp / "prompt.safetensors"))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
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
