"""A `python` that starts in a fraction of a second: a small executable (the shim) that hands its
command line, environment, working folder and standard streams to one server process, which has
imported torch, transformers and peft once and forks a child to run the command.

Bench scripts and gpu_check.sh start `python` (sys.executable, $PY) a dozen times per dry run, and
each fresh interpreter spends ~4-10 s of a 2-core machine importing those packages, most of what a
dry run's tiny step computes. A child here is still a process of its own: its exit status is the
shim's, a signal sent to the shim reaches it, the shim killed kills it, and it sees sys.executable as
the shim, so the commands it starts in turn fork too. What a fresh interpreter would do differently
is not forked: a command line other than `SCRIPT`, `-m MODULE` or `-c CODE`, or an environment that
differs from the server's in a variable read while those packages import (threads, caches, Hub
settings), execs the real interpreter instead. The server imports and never computes, so no thread
pool exists to be broken by a fork.

`ForkServer` starts the server (`serve`) in a process of its own and writes its shim; tests use the
`fork_python` fixture (conftest.py), the shim's path.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

# Environment variables read while the interpreter starts or torch, transformers or huggingface_hub
# import (threads, caches, Hub settings): a child whose values differ from the server's would run with
# the server's, so it runs in a fresh interpreter. Not here: what is read later, when a feature is used
# (accelerate's, tokenizers' parallelism), and Intel OpenMP's KMP_ (torch's CPU wheel uses GNU OpenMP;
# scikit-learn sets one on import, which would otherwise depend on what a test imported before).
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "GOMP_", "OPENBLAS", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "HF_",
                   "HUGGINGFACE", "TRANSFORMERS", "LD_", "XDG_", "HOME", "TMPDIR", "TEMP", "TMP", "LANG", "LC_")
ENV_HANDLED = {"PYTHONPATH", "PYTHONUNBUFFERED"}  # applied per child, as a fresh interpreter applies them
# What torchrun sets for its workers, read when a process group or the elastic agent starts, not on import.
RUNTIME_ENV = ("TORCHELASTIC_", "TORCH_ELASTIC_", "TORCH_NCCL_")

# The shim: stdlib only, started with -IS so that it takes milliseconds. Its fds 0-2 go to the
# server with the request; it then relays signals to the child and exits as the child did.
SHIM = r'''
import json, os, signal, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(SOCKET)
req = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ), "shim": sys.argv[0]}).encode()
socket.send_fds(s, [len(req).to_bytes(8, "big")], [0, 1, 2])
s.sendall(req)
f = s.makefile("r")
answer = json.loads(f.readline() or '{"exec": true}')
if answer.get("exec"):
    s.close()
    os.execv(REAL, [REAL, *sys.argv[1:]])
pid = answer["pid"]
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda n, _: os.kill(pid, n))
line = f.readline()
if not line:
    sys.exit("fork_server: the server went away before the command ended")
code = json.loads(line)["code"]
if code < 0:  # the child was killed by a signal: so is the shim, as the caller would see a fresh python
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


def unbuffered(argv: list[str]) -> tuple[bool, list[str]]:
    """`python -u ARGV` as (True, ARGV); any other command line as (False, itself)."""
    return (True, argv[1:]) if argv[:1] == ["-u"] else (False, argv)


def pythonpath(env: Mapping[str, str], cwd: str) -> list[str]:
    """env's PYTHONPATH entries, made absolute as an interpreter started in `cwd` reads them."""
    return [os.path.abspath(os.path.join(cwd, p)) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def why_not_forked(req: dict, startup_env: dict[str, str], set_on_import: dict[str, str]) -> str | None:
    """Why a fork would not run this request's command as a fresh interpreter would, or None.
    startup_env: the server's environment before it imported anything; set_on_import: what its
    imports added (a caller that has imported torch passes torch's own value on)."""
    env, argv = req["env"], unbuffered(req["argv"])[1]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-m", "-c")) or (argv[0] in ("-m", "-c")
                                                                                and len(argv) < 2):
        return f"a command line other than [-u] SCRIPT, -m MODULE or -c CODE: {argv[:2]}"
    keys = {k for k in {*env, *startup_env}
            if k.startswith(IMPORT_TIME_ENV) and not k.startswith(RUNTIME_ENV) and k not in ENV_HANDLED}
    same = {k: (startup_env.get(k), set_on_import.get(k, startup_env.get(k))) for k in keys}
    if differ := sorted(k for k in keys if env.get(k) not in same[k]):
        return f"its environment differs from the server's in {differ}"
    # a folder on the child's PYTHONPATH that holds its own copy of a preloaded package would be shadowed
    preloaded = {name for name in sys.modules if "." not in name} & {"torch", "transformers", "peft",
                                                                       "huggingface_hub", "tokenizers"}
    shadowed = [os.path.join(p, name) for p in pythonpath(env, req["cwd"])
                for name in preloaded if os.path.isdir(os.path.join(p, name))]
    return f"its PYTHONPATH holds its own {shadowed}" if shadowed else None


def run_child(req: dict, base_path: list[str], set_on_import: dict[str, str]) -> None:
    """In the forked child: become the command (`python ARGV`), then exit with its status.
    set_on_import: what the server's imports added to its environment (torch sets a cache folder)."""
    import io
    import runpy
    import threading
    import traceback
    import types

    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update({**req["env"], **set_on_import})
    sys.stdin = open(0, closefd=False)
    dash_u, argv = unbuffered(req["argv"])
    if dash_u or req["env"].get("PYTHONUNBUFFERED"):  # every write reaches the fd at once
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True,
                                                   encoding=old.encoding, errors=old.errors)
                                  for fd, old in ((1, sys.stdout), (2, sys.stderr)))
    sys.executable = req["shim"]
    extra = pythonpath(req["env"], req["cwd"])
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv, sys.path[:] = ["-c", *argv[2:]], ["", *extra, *base_path]
            main = sys.modules["__main__"] = types.ModuleType("__main__")  # the code's own, not the server's
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            sys.argv, sys.path[:] = [argv[1], *argv[2:]], [os.getcwd(), *extra, *base_path]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.realpath(argv[0])
            sys.argv, sys.path[:] = argv, [os.path.dirname(script), *extra, *base_path]
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # the traceback a fresh interpreter prints: this function's frame left out
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        code = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1  # python dies of an unhandled SIGINT
    threading._shutdown()  # noqa: SLF001 - a fresh interpreter joins its non-daemon threads at exit too
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 - os._exit below skips them
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the shim went away mid-request")
        body += chunk
    return json.loads(body), fds


def serve(path: str, startup_path: list[str], startup_env: dict[str, str]) -> None:
    """Accept shims until stdin closes; then kill what still runs. startup_path and startup_env: the
    server's sys.path (less its first entry) and environment before it imported anything."""
    set_on_import = {k: v for k, v in os.environ.items() if k not in startup_env}
    own = set(pythonpath(os.environ, os.getcwd()))
    base_path = [p for p in startup_path if os.path.abspath(p) not in own]
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    children: dict[int, socket.socket] = {}  # pid -> its shim's connection
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=0.05):
            if key.data == "stdin" and not sys.stdin.readline():
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                return
            if key.data == "accept":
                conn, _ = listener.accept()
                if (pid := start(conn, startup_env, set_on_import, base_path, [sel, listener, *children.values()])):
                    children[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
            elif isinstance(key.data, int) and key.data in children:  # the shim went away: so does its child
                os.kill(key.data, signal.SIGKILL)
        reap(children, sel)


def start(conn: socket.socket, startup_env: dict[str, str], set_on_import: dict[str, str], base_path: list[str],
          to_close: list) -> int | None:
    """One shim's request: its child's pid, told to the shim; or None (told to exec python itself)."""
    try:
        req, fds = recv_request(conn)
    except (ConnectionError, OSError, ValueError):
        conn.close()
        return None
    if why := why_not_forked(req, startup_env, set_on_import):
        print(f"fork_server: {req['argv'][:2]} runs in a fresh interpreter: {why}", file=sys.stderr, flush=True)
        conn.sendall(b'{"exec": true}\n')
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        for held in to_close:
            held.close()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        conn.close()
        run_child(req, base_path, set_on_import)
    for fd in fds:  # the child holds them now; kept here they would hold the caller's pipes open
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return pid


def reap(children: dict[int, socket.socket], sel: selectors.BaseSelector) -> None:
    """Each child that has ended: its exit status to its shim."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            sel.unregister(conn)
            try:
                conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:  # its shim was killed
                pass
            conn.close()


class ForkServer:
    """A running server and its shim: `ForkServer(env).python` is the path to use as `python`."""

    def __init__(self, env: dict[str, str] | None = None,
                 preload: tuple[str, ...] = ("torch", "transformers.modeling_utils", "peft")):
        self.tmp = Path(tempfile.mkdtemp(prefix="forkserver-"))
        sock = self.tmp / "sock"
        self.python = self.tmp / "python"
        self.python.write_text(f"#!{sys.executable} -IS\nSOCKET = {str(sock)!r}\nREAL = {sys.executable!r}\n{SHIM}")
        self.python.chmod(0o755)
        self.log = open(self.tmp / "server.err", "w")
        code = (f"import os, sys; path, env = sys.path[1:], dict(os.environ); "
                f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import fork_server; "
                f"[__import__(m) for m in {list(preload)!r}]; fork_server.serve({str(sock)!r}, path, env)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout.readline() == "ready\n", (self.tmp / "server.err").read_text()[-3000:]

    def fresh(self) -> list[str]:
        """The server's line for each command it did not fork, and why."""
        return [line for line in (self.tmp / "server.err").read_text().splitlines() if "fresh interpreter" in line]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        for _ in range(50):  # the last children's shims may still be exiting
            try:
                shutil.rmtree(self.tmp)
                return
            except OSError:
                time.sleep(0.1)
