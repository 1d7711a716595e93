"""Reading prompts from the Hugging Face Hub, through huggingface_hub.

`hf://REPO_ID[@REVISION]` stands for a prompt folder wherever one is taken: prompt.load_prompt
and peft_io.import_peft download the snapshot (or find it in huggingface_hub's local cache;
`HF_HUB_OFFLINE=1` uses the cache only). Uploading (`softprompt push`) and the model card are
hub_push.py's, above the prompt and PEFT code they read; this module stays at the bottom.

No network: one error line saying so, as for models and datasets.
"""
from __future__ import annotations

from pathlib import Path

from ..core.config import BUILTIN_MODEL, model_name
from ..core.utils import SoftpromptError

SCHEME = "hf://"
# What a prompt repository holds, beside the card; what a download fetches.
PROMPT_FILES = ["prompt.safetensors", "prompt_config.json", "adapter_config.json", "adapter_model.safetensors",
                "softprompt_config.json", "README.md"]


def is_hub(spec: str | Path) -> bool:
    # Path() folds "hf://" to "hf:/" (the server wraps its prompt paths in Path): both mean the Hub.
    return str(spec).startswith(("hf://", "hf:/"))


def local_sources(*specs: str | Path) -> tuple[str | Path, ...]:
    """The sources given that are folders or files on this machine: not hf://, nor empty (no source)."""
    return tuple(s for s in specs if s and not is_hub(s))


def parse(spec: str | Path) -> tuple[str, str | None]:
    """`hf://org/name@rev` as ("org/name", "rev")."""
    rest = str(spec).split(":/", 1)[1].lstrip("/")
    repo, _, rev = rest.partition("@")
    if repo.count("/") > 1 or not repo or repo.startswith(".") or ".." in repo:
        raise SoftpromptError(f"{spec}: expected hf://REPO_ID or hf://REPO_ID@REVISION (REPO_ID as org/name)")
    return repo, rev or None


def download(spec: str | Path) -> Path:
    """The local snapshot folder of `hf://REPO_ID[@REV]`: from the cache, or downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo, rev = parse(spec)
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=PROMPT_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as e:
        uri = f"hf://{repo}" + (f"@{rev}" if rev else "")  # as written, also where a Path folded its "//"
        raise SoftpromptError(
            f"cannot download prompt {uri} from the Hugging Face Hub (offline or unreachable, unknown repository "
            f"or revision, and not in the local cache: {first_line(e)}); pass a local prompt folder instead") from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def hub_model_id(name: str) -> str:
    """The Hub id PEFT and the Hub know a --model by: the built-in model's (by its name or its cache
    folder, as prompts trained from Python recorded it) is its original repository."""
    return BUILTIN_HUB_ID if model_name(name) == BUILTIN_MODEL else name
