"""The README is executable: every shell and Python example in it runs here, in its offline variant,
with small step counts: `serve` as the installed command, the others each in a process of its own
forked from one that has imported torch (`python -m softprompt`, the console script's entry point,
or `python -c EXAMPLE`, through tests/fork_server.py).

The README's examples read Hub datasets; the comment under each (`#   local: FLAGS (instead of the
first two flags)`) gives the same run on local files, and that is what runs here. Step counts and
sizes are shrunk (SHRINK). A command that cannot run here (the network, a GPU, hours of CPU) must
be listed in SKIP with its reason, and every SKIP entry must match a README command, so the README
cannot drift from the tool in either direction: a new example runs or is named here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, SHARED
from journey_helpers import free_port, write_chats

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
README = ROOT / "README.md"

# Commands that cannot run in CI, each with its reason (regex over the command as written).
SKIP = {
    r"^make (demo|test)\b": "the README's first two commands: CI runs `make test` itself; "
                             "tests/test_demo.py runs `softprompt demo` with few steps",
    r"^pip install": "installs: the test extras hold these packages already",
    r"^\. \.venv/bin/activate": "the tests already run inside the virtual environment",
    r"^huggingface-cli login": "needs the Hub",
    r"^softprompt push runs/sst2 you/": "needs the Hub; push --local-dir is run below instead",
    r"hf://you/": "needs the Hub; hf:// from the cache is test_hub's",
    r"--model (bigscience|meta-llama)/": "needs the Hub (a 560M / 8B download); the offline variant follows it",
    r"^softprompt train --config examples/bloomz-560m-classic.yaml$": "bloomz-560m from the Hub; its offline "
                                                                     "variant follows in the README",
    r"^torchrun ": "sharding needs 2 processes on a real base; test_fsdp runs it",
    r"^softprompt lm-eval ": "the task YAML reads stanfordnlp/sst2 from the Hub; test_lmeval runs a local task",
    r"^lm_eval --model local-completions": "needs the Hub tokenizer; test_serve_logprobs runs lm_eval's "
                                           "local-completions against a live server",
    r"^python (experiments|bench)/|^bash bench/": "benchmarks and ablations: hours of CPU",
}
# Flag -> value for the few-steps variant (only where the README's own value is larger).
SHRINK = {"--max-steps": 2, "--eval-limit": 8, "--limit": 8, "--ft-steps": 2, "--max-new-tokens": 4,
          "--batch-size": 2, "--max-length": 64, "--eval-every": 1, "--top-k": 2}
# Flags added where the README leaves the default (a full run), per command.
# (--limit: a two-step run trains on a few rows, and every one of SST-2's 67k would be tokenised;
# --batch-size: train's default of 8 rows of RTE premises is most of what a two-step run computes.)
ADD = {"train": {"--max-steps": "2", "--eval-limit": "8", "--limit": "64", "--batch-size": "2"},
       "compare": {"--max-steps": "2", "--eval-limit": "8", "--limit": "64", "--batch-size": "2"},
       "eval": {"--limit": "8"}, "ensemble": {"--limit": "8"}, "generate": {"--max-new-tokens": "4"}}
# Placeholders in the README's commands, and what stands for them here.
PLACEHOLDERS = {"DIR1": "runs/sst2", "DIR2": "runs/sst2-again", "DIR3": "runs/sst2",
                "my_chats.jsonl": "chats.jsonl"}
# Python examples that are fragments: what defines their names, keyed by a line of the example.
# Every example runs after the shell examples above it, in the same folder (runs/acts exists).
PY_CONTEXT = {
    "import softprompt\n": "",
    "from softprompt import SoftPromptModel": (
        "from softprompt.base.models import load_model\n"
        "base, tok = load_model('smollm2-135m-instruct')\n"
        "enc = tok(['Act as a chef.\\nPrompt:', 'Act as a poet.\\nPrompt: Write'], return_tensors='pt', padding=True)\n"
        "ids, mask = enc.input_ids, enc.attention_mask\n"
        "labels = ids.masked_fill(mask == 0, -100)\n"),
    "prompt = peft_model.get_prompt": (
        "import torch\nfrom peft import PeftModel\nfrom softprompt.base.models import load_model\n"
        "base, tok = load_model('smollm2-135m-instruct')\n"
        "tok.padding_side = 'left'\n"
        "peft_model = PeftModel.from_pretrained(base, 'runs/acts-peft')\n"
        "enc = tok(['Act as a chef.\\nPrompt:', 'Act as a poet.\\nPrompt:'], return_tensors='pt', padding=True)\n"),
    "cache = peft_model.get_prompt": (  # a prefix (train's default) saved in PEFT's PrefixTuning format
        "import torch\nimport softprompt\nfrom peft import PeftModel\nfrom softprompt.base.models import load_model\n"
        "base, tok = load_model('smollm2-135m-instruct')\n"
        "tok.padding_side = 'left'\n"
        "softprompt.get_softprompt_model(base, method='prefix', virtual_tokens=4, tokenizer=tok)"
        ".save_pretrained('runs/prefix-peft')\n"
        "peft_model = PeftModel.from_pretrained(base, 'runs/prefix-peft')\n"
        "enc = tok(['Act as a chef.\\nPrompt:', 'Act as a poet.\\nPrompt:'], return_tensors='pt', padding=True)\n"),
    "from openai import OpenAI": "",
}
# Lines of Python examples that need the network, each with what runs instead.
PY_OFFLINE = {'model.push_to_hub("you/my-prompt")': 'model.save_pretrained("runs/mine-again")'}
PY_SHRINK = [(r"max_steps=\d+", "max_steps=2"), (r"max_new_tokens=\d+", "max_new_tokens=4"),
             (r"max_tokens=\d+", "max_tokens=4")]
# Config files whose data is on the Hub: the local files their comments name.
CONFIG_DATA = {
    "examples/sst2.yaml": ["--data", "../shared/data/sst2/train.tsv", "--eval-data", "../shared/data/sst2/dev.tsv"],
    "runs/sst2/run_config.json": [],
}


@dataclass
class Cmd:
    line: int
    text: str  # as written, continuation lines joined and comments removed
    lang: str = "bash"
    local: list[str] = field(default_factory=list)
    replaces: int = 0  # how many leading flag/value pairs `local` replaces


def blocks(text: str):
    """(language, first line number, lines) of every fenced code block."""
    lang, start, lines = None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip() or "text", i + 1, []
            else:
                yield lang, start, lines
                lang = None
        elif lang is not None:
            lines.append(line)


LOCAL_RE = re.compile(r"^#\s+local:\s*(.*?)\s*(\(instead of the first (\w+) flags?\))?\s*$")
COUNTS = {"one": 1, "two": 2, "three": 3}


def commands(text: str) -> list[Cmd]:
    out: list[Cmd] = []
    for lang, start, lines in blocks(text):
        if lang == "python":
            out.append(Cmd(start, "\n".join(lines), "python"))
            continue
        if lang != "bash":
            continue
        joined, first = "", None
        for n, line in enumerate(lines, start):
            first = n if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            joined += line
            stripped = joined.strip()
            m = LOCAL_RE.match(stripped)
            if m and out:
                local = m.group(1).split("  (")[0]
                out[-1].local = shlex.split(local)
                out[-1].replaces = COUNTS.get(m.group(3) or "one", 1)
            elif stripped and not stripped.startswith("#"):
                for part in stripped.split(" && "):
                    words = shlex.split(part, comments=True)
                    if words:
                        out.append(Cmd(first, shlex.join(words)))
            joined, first = "", None
    return out


def skip_reason(cmd: Cmd) -> str | None:
    if cmd.lang == "python":
        return None
    return next((why for pat, why in SKIP.items() if re.search(pat, cmd.text)), None)


def python_offline(cmd: Cmd, port: int | None) -> str:
    """A Python example made runnable here: its context first, network lines swapped, few steps."""
    context = [code for key, code in PY_CONTEXT.items() if key in cmd.text + "\n"]
    assert context, f"README line {cmd.line}: a Python example with no PY_CONTEXT entry"
    code = cmd.text
    for line, instead in PY_OFFLINE.items():
        code = code.replace(line, instead)
    for pat, repl in PY_SHRINK:
        code = re.sub(pat, repl, code)
    if "127.0.0.1:8000" in code:
        assert port is not None, f"README line {cmd.line}: a client example with no server before it"
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return context[0] + code


def offline(cmd: Cmd) -> list[str]:
    """The command's argv for this machine: local data, placeholders, few steps."""
    argv = [PLACEHOLDERS.get(w, w) for w in shlex.split(cmd.text)]
    if cmd.local:
        i = 2  # softprompt COMMAND --flag value ...
        argv = argv[:i] + [PLACEHOLDERS.get(w, w) for w in cmd.local] + argv[i + 2 * cmd.replaces:]
    for i, w in enumerate(argv):
        if w == "--config" and argv[i + 1] in CONFIG_DATA:
            argv += CONFIG_DATA[argv[i + 1]]
    for i, w in enumerate(argv[:-1]):
        if w in SHRINK and argv[i + 1].lstrip("-").replace(".", "").isdigit():
            argv[i + 1] = str(min(float(argv[i + 1]), SHRINK[w])).removesuffix(".0")
    for flag, value in ADD.get(argv[1] if len(argv) > 1 else "", {}).items():
        if flag not in argv:
            argv += [flag, value]
    return [str(BIN / argv[0])] + argv[1:] if (BIN / argv[0]).exists() else argv


def write_rows(path: Path, tsv: Path, n: int = 32) -> None:
    """The README's rows.jsonl / test.jsonl ({"text", "label"}): the first n rows of an SST-2 file."""
    import csv

    with open(tsv, newline="", encoding="utf-8") as f:
        rows = [r for r, _ in zip(csv.DictReader(f, delimiter="\t"), range(n))]
    path.write_text("".join(json.dumps({"text": r["sentence"], "label": int(r["label"])}) + "\n" for r in rows))


def start_server(argv: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, int]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(argv + ["--port", str(port)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the README's serve command did not answer /health")


def test_every_skip_entry_matches_a_readme_command():
    cmds = commands(README.read_text())
    unused = [pat for pat in SKIP if not any(re.search(pat, c.text) for c in cmds if c.lang == "bash")]
    assert not unused, f"SKIP entries that match no README command (stale): {unused}"
    py = [c for c in cmds if c.lang == "python"]
    assert all(any(k in c.text + "\n" for k in PY_CONTEXT) for c in py) and len(py) >= 4
    assert all(any(k in c.text + "\n" for c in py) for k in PY_CONTEXT), "stale PY_CONTEXT entries"


def test_the_local_variants_are_parsed():
    cmds = {c.text.split(" --")[0]: c for c in commands(README.read_text()) if c.local}
    train = next(c for c in commands(README.read_text()) if c.text.startswith("softprompt train --data stanfordnlp"))
    argv = offline(train)
    assert "stanfordnlp/sst2" not in argv and "--eval-split" not in argv and cmds
    assert argv[argv.index("--data") + 1].endswith("sst2/train.tsv") and argv[argv.index("--max-steps") + 1] == "2"


RUN_PATH = re.compile(r"\bruns/[\w.-]+")


def touches(cmd: Cmd) -> set[str] | None:
    """The run folders a shell command reads or writes (runs/NAME), or None for a command that must
    run alone: a Python example, `serve`, or one that names no run folder."""
    if cmd.lang == "python" or cmd.text.startswith("softprompt serve"):
        return None
    found = {m.group(0) for m in RUN_PATH.finditer(" ".join(offline(cmd)))}
    return found or None


def in_order_two_at_a_time(cmds: list[Cmd], start) -> None:
    """start(cmd) -> a wait() that raises on failure, for each command in README order. A command
    starts once fewer than two run and none running shares a run folder with it; one that must run
    alone (touches None) waits for all before it and holds back all after it. Each command mostly
    imports torch and loads the model, one core's work; the CI machine has two."""
    running: list[tuple[set[str] | None, object]] = []  # (run folders, wait) of started commands
    for k, cmd in enumerate(cmds):
        keys = None if k == 0 else touches(cmd)  # the first one alone: it may convert the built-in model
        while running and (keys is None or running[0][0] is None or len(running) >= 2
                           or any(keys & other for other, _ in running if other is not None)):
            running.pop(0)[1]()  # the earliest first: README order
        running.append((keys, start(cmd)))
        if keys is None:
            running.pop()[1]()
    for _, wait in running:
        wait()


def test_in_order_two_at_a_time_keeps_readme_order_per_run_folder():
    events = []

    def start(cmd):
        events.append(f"start {cmd.line}")
        return lambda: events.append(f"end {cmd.line}")

    cmds = [Cmd(1, "softprompt train --data a --out runs/a"), Cmd(2, "softprompt train --data b --out runs/b"),
            Cmd(3, "softprompt eval --prompt runs/a --data x"), Cmd(4, "softprompt inspect runs/b"),
            Cmd(5, "import softprompt", "python"), Cmd(6, "softprompt inspect runs/a"),
            Cmd(7, "softprompt eval --prompt runs/a --data y")]
    in_order_two_at_a_time(cmds, start)
    # 1 alone (the first); 2 starts; 3 (runs/a, done) beside 2; 4 (runs/b) waits for 2; 5 (Python)
    # waits for all and runs alone; 6 starts; 7 shares runs/a with 6, so waits for it.
    assert events == ["start 1", "end 1", "start 2", "start 3", "end 2", "start 4", "end 3", "end 4",
                      "start 5", "end 5", "start 6", "end 6", "start 7", "end 7"], events


def test_every_readme_example_runs_offline(fork_python, tmp_path):
    (tmp_path / "shared").symlink_to(SHARED.parent)
    work = tmp_path / "repo"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    write_chats(work / "chats.jsonl", 24)
    write_rows(work / "rows.jsonl", SHARED / "sst2" / "train.tsv")
    write_rows(work / "test.jsonl", SHARED / "sst2" / "dev.tsv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    server, ran, children, logs = None, [], [], tmp_path / "logs"
    logs.mkdir()

    def start(cmd: Cmd):
        nonlocal server
        if cmd.text.startswith("softprompt serve"):  # the server alone is the installed command itself
            server = start_server(offline(cmd), work, env)
            ran.append(cmd.text)
            return lambda: None
        if cmd.lang == "python":
            argv = ["python", "-c", python_offline(cmd, server[1] if server else None)]
        else:
            argv = offline(cmd)
            assert Path(argv[0]).name == "softprompt", f"README line {cmd.line}: run {argv[0]} in a subprocess"
            argv = ["python", "-m", "softprompt", *argv[1:]]  # the console script's entry point
        log = logs / f"{len(children)}-line{cmd.line}.err"  # a file: a full pipe would stall a command run beside
        with open(log, "w") as err:
            child = subprocess.Popen([fork_python, *argv[1:]], cwd=work, env=env, stdout=subprocess.DEVNULL,
                                     stderr=err)
        children.append(child)

        def wait():
            code = child.wait(900)
            assert code == 0, (f"README line {cmd.line} failed (exit {code}): {cmd.text}\n"
                               f"ran: {shlex.join(argv) if cmd.lang == 'bash' else 'python'}\n"
                               f"{log.read_text()[-3000:]}")
            ran.append(cmd.text)

        return wait

    try:
        in_order_two_at_a_time([c for c in commands(README.read_text()) if not skip_reason(c)], start)
    finally:
        for child in children:  # one past its time, or left running by a failure (its shim killed, so is it)
            child.kill()
            child.wait()
        if server is not None:
            server[0].terminate()
            server[0].wait(30)
    assert any(t.startswith("softprompt serve") for t in ran) and len(ran) >= 15, ran
