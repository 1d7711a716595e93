"""What the server benchmarks (load_test.py, soak.py) share: the soft prompts they serve, the
machine's load while they run, percentiles.

The machine may be shared (two cores here, other people's jobs beside ours), so every phase
records what else ran during it: the load average, and the CPU time the whole machine spent
busy beside this process's own (both from /proc, Linux only; None elsewhere).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

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


def make_prompts(model, tok, root: Path, count: int, virtual_tokens: int, model_name: str,
                 meta: dict | None = None) -> list[str]:
    """`count` soft prompts text-initialised from TASKS, saved under root/task{k} as any trained
    prompt is; returns their names."""
    from softprompt.core.config import PromptConfig
    from softprompt.prompts.prompt import init_prompt, save_prompt

    names = []
    for k in range(count):
        sp = init_prompt(model, tok, PromptConfig(virtual_tokens, "text", init_text=TASKS[k]))
        save_prompt(sp, root / f"task{k}", {"model": model_name, **(meta or {})})
        names.append(f"task{k}")
    return names


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, steal) jiffies of the whole machine since boot."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = f[3] + f[4]  # idle + iowait
    return sum(f[:8]) - idle - f[7], f[7]


class MachineLoad:
    """What the machine did between `start()` and `stop()`: load averages, and CPU-seconds spent
    by this process and by everything else (other people's jobs, when the machine is shared)."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        self.t0, self.j0, self.own0 = time.monotonic(), _cpu_jiffies(), self._own()
        self.load0 = self._loadavg()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @staticmethod
    def _loadavg() -> list[float] | None:
        try:
            return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        except OSError:
            return None

    def stop(self, own_cpu: float = 0.0) -> dict:
        """The figures since start(); `own_cpu`: CPU-seconds of processes of ours that this one
        did not start and wait for (a server in its own process), counted as ours."""
        wall, j1 = time.monotonic() - self.t0, _cpu_jiffies()
        own = self._own() - self.own0 + own_cpu
        out = {"wall_seconds": wall, "loadavg_before": self.load0, "loadavg_after": self._loadavg(),
               "cores": os.cpu_count(), "own_cpu_seconds": own}
        if self.j0 and j1:
            hz = os.sysconf("SC_CLK_TCK")
            busy = (j1[0] - self.j0[0]) / hz
            out.update(machine_busy_cpu_seconds=busy, others_cpu_seconds=max(0.0, busy - own),
                       others_mean_cores=max(0.0, busy - own) / wall if wall else 0.0,
                       steal_cpu_seconds=(j1[1] - self.j0[1]) / hz)
        return out


def describe_load(m: dict) -> str:
    """One line for a MachineLoad figure."""
    others = f"{m['others_mean_cores']:.2f} of {m['cores']} cores busy with other work" \
        if "others_mean_cores" in m else "others unknown"
    return (f"load average {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}; {others}; "
            f"steal {m.get('steal_cpu_seconds', 0):.1f} s")


def scrape(text: str) -> dict[str, float]:
    """A /metrics page as {sample name: value} for the unlabelled samples, plus the requests
    counted by status class (responses_2xx, responses_4xx, responses_499, responses_5xx)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
            elif s.name == "softprompt_requests_total":
                code = s.labels["code"]
                key = "responses_499" if code == "499" else f"responses_{code[0]}xx"
                out[key] = out.get(key, 0) + s.value
    return out
