"""The suite's own schedule: `make test` starts the longest test files first (conftest.LONGEST_FIRST),
so that neither pytest-xdist worker ends the run alone on a file of minutes while the other idles."""
from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import conftest
from conftest import LONGEST_FIRST, ROOT


def makefile_pytest_flags() -> list[list[str]]:
    """The flags of every pytest command in the Makefile that distributes files over workers."""
    lines = [line for line in (ROOT / "Makefile").read_text().splitlines() if "-m pytest" in line]
    return [shlex.split(line) for line in lines if "--dist" in line]


def files_first_assigned(flags: list[str], nodeids: list[str], workers: int = 2) -> list[str]:
    """The files xdist's loadfile scheduler hands out, in order, until every worker has work: its own
    scheduler, run with these flags' reorder option over this collection."""
    from xdist.scheduler import LoadFileScheduling

    config = SimpleNamespace(getvalue=lambda name: [f"{workers}*popen"],
                             option=SimpleNamespace(loadscopereorder="--no-loadscope-reorder" not in flags))
    sent: list[str] = []

    class Node:
        shutting_down = False

        def __init__(self, k: int):
            self.gateway = SimpleNamespace(id=f"gw{k}")

        def send_runtest_some(self, indices):
            sent.extend(dict.fromkeys(nodeids[i].split("::")[0] for i in indices))

        def shutdown(self):
            self.shutting_down = True

    sched = LoadFileScheduling(config)
    nodes = [Node(k) for k in range(workers)]
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        sched.add_node_collection(node, nodeids)
    sched.schedule()
    return sent


def collection(names_and_counts: dict[str, int]) -> list[str]:
    """Node ids of a collection sorted as conftest sorts a real one."""
    items = [SimpleNamespace(path=Path("tests") / name, nodeid=f"tests/{name}::test_{k}")
             for name, count in names_and_counts.items() for k in range(count)]
    conftest.pytest_collection_modifyitems(None, items)
    return [item.nodeid for item in items]


def test_every_longest_first_name_is_a_test_file():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert all((ROOT / "tests" / name).is_file() for name in LONGEST_FIRST), LONGEST_FIRST


def test_make_test_starts_the_longest_files_first():
    # Short files with many tests collected first, as alphabetical order often has them; the two longest
    # files hold one test each, as test_readme and test_demo do
    many = {"test_aaa.py": 40, "test_bbb.py": 30, LONGEST_FIRST[1]: 1, LONGEST_FIRST[0]: 1}
    nodeids = collection(many)
    assert nodeids[:2] == [f"tests/{LONGEST_FIRST[0]}::test_0", f"tests/{LONGEST_FIRST[1]}::test_0"]
    commands = makefile_pytest_flags()
    assert commands and all("loadfile" in flags for flags in commands)
    for flags in commands:
        assert files_first_assigned(flags, nodeids)[:2] == [f"tests/{n}" for n in LONGEST_FIRST[:2]], flags
    # Without the flag xdist sorts the files by their number of tests, and the longest would go last
    assert files_first_assigned([], nodeids)[:2] == ["tests/test_aaa.py", "tests/test_bbb.py"]
