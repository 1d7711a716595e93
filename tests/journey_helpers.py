"""Helpers shared by the tests that run the installed command as a user does (test_journeys.py,
test_readme.py): a free loopback port for a server, a chat file made from real data, and commands
run two at a time."""
from __future__ import annotations

import csv
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from conftest import SHARED

ACTS = SHARED / "awesome-chatgpt-prompts" / "prompts.csv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_chats(path: Path, n: int) -> Path:
    """A JSONL of n {"messages": [user, assistant]} conversations from awesome-chatgpt-prompts' rows."""
    with open(ACTS, newline="", encoding="utf-8") as f:
        rows = [r for r, _ in zip(csv.DictReader(f), range(n))]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Act as a {r['act']}."},
                                                     {"role": "assistant", "content": r["prompt"][:200]}]}) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def two_at_a_time(run: Callable, calls: list[tuple]) -> list:
    """run(*args) for each args in `calls`, two at once, results in order (the first failure raised).
    Each command spends most of its seconds importing torch and loading the model, one core's work;
    the CI machine has two."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run(*args), calls))
