"""tests/fork_server.py, the `python` the bench dry runs, gpu_check.sh's dry run, the README's examples
and the journeys' repeated commands run through: each child is a process of its own with its own exit
status, output, working folder, sys.path and environment; a signal reaches it and a killed caller
kills it; and what a fork would run differently from a fresh interpreter runs in a fresh one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fork_server import ForkServer


@pytest.fixture(scope="module")
def server():
    s = ForkServer(dict(os.environ), preload=("json",))
    yield s
    s.close()


def run(server, *argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(server.python), *argv], capture_output=True, text=True, timeout=60, **kw)


def test_each_child_is_a_process_of_its_own(server, tmp_path):
    code = ("import os, sys\nprint(os.getcwd(), sys.argv[1:], sys.path[0] == '', sys.executable)\n"
            "print('w', file=sys.stderr)")
    r = run(server, "-c", code, "a", "b", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{tmp_path} ['a', 'b'] True {server.python}\n", "w\n")
    assert (run(server, "-c", "import sys; sys.exit('one line')").stderr, run(server, "-c", "exit(3)").returncode) \
        == ("one line\n", 3)
    raised = run(server, "-c", "import json\njson.mark = 1\nraise ValueError('boom')")
    assert raised.returncode == 1 and raised.stderr.splitlines()[-1] == "ValueError: boom"
    assert "fork_server" not in raised.stderr  # the traceback a fresh interpreter prints
    assert run(server, "-c", "import json; print(hasattr(json, 'mark'))").stdout == "False\n"  # its own modules
    assert run(server, "-c", "import sys; print(sys.stdin.read())", input="fed").stdout == "fed\n"
    # the code is __main__ itself, as under `python -c`: what it defines pickles by reference
    pickled = run(server, "-c", "import pickle\ndef f(): pass\nprint(pickle.loads(pickle.dumps(f)) is f)")
    assert pickled.stdout == "True\n", pickled.stderr
    assert server.fresh() == []


def test_a_script_and_a_module_see_what_a_fresh_interpreter_sets(server, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mod.py").write_text("import sys\nprint(__name__, sys.argv)\n")
    (tmp_path / "script.py").write_text("import os, sys\nprint(sys.path[0], os.environ['X'])\nimport mod\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "lib"), "X": "1"}
    r = run(server, str(tmp_path / "script.py"), cwd="/", env=env)
    assert r.stdout == f"{tmp_path} 1\nmod ['{tmp_path / 'script.py'}']\n", r.stderr
    r = run(server, "-m", "mod", "--flag", cwd=tmp_path, env=env)
    assert r.stdout == f"__main__ ['{tmp_path / 'lib' / 'mod.py'}', '--flag']\n", r.stderr
    # -u (torchrun starts its workers so), torchrun's own variables and one scikit-learn sets on import fork
    worker = {**os.environ, "TORCHELASTIC_RUN_ID": "x", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
              "KMP_DUPLICATE_LIB_OK": "True"}
    assert run(server, "-u", "-c", "import sys; print(sys.stdout.write_through)", env=worker).stdout == "True\n"
    # a child's own commands go through the server too
    nested = ("import subprocess, sys\n"
              "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True).stdout)")
    assert run(server, "-c", nested).stdout == "b'7\\n'\n"
    assert server.fresh() == []


def test_what_a_fork_would_run_differently_runs_fresh(server):
    # an option it does not emulate, and a variable read while torch or the Hub client import
    assert run(server, "-X", "dev", "-c", "import sys; print(sys.executable)").stdout == f"{sys.executable}\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1"}
    assert run(server, "-c", "import sys; print(sys.executable)", env=env).stdout == f"{sys.executable}\n"
    fresh = server.fresh()
    assert len(fresh) == 2 and "other than [-u] SCRIPT" in fresh[0] and "['HF_HUB_OFFLINE']" in fresh[1], fresh


def test_signals_reach_the_child_and_a_killed_caller_kills_it(server, tmp_path):
    ready, got = tmp_path / "ready", tmp_path / "got"
    code = (f"import os, pathlib, signal, time\n"
            f"def note(n, _):\n    pathlib.Path({str(got)!r}).write_text(str(n))\n"
            f"    signal.signal(n, signal.SIG_DFL)\n    os.kill(os.getpid(), n)\n"
            f"signal.signal(signal.SIGINT, note)\nsignal.signal(signal.SIGTERM, note)\n"
            f"pathlib.Path({str(ready)!r}).write_text('x')\ntime.sleep(60)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen([str(server.python), "-c", code])
        while not ready.exists():
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(30) == -sig  # the caller sees what a fresh python that died of it shows
        assert got.read_text() == str(int(sig))  # the child itself received it
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen([str(server.python), "-c", f"import os, time\nopen({str(pid_file)!r}, 'w').write("
                             "str(os.getpid()))\ntime.sleep(60)"])
    while not (pid_file.exists() and pid_file.read_text()):
        time.sleep(0.05)
    proc.kill()  # a caller's timeout kills the shim: the child must not run on
    proc.wait()
    child = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the child {child} of a killed shim still runs")
