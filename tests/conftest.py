"""Shared fixtures: a byte-level BPE tokenizer trained here, and tiny random Llama and BLOOM models.

Everything is built locally in seconds; nothing touches the network.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs one worker per core) each worker and the commands it starts
# get one thread: two-thread matmuls in every worker would oversubscribe the cores, and OpenMP's
# spinning threads then slow every worker down.
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if XDIST_WORKER else min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "src" / "softprompt" / "examples" / "countries.jsonl"


@pytest.fixture(scope="session")
def fork_python():
    """A `python` whose commands fork from one interpreter of this worker's that imported torch,
    transformers and peft (tests/fork_server.py): a dry run's dozen interpreters skip ~4-10 s each."""
    from fork_server import ForkServer

    server = ForkServer(dict(os.environ))
    yield str(server.python)
    fresh = server.fresh()
    server.close()
    assert not fresh, f"commands the fork server ran in a fresh interpreter, each ~4-10 s slower: {fresh}"


@pytest.fixture(scope="session")
def run_bench(fork_python):
    """run_bench(script, *argv): bench/<script> in a process of its own, on this checkout's sources and
    the shared data: how the benchmark dry runs are tested (the scripts import softprompt from src/
    without an install). The commands a bench starts (`python -m softprompt ...`) fork too."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SOFTPROMPT_SHARED_DATA": str(SHARED)}

    def run(script: str, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([fork_python, str(ROOT / "bench" / script), *argv], capture_output=True, text=True,
                              timeout=timeout, env=env)

    return run


def _corpus() -> list[str]:
    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()]
    lines = [f"Country: {r['country']}\nFacts: capital={r['capital']}; continent={r['continent']}; "
             f"language={r['language']}" for r in rows]
    lines += ["Review: a great movie\nSentiment: positive", "Review: a dull film\nSentiment: negative",
              "Classify the text as negative or positive.", "Act as a teacher.\nPrompt: explain things"]
    return lines * 3


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d


# The two families most tests run on (tests/families.py has them all); Llama with the default
# initialisation, BLOOM with the table's wider one (0.02 gives a near-uniform BLOOM).
MAIN_FAMILIES = {"llama": {"initializer_range": 0.02}, "bloom": {}}


def _save_model(kind: str, tok_dir: Path, root: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from families import tiny_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tok), tok.pad_token_id, tok.eos_token_id,
                                                         **MAIN_FAMILIES[kind]))
    d = root / kind
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def llama_dir(tok_dir, tmp_path_factory) -> Path:
    return _save_model("llama", tok_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def bloom_dir(tok_dir, tmp_path_factory) -> Path:
    return _save_model("bloom", tok_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture(params=["llama", "bloom"])
def model_dir(request, llama_dir, bloom_dir) -> Path:
    return llama_dir if request.param == "llama" else bloom_dir


@pytest.fixture
def tiny(model_dir):
    from softprompt.base.models import load_model

    return load_model(str(model_dir))


@pytest.fixture
def countries_csv(tmp_path) -> Path:
    """A small classification + generation table written from the project's own example data."""
    import csv

    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()]
    p = tmp_path / "countries.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["country", "capital", "continent", "europe"])
        for r in rows:
            w.writerow([r["country"], r["capital"], r["continent"], int(r["continent"] == "Europe")])
    return p


# The files that take 20 s or more of a full run, longest first (their summed `--durations`, 2026-12-07).
# xdist hands out whole files (`--dist loadfile`) in collection order only under `--no-loadscope-reorder`
# (the Makefile's): by default it starts the files with the most tests first, which left a one-test file
# of a minute or more for the end while the other worker sat idle.
LONGEST_FIRST = ["test_readme.py", "test_journeys.py", "test_gpu_check.py", "test_classic_scripts_bench.py",
                 "test_serve_fuzz.py", "test_demo.py", "test_compare.py", "test_api.py", "test_ptuning.py",
                 "test_builtin.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
