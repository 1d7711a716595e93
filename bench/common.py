"""What the benchmarks share: the models they run on, the data, the machine's matmul peak, peak
memory readings and result files.

Models (`--model`):
- `smollm2-135m-instruct`: the built-in model, real weights;
- `bloom-560m-random`: bloomz-560m's geometry (vocabulary 250,880, hidden 1,024, 24 layers,
  16 heads) with random weights, so BLOOM's cost profile (ALiBi, a huge output layer) is covered
  without downloading it; it borrows the built-in tokenizer (its ids fit in BLOOM's vocabulary);
- `random:DIR`: the architecture and tokenizer in DIR (a config.json plus tokenizer files) with
  random weights, for machines that cannot hold the real weights.
Speed does not depend on the weights' values, so random weights give honest timings.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SOFTPROMPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results"
BLOOM_560M = dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)

ACTS = dict(data=str(SHARED / "awesome-chatgpt-prompts" / "prompts.csv"),
            template="Act as a {act}.\nPrompt: {prompt}", max_length=128)
SST2 = dict(data=str(SHARED / "sst2" / "train.tsv"), template="Review: {sentence}\nSentiment:",
            labels="negative,positive", max_length=128)
AG_LABELS = ("World", "Sports", "Business", "Sci/Tech")


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    return dev, getattr(torch, dtype)


def load_bench_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, tokenizer), frozen and in eval mode, as softprompt.base.models.load_model returns them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BloomConfig

    from softprompt.base.models import builtin_model_dir, load_model
    from softprompt.core.config import ModelConfig

    if name == "bloom-560m-random" or name.startswith("random:"):
        torch.manual_seed(seed)
        if name.startswith("random:"):
            src = name.split(":", 1)[1]
            if not (Path(src) / "config.json").is_file():  # else the Hub client's repo-id traceback
                raise SystemExit(f"--model {name}: no config.json in {src!r}; random:DIR builds the "
                                 "architecture in DIR with random weights")
            cfg = AutoConfig.from_pretrained(src)
        else:
            src = os.environ.get("SOFTPROMPT_BENCH_TOKENIZER") or builtin_model_dir()
            cfg = BloomConfig(**BLOOM_560M)
        tok = AutoTokenizer.from_pretrained(src)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        with torch.device(device):  # initialise on the device: 560M fp32 weights init faster there
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.requires_grad_(False).eval()
        return model, tok
    return load_model(ModelConfig(model=name, dtype=str(dtype).replace("torch.", ""), device=str(device)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best achieved GFLOP/s of a large square matmul: the ceiling the model runs are judged against.
    On a CPU in float32 the better of torch's matmul (MKL) and oneDNN's, the kernel softprompt may
    train with there (base/cpu_linear.py)."""
    from softprompt.base.cpu_linear import onednn_linear

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        kernels.append(lambda: onednn_linear(a, b, None))
    best = float("inf")
    for f in kernels:
        for _ in range(6):
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def count_flops(fn) -> int:
    """Floating-point operations of one call of fn, counted by PyTorch's FlopCounterMode (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ---------------------------------------------------------------- peak memory

def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _live_tensor_peak(prof) -> int:
    """Peak of live tensor bytes during a profiled region, from its allocation/free events."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    cur = peak = 0
    for _, nbytes in sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]"):
        cur += nbytes
        peak = max(peak, cur)
    return peak


class PeakMemory:
    """Peak memory used on top of what was resident when the reading started.

    CUDA: the caching allocator's exact peak of allocated tensors. CPU: two readings.
    - tensors: the peak of live tensor bytes (allocations minus frees, from the profiler), the CPU
      counterpart of CUDA's max_memory_allocated, so CPU and GPU ratios mean the same thing;
    - RSS: the kernel's resident high-water mark (VmHWM), reset through /proc/self/clear_refs.
      It also counts what glibc's allocator keeps after frees (fragmentation, often half of it),
      so run each path in its own process.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            from softprompt.training.measure import reset_peak_rss

            if not reset_peak_rss():  # VmHWM := the RSS now, checked: a stale mark would count earlier work
                raise SystemExit("the kernel's resident high-water mark (VmHWM) did not reset through "
                                 "/proc/self/clear_refs: no RSS peak can be measured here")
            self.base = status_kb("VmRSS") * 1024
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.total = torch.cuda.max_memory_allocated(self.device)
            self.tensors = self.delta = self.total - self.base
        else:
            from softprompt.training.measure import peak_rss

            self.total = peak_rss()  # the mark reset_peak_rss set at __enter__
            self.delta = self.total - self.base
            self.prof.__exit__(None, None, None)
            self.tensors = _live_tensor_peak(self.prof)
        return False

    def as_dict(self) -> dict[str, float]:
        """peak_over_model_mb: tensors allocated on top of the model (CUDA and CPU alike);
        rss_*: CPU only, the process's resident memory."""
        out = {"peak_over_model_mb": self.tensors / 2 ** 20}
        if self.device.type == "cuda":
            out["peak_total_mb"] = self.total / 2 ** 20
        else:
            out.update(rss_peak_total_mb=self.total / 2 ** 20, rss_peak_over_model_mb=self.delta / 2 ** 20)
        return out


# ---------------------------------------------------------------- reporting

def median(xs: list[float]) -> float:
    return statistics.median(xs)


def cpu_model() -> str:
    """The CPU's model name: float results can differ in the last bits between CPUs (the math
    libraries pick kernels per instruction set), and over hundreds of steps so can a curve."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_half_flags() -> list[str]:
    """The CPU flags that decide whether bf16/fp16 matmuls are native (fast) or emulated (slow)."""
    from softprompt.base.models import cpu_flags

    return sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile"})


def machine() -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "cpu_half_flags": cpu_half_flags()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import transformers
    info["transformers"] = transformers.__version__
    try:
        import peft
        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def git_commit() -> str:
    """The commit measured (with `+dirty` when the tree has changes), so a figure names its code."""
    import subprocess

    def git(*a: str) -> str:
        try:  # the GPU machine may have no git at all: then SOFTPROMPT_COMMIT (gpu_check.sh sets it)
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    head = git("rev-parse", "HEAD") or os.environ.get("SOFTPROMPT_COMMIT", "unknown")
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance(**extra: Any) -> dict[str, Any]:
    """What every result file records first: the exact command, the commit, the machine, when."""
    import sys

    return {"command": " ".join(["python", *sys.argv]), "commit": git_commit(), "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


class Results:
    """A result file written row by row: each `add` rewrites the whole JSON atomically, so a time
    limit loses the row in progress, not the file. `head` is provenance() plus the bench's settings."""

    def __init__(self, path: str | Path, head: dict[str, Any], key: str | None = "rows",
                 rows: list[dict[str, Any]] | None = None):
        """`rows`: a resumed file's rows, kept from the first write on."""
        self.path, self.doc, self.key = Path(path), {**provenance(), **head}, key
        if key:
            self.doc[key] = list(rows or [])
        self.save()

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.doc[self.key].append(row)
        self.save()
        return row

    def set(self, **fields: Any) -> None:
        """Top-level fields (a phase's result, a summary), written at once like a row."""
        self.doc.update(fields)
        self.save()

    def save(self) -> Path:
        return write_result(self.path, self.doc)


def attn_implementation(model) -> str | None:
    """The attention backend a model runs (eager, sdpa, flash_attention_2, ...): part of what a figure measured."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def write_result(path: str | Path, obj: dict[str, Any]) -> Path:
    from softprompt.core.utils import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)  # atomic
    return path


def fmt_row(cells: list[Any], widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def task_data(name: str, folder: Path) -> dict:
    """DataConfig fields of a task; RTE and AG News are rewritten into `folder` as JSONL with the
    label as an index into the label words (their files name labels by multi-token strings), and
    awesome-chatgpt-prompts ("acts") and quotable.io's quotes ("quotes"), language modelling, are
    each split into a fixed fifth held out."""
    if name == "sst2":
        return {**SST2, "eval_data": str(SHARED / "sst2" / "dev.tsv")}
    if name == "rte":
        for split in ("train", "val"):
            rows = [json.loads(l) for l in (SHARED / "rte" / f"{split}.jsonl").read_text().splitlines() if l.strip()]
            write_jsonl(folder / f"rte_{split}.jsonl", [
                {"premise": r["premise"], "hypothesis": r["hypothesis"],
                 "label": 0 if r["label"] == "entailment" else 1} for r in rows])
        return dict(data=str(folder / "rte_train.jsonl"), eval_data=str(folder / "rte_val.jsonl"),
                    template="{premise}\nQuestion: {hypothesis} Yes or no?\nAnswer:", labels="yes,no", max_length=256)
    if name == "ag_news":
        rows = []
        for line in (SHARED / "ag_news" / "alps_dev_10k.tsv").read_text(encoding="utf-8").splitlines():
            text, _, label = line.rpartition("\t")
            if text and label in AG_LABELS:
                rows.append({"text": text, "label": AG_LABELS.index(label)})
        random.Random(20261202).shuffle(rows)  # fixed: the dev part is the same for every seed and method
        write_jsonl(folder / "ag_dev.jsonl", rows[:1000])
        write_jsonl(folder / "ag_train.jsonl", rows[1000:])
        return dict(data=str(folder / "ag_train.jsonl"), eval_data=str(folder / "ag_dev.jsonl"),
                    template="Article: {text}\nTopic:", labels="world,sports,business,science", max_length=192)
    if name == "acts":  # language modelling: no labels, a held-out loss
        with open(ACTS["data"], newline="", encoding="utf-8") as f:
            rows = [{"act": r["act"], "prompt": r["prompt"]} for r in csv.DictReader(f)]
        return {**held_out_fifth(rows, folder, "acts"), "template": ACTS["template"], "max_length": ACTS["max_length"]}
    if name == "quotes":  # language modelling on a second corpus: quotable.io's quotes and their authors
        rows = [{"content": q["content"], "author": q["author"]}
                for q in json.loads((SHARED / "quotes" / "quotes.json").read_text(encoding="utf-8"))]
        return {**held_out_fifth(rows, folder, "quotes"), "template": "Quote: {content}\nAuthor: {author}",
                "max_length": 128}
    raise SystemExit(f"unknown task {name!r}: choose from sst2, rte, ag_news, acts, quotes")


def held_out_fifth(rows: list[dict], folder: Path, name: str) -> dict:
    """A language-modelling corpus as data (NAME_train.jsonl) and eval_data (NAME_dev.jsonl, a fifth),
    shuffled by a fixed seed: the same held-out rows for every run's seed and method."""
    random.Random(20261206).shuffle(rows)
    cut = len(rows) // 5
    return dict(data=write_jsonl(folder / f"{name}_train.jsonl", rows[cut:]),
                eval_data=write_jsonl(folder / f"{name}_dev.jsonl", rows[:cut]))


def softprompt(*args: str) -> str:
    """The command as a user runs it (`python -m softprompt ...`, on this checkout's sources): its
    stdout, or the bench stops with the command's stderr."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "softprompt", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"softprompt {' '.join(args[:1])} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def entry(main: Callable[[], int | None]) -> NoReturn:
    """A bench script's entry point: main's status, and a SoftpromptError (a bad flag, a missing model)
    as the one line softprompt's own commands print, not a traceback."""
    from softprompt.core.utils import SoftpromptError

    try:
        status = main()
    except SoftpromptError as e:
        print(f"softprompt: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
