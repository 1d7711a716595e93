"""Load test of `softprompt serve`: many prompts, concurrent clients, batched vs one at a time.

Starts the server in this process on a loopback port, makes N soft prompts (text-initialised from
N different task descriptions, saved as safetensors and loaded by the server like any others),
then sends the same fixed list of requests twice through HTTP:
1. from C concurrent clients (the scheduler batches them across prompts);
2. one at a time (each request alone in its batch).
It checks every concurrent answer equals its one-at-a-time answer (greedy decoding), counts errors,
and prints requests/s and p50/p99 latency of both, writing them as JSON. Bounded: a fixed number of
requests and a wall-clock limit per phase; loopback only.

Where the time goes: each phase reports the scheduler thread's seconds in prefill and in decode
steps, its mean rows per step and step time, and the latency Little's law predicts for C clients
that always wait (C / throughput): when the scheduler is busy throughout and the measured mean
latency matches that figure, latency is set by the compute per second, not by the scheduling.
Each phase also records the machine's load (other people's jobs on a shared machine).

    python bench/load_test.py --model smollm2-135m-instruct --prompts 8 --clients 32 --requests 64 \\
        --max-new-tokens 16 --threads 1 --out bench/results/load_test.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import Results, attn_implementation, entry  # noqa: E402
from serve_common import MachineLoad, describe_load, make_prompts, percentile  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INPUTS = [
    "Review: a dull, lifeless film with no surprises.\nSentiment:", "Country: Peru\nFacts:",
    "English: The weather is nice today.\nFrench:", "Article: The city council approved a new park budget.\nSummary:",
    "Question: What is the largest planet?\nAnswer:", "City: Lisbon\nPlaces:",
    "Sentence: we gotta fix this asap.\nFormal:", "Text: Ada met Alan in London.\nNames:",
    "Topic: autumn leaves\nPoem:", "Concept: recursion\nExplanation:",
    "Review: a warm, funny and moving story.\nSentiment:", "Country: Kenya\nFacts:",
]


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


SCHED_STATS = ("batches", "batch_jobs", "decode_steps", "decode_rows", "prefill_seconds", "decode_seconds",
               "classify_seconds", "generated_tokens")


def measured(sched, url: str, reqs: list[dict], clients: int, time_limit: float) -> dict:
    """run_phase, plus where the scheduler thread spent the phase and what else the machine ran."""
    before = {k: sched.stats[k] for k in SCHED_STATS}
    load = MachineLoad()
    out = run_phase(url, reqs, clients, time_limit)
    out["machine"] = load.stop()
    d = {k: sched.stats[k] - before[k] for k in SCHED_STATS}
    wall = out["wall_seconds"]
    out["scheduler"] = {
        **d, "busy_fraction": (d["prefill_seconds"] + d["decode_seconds"]) / wall if wall else None,
        "mean_rows_per_step": d["decode_rows"] / d["decode_steps"] if d["decode_steps"] else None,
        "mean_step_ms": 1000 * d["decode_seconds"] / d["decode_steps"] if d["decode_steps"] else None,
        "mean_jobs_per_admission": d["batch_jobs"] / d["batches"] if d["batches"] else None}
    rps = out["requests_per_second"]
    out["littles_law_mean_seconds"] = clients / rps if rps else None  # C clients always waiting
    return out


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
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default; 1 is steadier on a machine shared with other jobs)")
    ap.add_argument("--out", default="bench/results/load_test.json")
    a = ap.parse_args(argv)
    if a.prompts > 10:
        ap.error("--prompts at most 10")

    import torch

    from softprompt.core.config import ServeConfig
    from softprompt.base.models import load_model
    from softprompt.serve import Running, create_app

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    tmp = Path(tempfile.mkdtemp(prefix="softprompt-load-"))
    names = make_prompts(model, tok, tmp, a.prompts, a.virtual_tokens, a.model)
    cfg = ServeConfig(max_batch=a.max_batch, max_queue=max(64, 2 * a.clients), batch_wait_ms=a.batch_wait_ms,
                      max_new_tokens=max(256, a.max_new_tokens))
    app = create_app(model, tok, {n: str(tmp / n) for n in names}, cfg, model_name=a.model)
    server = Running(app)  # 127.0.0.1 only
    # Every prompt gets requests with several different inputs; the list is fixed, so both phases match.
    reqs = [{"model": names[i % len(names)], "prompt": INPUTS[(i * 5 + i // len(names)) % len(INPUTS)],
             "max_tokens": a.max_new_tokens, "temperature": 0} for i in range(a.requests)]
    sched = app.state.scheduler
    res = Results(a.out, {"settings": vars(a), "attn_implementation": attn_implementation(model),
                          "warmup": "2 requests from 1 client before the phases, not measured"}, key=None)
    strip = lambda p: {k: v for k, v in p.items() if k != "results"}  # noqa: E731
    try:
        run_phase(server.url, reqs[:2], 1, a.time_limit)  # warm-up (first-use costs), not measured
        batched = measured(sched, server.url, reqs, a.clients, a.time_limit)
        res.set(batched=strip(batched))  # each phase kept as it ends
        single = measured(sched, server.url, reqs, 1, a.time_limit)
    finally:
        server.stop()
    report = summary(a, torch, model, reqs, batched, single)
    print_report(a, report, batched, single)
    res.set(**report)
    print(f"  wrote {a.out}")
    ok = (batched["errors"] == 0 and single["errors"] == 0 and report["mismatches"] == 0
          and batched["not_sent"] == 0 and single["not_sent"] == 0)
    return 0 if ok else 1


def summary(a, torch, model, reqs: list[dict], batched: dict, single: dict) -> dict:
    pairs = [(b, s) for b, s in zip(batched["results"], single["results"]) if b and s and b["ok"] and s["ok"]]
    strip = lambda p: {k: v for k, v in p.items() if k != "results"}  # noqa: E731
    ratio = lambda x, y: x / y if x and y else None  # noqa: E731
    return {
        "model": a.model, "prompts": a.prompts, "virtual_tokens": a.virtual_tokens, "clients": a.clients,
        "requests": a.requests, "max_new_tokens": a.max_new_tokens, "max_batch": a.max_batch,
        "scheduler": "continuous batching", "torch_threads": torch.get_num_threads(), "device": str(model.device),
        "cpus": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
        "batched": strip(batched), "one_at_a_time": strip(single),
        "compared": len(pairs), "mismatches": sum(b["text"] != s["text"] for b, s in pairs),
        "speedup_requests_per_second": ratio(batched["requests_per_second"], single["requests_per_second"]),
        "p50_ratio": ratio(batched["p50_seconds"], single["p50_seconds"]),
        "p99_ratio": ratio(batched["p99_seconds"], single["p99_seconds"]),
        # The throughput at which C clients that always wait would see 1.5x the one-at-a-time p50.
        "speedup_needed_for_p50_1_5x": ratio(a.clients / (1.5 * single["p50_seconds"]),
                                             single["requests_per_second"]) if single["p50_seconds"] else None,
        "examples": [{"model": r["model"], "prompt": r["prompt"], "text": s["text"]}
                     for r, s in list(zip(reqs, single["results"]))[:3] if s],
    }


def print_report(a, report: dict, batched: dict, single: dict) -> None:
    fmt = lambda x: f"{1000 * x:.0f} ms" if x is not None else "n/a"  # noqa: E731
    print(f"{a.requests} requests, {a.prompts} prompts, {a.clients} clients, {a.max_new_tokens} new tokens each, "
          f"model {a.model} on {report['cpus']} ({report['torch_threads']} torch threads)")
    for name, p in (("batched (concurrent)", batched), ("one at a time", single)):
        sc = p["scheduler"]
        print(f"  {name:22s} {p['requests_per_second']:7.2f} req/s  p50 {fmt(p['p50_seconds'])}  "
              f"p99 {fmt(p['p99_seconds'])}  mean {fmt(p['mean_seconds'])}  errors {p['errors']}  "
              f"not sent {p['not_sent']}  wall {p['wall_seconds']:.1f} s")
        print(f"  {'':22s} scheduler: prefill {sc['prefill_seconds']:.1f} s, decode {sc['decode_seconds']:.1f} s "
              f"({sc['decode_steps']} steps of {sc['mean_rows_per_step'] or 0:.1f} rows, "
              f"{sc['mean_step_ms'] or 0:.0f} ms each), busy {100 * (sc['busy_fraction'] or 0):.0f}% of the wall; "
              f"Little's law mean {fmt(p['littles_law_mean_seconds'])}")
        print(f"  {'':22s} machine: {describe_load(p['machine'])}")
    print(f"  speedup {report['speedup_requests_per_second'] or 0:.2f}x requests/s; "
          f"p50 {report['p50_ratio'] or 0:.2f}x and p99 {report['p99_ratio'] or 0:.2f}x one-at-a-time; "
          f"{report['compared']} answers compared, {report['mismatches']} differ from one-at-a-time")
    print(f"  p50 at 1.5x one-at-a-time with {a.clients} clients always waiting needs "
          f"{report['speedup_needed_for_p50_1_5x'] or 0:.1f}x the one-at-a-time throughput (Little's law)")


if __name__ == "__main__":
    entry(main)
