"""Commands run as forked children of one interpreter that has imported torch, transformers and peft.

A fresh interpreter spends ~9 s of a 2-core machine importing those before a command does anything,
which is most of a few-steps command. Each child here is still a process of its own (its own exit
status, output, working folder, and no state shared with the others), running the console script's
own entry point, `softprompt.cli.entry`, or a Python example as `python -c` would. The parent
imports and never computes, so no thread pool exists to be broken by the fork. Journeys that test
the installed command itself (tests/test_journeys.py) start it for real.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The parent: import once, then fork a child per "start" line read from stdin; answer "wait" lines
# with the child's exit status. stdin closed: its children still running are killed.
PARENT = r'''
import atexit, json, os, signal, sys, time, traceback
for name in sys.argv[1:]:  # imported before any fork; nothing computed
    __import__(name)

def child(req):
    os.chdir(req["cwd"])
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdin = open(os.devnull)
    sys.argv = req["argv"]
    code = 0
    try:
        if req["code"] is not None:
            exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
        else:
            from softprompt.cli import entry
            entry()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

children = set()
while line := sys.stdin.readline():
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(req)
        children.add(pid)
        print(json.dumps({"pid": pid}), flush=True)
    else:  # wait, at most req["timeout"] seconds: a hung child is killed, not waited on forever
        deadline = time.monotonic() + req["timeout"]
        while not (done := os.waitpid(req["pid"], os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        timed_out = not done[0]
        if timed_out:
            os.kill(req["pid"], signal.SIGKILL)
            done = os.waitpid(req["pid"], 0)
        children.discard(req["pid"])
        print(json.dumps({"code": os.waitstatus_to_exitcode(done[1]), "timed_out": timed_out}), flush=True)
for pid in children:
    os.kill(pid, signal.SIGKILL)
'''


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


class Forker:
    """start(argv or code, cwd) -> a wait() that returns Done; close() ends the parent."""

    def __init__(self, env: dict[str, str],
                 preload: tuple[str, ...] = ("torch", "transformers.modeling_utils", "peft")):
        self.tmp = Path(tempfile.mkdtemp(prefix="forked-"))
        self.log = open(self.tmp / "parent.err", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", PARENT, *preload], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.n = 0

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the forking parent died: {(self.tmp / 'parent.err').read_text()[-3000:]}"
        return json.loads(answer)

    def start(self, cwd: Path, argv: list[str] | None = None, code: str | None = None):
        """A console-script command (argv, as typed: ["softprompt", ...]) or Python code (`python -c`)."""
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        pid = self.ask(op="start", cwd=str(cwd), argv=argv if code is None else ["-c"], code=code,
                       out=str(out), err=str(err))["pid"]

        def wait(timeout: float = 900) -> Done:
            answer = self.ask(op="wait", pid=pid, timeout=timeout)
            assert not answer["timed_out"], f"{argv or 'python -c'} ran past {timeout} s"
            return Done(answer["code"], out.read_text(errors="replace"), err.read_text(errors="replace"))

        return wait

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
