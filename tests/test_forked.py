"""tests/forked.py, which the README test runs its commands through: each child reports its own exit
status, output and working folder, a failure is a failure, and a hung child is killed."""
from __future__ import annotations

import os

import pytest

from forked import Forker


def test_each_child_is_a_process_of_its_own(tmp_path):
    (tmp_path / "a").mkdir()
    forker = Forker(dict(os.environ), preload=("json",))
    try:
        ok = forker.start(tmp_path / "a", code="import os, sys\nprint(os.getcwd())\nprint('warned', file=sys.stderr)")
        failed = forker.start(tmp_path, code="import sys\nsys.exit('one line')")
        raised = forker.start(tmp_path, code="import json\njson.mark = 1\nraise ValueError('boom')")
        leaked = forker.start(tmp_path, code="import json\nprint(hasattr(json, 'mark'))")  # another process's module
        usage = forker.start(tmp_path, argv=["softprompt", "no-such-command"])
        done = [w() for w in (ok, failed, raised, leaked, usage)]
        assert (done[0].code, done[0].stdout.strip(), done[0].stderr) == (0, str(tmp_path / "a"), "warned\n")
        assert (done[1].code, done[1].stderr) == (1, "one line\n")
        assert done[2].code == 1 and "ValueError: boom" in done[2].stderr
        assert done[3].stdout == "False\n"
        assert done[4].code == 2 and "invalid choice: 'no-such-command'" in done[4].stderr
        hung = forker.start(tmp_path, code="import time\ntime.sleep(60)")
        with pytest.raises(AssertionError, match="ran past 1 s"):
            hung(timeout=1)
    finally:
        forker.close()
