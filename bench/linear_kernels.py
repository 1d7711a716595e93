"""torch's float32 linear kernel (MKL on x86) against oneDNN's, on this CPU, at a model's own shapes.

The evidence behind `--linear-kernel auto` (src/softprompt/base/cpu_linear.py): for each of the
model's linear shapes (its attention and MLP projections and its output layer, [out, in]) and a few
row counts M, the GFLOP/s of the forward (x @ W^T) and of the input gradient (g @ W) through each
kernel, median of `--repeats` calls after warm-up, and each kernel's error against float64
(max |y - y64| / max |y64|). Run it on a CPU where `auto`'s rule is not yet measured (an Intel CPU,
an AMD one without AVX-512) before changing the rule.

    python bench/linear_kernels.py                     # the built-in model's shapes, M = 16, 150, 420, 2048
    python bench/linear_kernels.py --rows 64 --repeats 5   # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, entry  # noqa: E402

from softprompt.base.cpu_linear import onednn_linear, resolve_kernel  # noqa: E402
from softprompt.base.models import cpu_vendor  # noqa: E402


def model_shapes(model_name: str) -> dict[str, tuple[int, int]]:
    """{layer name: (out, in)} of one decoder layer's linear layers and the output layer, from the config."""
    from transformers import AutoConfig

    from softprompt.base.models import builtin_model_dir
    from softprompt.core.config import BUILTIN_MODEL

    c = AutoConfig.from_pretrained(builtin_model_dir() if model_name == BUILTIN_MODEL else model_name)
    H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads) * (H // c.num_attention_heads)
    return {"q_proj/o_proj": (H, H), "k_proj/v_proj": (kv, H), "gate_proj/up_proj": (I, H), "down_proj": (H, I),
            "lm_head": (V, H)}


def timed(f, repeats: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(out: int, inp: int, M: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, inp, generator=g), torch.randn(out, inp, generator=g) / inp ** 0.5
    dy = torch.randn(M, out, generator=g)
    ref = x.double() @ w.double().t()
    flop = 2 * M * out * inp
    kernels = {"default": (lambda: torch.nn.functional.linear(x, w), lambda: dy @ w),
               "onednn": (lambda: onednn_linear(x, w, None), lambda: onednn_linear(dy, w.t(), None))}
    row = {"M": M}
    for name, (fwd, grad) in kernels.items():
        err = ((fwd().double() - ref).abs().max() / ref.abs().max()).item()
        row[name] = {"forward_gflops": flop / timed(fwd, repeats) / 1e9,
                     "input_grad_gflops": flop / timed(grad, repeats) / 1e9, "rel_error_vs_float64": err}
    row["onednn_over_default_forward"] = row["onednn"]["forward_gflops"] / row["default"]["forward_gflops"]
    row["onednn_over_default_input_grad"] = row["onednn"]["input_grad_gflops"] / row["default"]["input_grad_gflops"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 150, 420, 2048], help="row counts M")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "linear_kernels.json"))
    args = ap.parse_args()
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch has no oneDNN")
    shapes = model_shapes(args.model)
    res = Results(args.out, {"bench": "linear_kernels", "model": args.model, "args": vars(args),
                             "vendor": cpu_vendor(), "torch_config": torch.__config__.show().splitlines()[:6],
                             "warmup": "3 untimed calls per kernel and shape; medians of --repeats calls"})
    print(f"{'layer [out, in]':<28}{'M':>6}  {'torch fwd':>10} {'oneDNN fwd':>11} {'torch dX':>10} "
          f"{'oneDNN dX':>10}  GFLOP/s")
    for name, (o, i) in shapes.items():
        for M in args.rows:
            r = res.add({"layer": name, "shape": [o, i], **measure(o, i, M, args.repeats)})
            print(f"{name + f' [{o}, {i}]':<28}{M:>6}  {r['default']['forward_gflops']:>10.0f} "
                  f"{r['onednn']['forward_gflops']:>11.0f} {r['default']['input_grad_gflops']:>10.0f} "
                  f"{r['onednn']['input_grad_gflops']:>10.0f}", flush=True)
    rows = res.doc["rows"]
    summary = {f"onednn_over_default_{k}_median": statistics.median(r[f"onednn_over_default_{k}"] for r in rows)
               for k in ("forward", "input_grad")}
    summary["max_rel_error"] = {k: max(r[k]["rel_error_vs_float64"] for r in rows) for k in ("default", "onednn")}
    # what `auto` picks here, for a float32 base on this CPU (the rule in base/cpu_linear.py)
    probe = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    summary["auto_picks"], summary["auto_reason"] = resolve_kernel("auto", probe)
    res.set(summary=summary)
    print(f"median oneDNN/torch: forward {summary['onednn_over_default_forward_median']:.2f}x, input gradient "
          f"{summary['onednn_over_default_input_grad_median']:.2f}x; max error vs float64: torch "
          f"{summary['max_rel_error']['default']:.1e}, oneDNN {summary['max_rel_error']['onednn']:.1e}; "
          f"auto picks {summary['auto_picks']} here\nwrote {res.path}")


if __name__ == "__main__":
    entry(main)
