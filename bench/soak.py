"""Soak test of `softprompt serve`: minutes of mixed traffic with clients that leave mid-request.

Starts `softprompt serve` in its own process (so that its memory is its own) on a loopback port
with three text-initialised soft prompts, then runs C client threads for the given minutes, each
sending requests of random kinds back to back:
- completions and chat, greedy and sampled (seeded), some with n = 2 or a stop string;
- classification over the prompt's own labels;
- streamed completions and chat;
- about one request in eight gives up early: a streamed one closes after its first event, any
  other times out after 0.05-0.5 s (the server must cancel its work and count a 499);
- every 30 s, an admin load of a fourth prompt, two requests to it, and its unload.
Greedy answers (and seeded sampled ones) must not change over the run: each is compared with the
first answer to the same request. A sampler records the server's resident memory (RSS) and its
/metrics every 15 s. At the end the server must be idle and healthy, with no 5xx and no
traceback in its log, and SIGTERM must stop it with exit status 0.

Prints the error count, RSS at the start (after a warm-up) and at the end, and writes JSON:

    python bench/soak.py --minutes 10 --clients 8 --threads 1 --out bench/results/soak.json

On a machine shared with other jobs, --threads 1 keeps torch's threads from waiting on each other
(two threads on two busy cores ran this soak about 15 times slower).
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from common import Results, entry  # noqa: E402
from serve_common import MachineLoad, describe_load, make_prompts, percentile, scrape  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKEN = "soak-admin-token"
LABELS = ["negative", "positive"]
INPUTS = ["Review: a dull, lifeless film with no surprises.\nSentiment:", "Country: Peru\nFacts:",
          "English: The weather is nice today.\nFrench:", "Question: What is the largest planet?\nAnswer:",
          "Sentence: we gotta fix this asap.\nFormal:", "Topic: autumn leaves\nPoem:"]
REVIEWS = ["a warm, funny and moving story", "a dull, lifeless film", "not bad at all", "two hours I want back"]
# kind: weight. Streams and give-ups are drawn on top of these (see Traffic.request).
KINDS = {"completion": 4, "completion_sampled": 2, "chat": 2, "chat_sampled": 1, "classify": 2}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (its threads included)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Traffic:
    """The clients' side: draws requests, sends them, and records outcomes, latencies and the
    first answer to each deterministic request (greedy, or sampled with a seed)."""

    def __init__(self, url: str, names: list[str], base: str, give_up: float, seed: int):
        self.url, self.names, self.base, self.give_up = url, names, base, give_up
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()  # (kind, outcome)
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.answers: dict[str, str] = {}
        self.compared = self.mismatches = 0
        self.errors: list[str] = []

    def draw(self, rng: random.Random) -> tuple[str, str, dict, bool]:
        """(kind, path, body, stream) of a random request."""
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        model = rng.choice(self.names + [self.base])
        if kind == "classify":
            return kind, "/v1/classify", {"task": self.names[0], "text": f"Review: {rng.choice(REVIEWS)}\n"
                                                                         "Sentiment:"}, False
        body = {"model": model, "max_tokens": rng.choice([4, 8, 16, 32])}
        if kind.endswith("sampled"):
            body.update(temperature=0.9, top_p=0.9, seed=rng.randrange(4), n=rng.choice([1, 2]))
        elif rng.random() < 0.2:
            body["stop"] = ["\n"]
        if kind.startswith("chat"):
            body["messages"] = [{"role": "user", "content": rng.choice(INPUTS)}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = rng.choice(INPUTS)
            path = "/v1/completions"
        return kind, path, body, rng.random() < 0.3

    def run(self, c, deadline: float) -> None:
        rng = random.Random(self.rng.random())
        while time.monotonic() < deadline:
            kind, path, body, stream = self.draw(rng)
            leave = rng.random() < self.give_up
            if leave and "max_tokens" in body:
                body["max_tokens"] = 64  # long enough to be cut mid-decode
            t0 = time.perf_counter()
            try:
                outcome, answer = (self.streamed(c, path, body, leave) if stream else
                                   self.plain(c, path, body, rng.uniform(0.05, 0.5) if leave else 120.0))
            except Exception as e:  # a transport error the client did not ask for
                outcome, answer = "error", None
                self.note(f"{kind} {type(e).__name__}: {e}")
            name = kind + ("_stream" if stream else "")
            with self.lock:
                self.outcomes[(name, outcome)] += 1
                if outcome == "ok":
                    self.latency[name].append(time.perf_counter() - t0)
                    self.check(path, body, answer)

    def plain(self, c, path: str, body: dict, timeout: float) -> tuple[str, str | None]:
        import httpx

        try:
            r = c.post(path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            return "left", None
        if r.status_code != 200:
            self.note(f"{path} {r.status_code}: {r.text[:200]}")
            return "error", None
        data = r.json()
        if path == "/v1/classify":
            return "ok", data["label"]
        return "ok", json.dumps([ch.get("text", ch.get("message", {}).get("content")) for ch in data["choices"]])

    def streamed(self, c, path: str, body: dict, leave: bool) -> tuple[str, str | None]:
        texts: dict[int, str] = collections.defaultdict(str)
        with c.stream("POST", path, json={**body, "stream": True}, timeout=120.0) as r:
            if r.status_code != 200:
                self.note(f"{path} stream {r.status_code}: {r.read()[:200]!r}")
                return "error", None
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    self.note(f"{path} stream event: {ev['error']}")
                    return "error", None
                if leave:
                    return "left", None  # closing the response drops the connection mid-stream
                for ch in ev["choices"]:
                    texts[ch["index"]] += ch.get("text") or ch.get("delta", {}).get("content") or ""
        return "ok", json.dumps([texts[i] for i in range(body.get("n", 1))])

    def check(self, path: str, body: dict, answer: str | None) -> None:
        """The same deterministic request always gets the same answer (streamed or not)."""
        key = json.dumps([path, {k: v for k, v in body.items() if k != "stream"}], sort_keys=True)
        if key in self.answers:
            self.compared += 1
            if self.answers[key] != answer:
                self.mismatches += 1
                self.note(f"answer changed for {key}: {self.answers[key]!r} then {answer!r}")
        else:
            self.answers[key] = answer

    def note(self, msg: str) -> None:
        with self.lock:
            if len(self.errors) < 20:
                self.errors.append(msg)


def admin_churn(url: str, prompt_dir: Path, deadline: float, every: float, out: collections.Counter) -> None:
    """Load a prompt, use it, unload it, every `every` seconds (the server's KV cache must forget it)."""
    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=120) as c:
        while time.monotonic() + every < deadline:
            time.sleep(every)
            steps = [c.post("/v1/admin/prompts", json={"name": "churn", "path": str(prompt_dir)}, headers=auth)]
            steps += [c.post("/v1/completions", json={"model": "churn", "prompt": p, "max_tokens": 8})
                      for p in INPUTS[:2]]
            steps.append(c.delete("/v1/admin/prompts/churn", headers=auth))
            out["ok" if [r.status_code for r in steps] == [201, 200, 200, 200] else "error"] += 1


def client(traffic: Traffic, url: str, deadline: float) -> None:
    import httpx

    with httpx.Client(base_url=url) as c:  # one connection per client, as a real one keeps
        traffic.run(c, deadline)


def sample(url: str, pid: int, stop: threading.Event, every: float, timeline: list) -> None:
    import httpx

    t0 = time.monotonic()
    while not stop.wait(every):
        try:
            m = scrape(httpx.get(url + "/metrics", timeout=30).text)
        except Exception as e:  # recorded, never fatal to the run
            m = {"error": repr(e)[:200]}
        timeline.append({"t": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(pid), **m})


def start_server(args, names: list[str], root: Path, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "softprompt", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "64", "--read-timeout", "10",
           "--shutdown-timeout", "10", "--max-new-tokens", "64"]
    for n in names:
        cmd += ["--prompt", f"{n}={root / n}"]
    env = {**os.environ, "SOFTPROMPT_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(ROOT / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, limit: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not answer /health")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--minutes", type=float, default=10.0, help="traffic time, after the warm-up")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--give-up", type=float, default=0.125, help="share of requests whose client leaves early")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/soak.json")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="softprompt-soak-"))
    names, churn, attn = prepare_prompts(a, root)
    # Written first, so that a run stopped by a time limit still says what ran; the result at the end.
    res = Results(a.out, {"settings": vars(a), "attn_implementation": attn,
                          "warmup": "20 s of the same traffic from one client before the baseline"}, key=None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = start_server(a, names, root, port, log)
        try:
            wait_healthy(url, proc)
            report = soak(a, url, proc, names, churn)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                report_exit = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                report_exit = "killed after 60 s"
    text = log_path.read_text(errors="replace")
    report.update(exit_status_after_sigterm=report_exit, tracebacks_in_server_log=text.count("Traceback"),
                  server_log=str(log_path))
    return finish(res, report)


def prepare_prompts(a, root: Path) -> tuple[list[str], Path, str | None]:
    """Three prompts to serve (the first with labels, for classify), one for the admin churn, and
    the attention implementation the model loads with (the server loads it the same way)."""
    from softprompt.base.models import load_model

    model, tok = load_model(a.model)
    names = make_prompts(model, tok, root, 4, 20, a.model, {"labels": LABELS})
    attn = getattr(model.config, "_attn_implementation", None)
    del model
    gc.collect()
    return names[:3], root / names[3], attn


def soak(a, url: str, proc: subprocess.Popen, names: list[str], churn: Path) -> dict:
    import httpx

    warm = Traffic(url, names, a.model, 0.0, a.seed + 1)
    with httpx.Client(base_url=url) as c:
        warm.run(c, time.monotonic() + 20)  # first-use costs (prompt KV, allocator) before the baseline
    rss0, cpu0 = rss_mb(proc.pid), cpu_seconds(proc.pid)
    traffic = Traffic(url, names, a.model, a.give_up, a.seed)
    churned, timeline, stop = collections.Counter(), [], threading.Event()
    load = MachineLoad()
    deadline = time.monotonic() + 60 * a.minutes
    threads = [threading.Thread(target=client, args=(traffic, url, deadline)) for _ in range(a.clients)]
    threads += [threading.Thread(target=admin_churn, args=(url, churn, deadline, 30.0, churned)),
                threading.Thread(target=sample, args=(url, proc.pid, stop, 15.0, timeline))]
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join()
    stop.set()
    threads[-1].join()
    machine = load.stop(own_cpu=cpu_seconds(proc.pid) - cpu0)
    time.sleep(2)  # let the cancelled rows leave
    health = httpx.get(url + "/health", timeout=30)
    end = scrape(httpx.get(url + "/metrics", timeout=30).text)
    return {"minutes": a.minutes, "clients": a.clients, "give_up": a.give_up, "max_batch": a.max_batch,
            "model": a.model, "threads": a.threads or "default", "machine_load": machine,
            "requests": sum(traffic.outcomes.values()),
            "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(traffic.outcomes.items())},
            "errors": sum(n for (_, o), n in traffic.outcomes.items() if o == "error") + churned["error"],
            "clients_left": sum(n for (_, o), n in traffic.outcomes.items() if o == "left"),
            "admin_churn": dict(churned), "first_errors": traffic.errors,
            "answers_compared": traffic.compared, "answers_changed": traffic.mismatches,
            "p50_seconds": {k: percentile(v, 50) for k, v in sorted(traffic.latency.items())},
            "rss_mb_start": rss0, "rss_mb_end": rss_mb(proc.pid),
            "rss_mb_timeline": [(s["t"], s["rss_mb"]) for s in timeline],
            "health_end": {**health.json(), "http": health.status_code}, "metrics_end": end,
            "timeline": timeline}


def finish(res: Results, r: dict) -> int:
    tl = [m for _, m in r["rss_mb_timeline"] if m]
    half = tl[len(tl) // 2:] or [0]
    r["rss_mb_second_half_range"] = [min(half), max(half)]
    print(f"soak: {r['minutes']:g} min, {r['clients']} clients, {r['requests']} requests "
          f"({r['clients_left']} clients left early), model {r['model']}")
    print(f"  errors {r['errors']}; answers compared {r['answers_compared']}, changed {r['answers_changed']}; "
          f"admin churn {r['admin_churn']}")
    print(f"  server RSS {r['rss_mb_start']:.0f} MB at the start, {r['rss_mb_end']:.0f} MB at the end "
          f"(second half {min(half):.0f}-{max(half):.0f} MB)")
    m = r["metrics_end"]
    print(f"  at the end: /health {r['health_end']['http']} {r['health_end'].get('status')}, queue "
          f"{m.get('softprompt_queue_depth')}, decoding rows {m.get('softprompt_decoding_rows')}, 5xx "
          f"{m.get('responses_5xx')}, 499 {m.get('responses_499')}, cancelled jobs "
          f"{m.get('softprompt_cancelled_jobs_total')}; SIGTERM exit {r['exit_status_after_sigterm']}; "
          f"tracebacks in the server log {r['tracebacks_in_server_log']}")
    print(f"  machine: {describe_load(r['machine_load'])}")
    for e in r["first_errors"][:5]:
        print(f"  error: {e}")
    res.set(**r)
    print(f"  wrote {res.path}")
    ok = (r["errors"] == 0 and r["answers_changed"] == 0 and r["health_end"]["http"] == 200
          and r["exit_status_after_sigterm"] == 0 and r["tracebacks_in_server_log"] == 0 and not m.get("responses_5xx"))
    return 0 if ok else 1


if __name__ == "__main__":
    entry(main)
