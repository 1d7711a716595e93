"""Load test of `softprompt serve`: many prompts, concurrent clients, batched vs one at a time.

Starts the server in this process on a loopback port, makes N soft prompts (text-initialised from
N different task descriptions, saved as safetensors and loaded by the server like any others),
then sends the same fixed list of requests twice through HTTP:
1. from C concurrent clients (the scheduler batches them across prompts);
2. one at a time (each request alone in its batch).
It checks every concurrent answer equals its one-at-a-time answer (greedy decoding), counts errors,
and prints requests/s and p50/p99 latency of both, writing them as JSON. Bounded: a fixed number of
requests and a wall-clock limit per phase; loopback only.

    python bench/load_test.py --model smollm2-135m-instruct --prompts 8 --clients 32 --requests 64 \\
        --max-new-tokens 16 --out bench/results/load_test.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = [
    "Classify the sentiment of the movie review as negative or positive.",
    "Give the country's capital, continent and main language as key=value pairs.",
    "Translate the English sentence into French.",
    "Summarise the news article in one sentence.",
    "Answer the trivia question with a short fact.",
    "Act as a helpful travel guide and suggest places to visit.",
    "Rewrite the sentence in a formal business tone.",
    "Extract the person names mentioned in the text.",
    "Write a short poem about the given topic.",
    "Explain the programming concept to a beginner.",
]
INPUTS = [
    "Review: a dull, lifeless film with no surprises.\nSentiment:", "Country: Peru\nFacts:",
    "English: The weather is nice today.\nFrench:", "Article: The city council approved a new park budget.\nSummary:",
    "Question: What is the largest planet?\nAnswer:", "City: Lisbon\nPlaces:",
    "Sentence: we gotta fix this asap.\nFormal:", "Text: Ada met Alan in London.\nNames:",
    "Topic: autumn leaves\nPoem:", "Concept: recursion\nExplanation:",
    "Review: a warm, funny and moving story.\nSentiment:", "Country: Kenya\nFacts:",
]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def run_phase(url: str, reqs: list[dict], clients: int, time_limit: float) -> dict:
    """Send `reqs` from `clients` threads (each its own connection); stop issuing after time_limit."""
    import httpx

    results: list[dict | None] = [None] * len(reqs)
    nxt, lock, deadline = [0], threading.Lock(), time.monotonic() + time_limit

    def client():
        with httpx.Client(base_url=url, timeout=max(5.0, time_limit)) as c:
            while True:
                with lock:
                    i = nxt[0]
                    if i >= len(reqs) or time.monotonic() > deadline:
                        return
                    nxt[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/completions", json=reqs[i])
                    ok = r.status_code == 200
                    text = r.json()["choices"][0]["text"] if ok else r.text[:200]
                    results[i] = {"ok": ok, "status": r.status_code, "text": text,
                                  "seconds": time.perf_counter() - t0}
                except Exception as e:  # counted as an error, never fatal to the run
                    results[i] = {"ok": False, "status": 0, "text": repr(e)[:200], "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    lat = [r["seconds"] for r in done if r["ok"]]
    return {"results": results, "wall_seconds": wall, "completed": len(done),
            "errors": sum(not r["ok"] for r in done), "not_sent": len(reqs) - len(done),
            "requests_per_second": len(lat) / wall if wall else 0.0,
            "p50_seconds": percentile(lat, 50) if lat else None, "p99_seconds": percentile(lat, 99) if lat else None,
            "mean_seconds": statistics.fmean(lat) if lat else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8, help="soft prompts to serve (text-initialised)")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients in the batched phase")
    ap.add_argument("--requests", type=int, default=64, help="requests per phase (the same list both times)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase before it stops sending")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="bench/results/load_test.json")
    a = ap.parse_args(argv)
    if a.prompts > len(TASKS):
        ap.error(f"--prompts at most {len(TASKS)}")

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from softprompt.config import PromptConfig, ServeConfig
    from softprompt.models import load_model
    from softprompt.prompt import init_prompt, save_prompt
    from softprompt.serve import Running, create_app

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="softprompt-load-"))
    names = []
    for k in range(a.prompts):
        sp = init_prompt(model, tok, PromptConfig(a.virtual_tokens, "text", init_text=TASKS[k]))
        save_prompt(sp, tmp / f"task{k}", {"model": a.model})
        names.append(f"task{k}")
    cfg = ServeConfig(max_batch=a.max_batch, max_queue=max(64, 2 * a.clients), batch_wait_ms=a.batch_wait_ms,
                      max_new_tokens=max(256, a.max_new_tokens))
    app = create_app(model, tok, {n: str(tmp / n) for n in names}, cfg, model_name=a.model)
    server = Running(app)  # 127.0.0.1 only
    # Every prompt gets requests with several different inputs; the list is fixed, so both phases match.
    reqs = [{"model": names[i % len(names)], "prompt": INPUTS[(i * 5 + i // len(names)) % len(INPUTS)],
             "max_tokens": a.max_new_tokens, "temperature": 0} for i in range(a.requests)]
    try:
        run_phase(server.url, reqs[:2], 1, a.time_limit)  # warm-up (first-use costs), not measured
        sched = app.state.scheduler
        b0, j0 = sched.stats["batches"], sched.stats["batch_jobs"]
        batched = run_phase(server.url, reqs, a.clients, a.time_limit)
        rows_per_batch = (sched.stats["batch_jobs"] - j0) / max(1, sched.stats["batches"] - b0)
        single = run_phase(server.url, reqs, 1, a.time_limit)
    finally:
        server.stop()
    pairs = [(b, s) for b, s in zip(batched["results"], single["results"]) if b and s and b["ok"] and s["ok"]]
    mismatches = sum(b["text"] != s["text"] for b, s in pairs)
    strip = lambda p: {k: v for k, v in p.items() if k != "results"}  # noqa: E731
    report = {
        "model": a.model, "prompts": a.prompts, "virtual_tokens": a.virtual_tokens, "clients": a.clients,
        "requests": a.requests, "max_new_tokens": a.max_new_tokens, "max_batch": a.max_batch,
        "torch_threads": torch.get_num_threads(), "device": str(model.device),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
        "batched": strip(batched), "one_at_a_time": strip(single), "mean_rows_per_batch": rows_per_batch,
        "compared": len(pairs), "mismatches": mismatches,
        "speedup_requests_per_second": (batched["requests_per_second"] / single["requests_per_second"]
                                        if single["requests_per_second"] else None),
        "examples": [{"model": r["model"], "prompt": r["prompt"], "text": s["text"]}
                     for r, s in list(zip(reqs, single["results"]))[:3] if s],
    }
    print(f"{a.requests} requests, {a.prompts} prompts, {a.clients} clients, {a.max_new_tokens} new tokens each, "
          f"model {a.model} on {report['machine']} ({report['torch_threads']} torch threads)")
    for name, p in (("batched (concurrent)", batched), ("one at a time", single)):
        fmt = lambda x: f"{1000 * x:.0f} ms" if x is not None else "n/a"  # noqa: E731
        print(f"  {name:22s} {p['requests_per_second']:7.2f} req/s  p50 {fmt(p['p50_seconds'])}  "
              f"p99 {fmt(p['p99_seconds'])}  errors {p['errors']}  not sent {p['not_sent']}  "
              f"wall {p['wall_seconds']:.1f} s")
    print(f"  speedup {report['speedup_requests_per_second'] or 0:.2f}x requests/s; {rows_per_batch:.1f} requests per "
          f"batch on average; {len(pairs)} answers compared, {mismatches} differ from one-at-a-time")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"  wrote {a.out}")
    ok = (batched["errors"] == 0 and single["errors"] == 0 and mismatches == 0
          and batched["not_sent"] == 0 and single["not_sent"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
