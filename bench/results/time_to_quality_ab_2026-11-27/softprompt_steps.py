import sys, json, tempfile, hashlib, argparse
from pathlib import Path
sys.path.insert(0, "bench")
import time_to_quality as T
from common import load_bench_model, device_and_dtype
from softprompt.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.train import train
dev, dtype = device_and_dtype("cpu", "float32")
model, tok = load_bench_model("smollm2-135m-instruct", dev, dtype)
out = sys.argv[1]
train(ModelConfig(device="cpu"), DataConfig(**T.DATA), PromptConfig(),
      TrainConfig(out=out, max_steps=300, eval_every=100, save_every=0, seed=0, eval_untuned=False),
      model=model, tok=tok, quiet=True)
for l in (Path(out) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(l); r.pop("seconds", None); r.pop("elapsed", None)
    print({k: v for k, v in r.items() if "sec" not in k and "time" not in k and "per_s" not in k})
for f in sorted(Path(out).glob("*.safetensors")):
    print(f.name, hashlib.md5(f.read_bytes()).hexdigest())
