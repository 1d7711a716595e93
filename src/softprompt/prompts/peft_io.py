"""PEFT interoperability: read and write PEFT's prompt-tuning and prefix-tuning adapter layouts, and
read its P-tuning ones.

A PEFT prompt-tuning adapter is `adapter_config.json` (peft_type PROMPT_TUNING) plus
`adapter_model.safetensors` holding one tensor, `prompt_embeddings` [P, H] — the same tensor a
softprompt folder holds, so conversion is exact both ways. A prefix (kind "prefix") is PEFT's
PREFIX_TUNING, whose layout peft_prefix.py reads and writes. A P_TUNING adapter (PEFT's
PromptEncoder) is imported as the soft prompt its encoder produces (peft_ptuning.py). No `peft`
import is needed here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..base.families import config_geometry, geometry_mismatches, layer_and_head_counts
from ..core.config import BUILTIN_MODEL, model_name
from ..core.inits import peft_init
from ..core.utils import SoftpromptError, atomic_dir, cache_root, check_dest, local_path, read_json, short
from . import peft_prefix, peft_ptuning
from .hub import download, hub_model_id, is_hub, local_sources
from .prefix import TENSOR_NAME as PREFIX_TENSOR
from .prompt import CONFIG_FILE, FORMAT, TENSOR_NAME, WEIGHTS_FILE, SoftPrompt, load_prompt, read_prompt_tensor
from .recorded import PEFT_PROMPT_TYPES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OURS = "softprompt_config.json"  # our own record, kept beside PEFT's
EXPORT_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, OURS}  # what export-peft writes, and may replace
IMPORT_FILES = {WEIGHTS_FILE, CONFIG_FILE}


def model_config(name: str) -> dict:
    """A local model folder's config.json (the built-in model's too), or {} when it cannot be read."""
    try:  # the built-in model's converted copy, when there is one (converting it here would take ~20 s)
        folder = cache_root() / "models" / BUILTIN_MODEL if name == BUILTIN_MODEL else Path(name)
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


def check_base_model(prompt, name: str) -> None:
    """--base-model, where its config can be read, fits the prompt (a soft prompt's width; a prefix's
    layers, key/value heads and head dim): PEFT would otherwise fail on the adapter written here."""
    cfg = model_config(name)
    if not cfg:
        return
    if prompt.kind == peft_prefix.KIND:
        L, _, heads, _, d = prompt.key_values().shape
        ours = {"num_layers": L, "num_key_value_heads": heads, "head_dim": d}
    else:
        ours = {"hidden_size": prompt.hidden_size}
    differ = geometry_mismatches(ours, cfg)
    if differ:
        raise SoftpromptError(f"--base-model {short(name)} does not fit this {prompt.kind}: {', '.join(differ)}")


def export_prefix(prompt, out: str | Path, model: str, geometry: dict) -> Path:
    """A prefix -> PEFT PREFIX_TUNING adapter folder (atomically); `geometry`: model_geometry's."""
    from safetensors.torch import save_file

    cfg, flat = peft_prefix.adapter(prompt, model, geometry)
    with atomic_dir(out, overwrite=True) as tmp:  # export_peft's check_dest vouched for what is there
        save_file({TENSOR_NAME: flat}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "softprompt_config.json").write_text(json.dumps(prompt.meta, indent=2, default=str) + "\n")
    return Path(out)


def export_peft(prompt_dir: str | Path, out: str | Path, base_model: str | None = None,
                overwrite: bool = False) -> Path:
    """softprompt folder -> PEFT adapter folder (written atomically), the one adapter_config.json
    writer (`push` uses it too). A folder at `out` that holds
    files is refused unless `overwrite` (and then only if export writes all of them); `out` is never
    the prompt folder, inside it or around it."""
    from safetensors.torch import save_file

    check_dest(out, "OUT", overwrite, EXPORT_FILES, local_sources(prompt_dir))
    prompt = load_prompt(prompt_dir)
    recorded = prompt.meta.get("model", "")
    # A Hub id that AutoPeftModelForCausalLM can resolve (the built-in model's original), not our alias;
    # the geometry read from the recorded model, which is local, unless another base is named.
    model = base_model or hub_model_id(recorded)
    if base_model:
        check_base_model(prompt, base_model)
    geometry = model_geometry(model_name(recorded) if model == hub_model_id(recorded) else model)
    if prompt.kind == peft_prefix.KIND:
        return export_prefix(prompt, out, model, geometry)
    embeds = prompt.input_embeds()
    if embeds is None:  # PEFT's prompt tuning is input embeddings: other kinds have no such adapter
        raise SoftpromptError(f"{prompt_dir}: a {prompt.kind!r} prompt has no input embeddings to export as "
                              "PEFT prompt tuning")
    meta = prompt.meta
    init = meta.get("init", "random")
    said = meta.get("peft_init")  # an imported PEFT adapter's own init, kept through the round trip
    text = init == "text" or said == "TEXT"
    cfg = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model,
        "num_virtual_tokens": prompt.length,
        "token_dim": prompt.hidden_size,
        "num_transformer_submodules": 1,
        **geometry,
        "prompt_tuning_init": said if isinstance(said, str) else peft_init(init),
        "prompt_tuning_init_text": meta.get("init_text") if text else None,
        "tokenizer_name_or_path": model if text else None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    with atomic_dir(out, overwrite=True) as tmp:  # check_dest vouched for what is there
        save_file({TENSOR_NAME: embeds.detach().contiguous()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        # Keep our own record beside PEFT's so a round trip loses nothing.
        (tmp / OURS).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out)


def import_peft(peft_dir: str | Path, out: str | Path, model_name: str | None = None,
                overwrite: bool = False) -> Path:
    """PEFT prompt-tuning adapter folder (or `hf://REPO_ID[@REV]`) -> softprompt folder (written
    atomically; `out` as for export_peft)."""
    from safetensors.torch import save_file

    source = str(peft_dir)
    check_dest(out, "OUT", overwrite, IMPORT_FILES, local_sources(peft_dir))
    peft_dir = download(peft_dir) if is_hub(peft_dir) else Path(peft_dir)
    check_dest(out, "OUT", overwrite, IMPORT_FILES, (peft_dir,))
    if not (peft_dir / ADAPTER_CONFIG).is_file() and (peft_dir / WEIGHTS_FILE).is_file():
        raise SoftpromptError(f"{peft_dir} is a softprompt folder already ({WEIGHTS_FILE}), not a PEFT adapter: "
                              "use it as it is (export-peft writes PEFT's layout)")
    cfg = read_json(peft_dir / ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise SoftpromptError(f"{peft_dir / ADAPTER_CONFIG} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") not in PEFT_PROMPT_TYPES:
        raise SoftpromptError(f"{peft_dir / ADAPTER_CONFIG}: peft_type is {short(cfg.get('peft_type'))}, only "
                              f"{', '.join(PEFT_PROMPT_TYPES)} adapters can be imported")
    weights = peft_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise SoftpromptError(f"{peft_dir}: adapter_model.bin is a pickle file, which softprompt does not "
                                  "read; re-save the adapter with safe_serialization=True")
        raise SoftpromptError(f"missing adapter file: {weights}")
    ours = peft_dir / OURS
    # PEFT's own adapter: its init said as PEFT said it, so that export-peft writes it back (TEXT came back RANDOM)
    said = {"peft_init": cfg.get("prompt_tuning_init"), "init_text": cfg.get("prompt_tuning_init_text")}
    meta = read_json(ours) if ours.is_file() else {"init": "peft", **{k: v for k, v in said.items() if v}}
    if not isinstance(meta, dict):
        raise SoftpromptError(f"{ours} must hold a JSON object, got {type(meta).__name__}")
    model = local_path(model_name or imported_base(cfg, meta))  # a folder named from here: from any folder
    if cfg["peft_type"] == peft_prefix.PEFT_TYPE:
        return import_prefix(cfg, weights, out, model, meta, source)
    ptuning = cfg["peft_type"] == peft_ptuning.PEFT_TYPE
    t = peft_ptuning.read_adapter(cfg, weights) if ptuning else read_prompt_tensor(weights, "adapter")
    subs = cfg.get("num_transformer_submodules") or 1  # PEFT leaves null until a model sets it
    if subs != 1:  # an encoder-decoder's: one prompt per submodule, which no causal prompt stands for
        raise SoftpromptError(f"{peft_dir / ADAPTER_CONFIG}: num_transformer_submodules is {short(subs)}: an "
                              "encoder-decoder adapter, which softprompt cannot import (it prompts causal LMs: 1)")
    P = cfg.get("num_virtual_tokens", t.shape[0])
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise SoftpromptError(f"{peft_dir / ADAPTER_CONFIG}: num_virtual_tokens must be a positive integer, "
                              f"got {short(P)}")
    if t.shape[0] != P:
        raise SoftpromptError(f"{weights}: prompt_embeddings has shape {list(t.shape)}, expected [{P}, hidden]")
    meta.update({"format": FORMAT, "kind": SoftPrompt.kind, "model": model,
                 "num_virtual_tokens": t.shape[0], "hidden_size": t.shape[1], "imported_from": source})
    if ptuning:  # the prompt its encoder produced; the encoder itself is not kept
        meta.setdefault("method", "ptuning")
    with atomic_dir(out, overwrite=True) as tmp:  # check_dest vouched for what is there
        save_file({TENSOR_NAME: t.contiguous()}, str(tmp / "prompt.safetensors"))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out)


def imported_base(cfg: dict, record: dict) -> str:
    """The base an imported adapter was trained on: its base_model_name_or_path (PEFT may write null),
    under our own name where our export wrote it (export-peft records the built-in model by its Hub id,
    and the round trip would otherwise record it as another model)."""
    base = cfg.get("base_model_name_or_path") or ""
    ours = record.get("model")
    return ours if isinstance(ours, str) and ours and hub_model_id(ours) == base else str(base)


def import_prefix(cfg: dict, weights: Path, out: str | Path, model: str, record: dict, source: str) -> Path:
    """A PEFT PREFIX_TUNING adapter -> prefix folder (atomically); checked against the base model's
    layer and key/value head counts when its config can be read."""
    from safetensors.torch import save_file

    base = model_config(model)
    geometry = {k: v for k, v in config_geometry(base).items() if k in ("num_layers", "num_key_value_heads")} \
        if base else {}
    kv, meta = peft_prefix.read_adapter(cfg, weights, weights.parent / ADAPTER_CONFIG, geometry)
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in OUT (without it a folder that holds files is refused)")


def run_export(args: argparse.Namespace) -> int:
    print(export_peft(args.prompt_dir, args.out, args.base_model, args.overwrite))
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("peft_dir", metavar="PEFT_DIR",
                        help="folder with adapter_config.json + adapter_model.safetensors, or hf://REPO_ID[@REV]")
    parser.add_argument("out", metavar="OUT", help="softprompt prompt folder to write")
    parser.add_argument("--model", default=None, help="model name to record (default: the adapter's base model)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previously imported prompt in OUT (without it a folder that holds files is "
                             "refused)")


def run_import(args: argparse.Namespace) -> int:
    print(import_peft(args.peft_dir, args.out, args.model, args.overwrite))
    return 0
