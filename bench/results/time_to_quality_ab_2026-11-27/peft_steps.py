import sys, torch
sys.path.insert(0, "bench")
from common import SHARED, load_bench_model, device_and_dtype
from softprompt.config import DataConfig, PromptConfig
import softprompt.data as D
if hasattr(D, "collate"):
    from softprompt.data import collate, pad_id
else:
    from softprompt.batching import collate, pad_id
from softprompt.data import load_splits
from softprompt.prompt import init_prompt
from peft import PromptTuningConfig, get_peft_model
DATA = dict(data=str(SHARED / "sst2" / "train.tsv"), eval_data=str(SHARED / "sst2" / "dev.tsv"),
            template="Review: {sentence}\nSentiment:", labels="negative,positive")
dev, dtype = device_and_dtype("cpu", "float32")
model, tok = load_bench_model("smollm2-135m-instruct", dev, dtype)
print("attn", model.config._attn_implementation, "threads", torch.get_num_threads(), "dtype", model.dtype)
print("wsum", sum(p.double().sum().item() for p in model.parameters()))
fmt, tr, de = load_splits(DataConfig(**DATA), tok, 0)
pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
emb = pm.prompt_encoder["default"].embedding.weight
emb.data.copy_(init_prompt(model, tok, PromptConfig(20, "text", init_text="Classify if the movie review is negative or positive.")).embeds)
opt = torch.optim.AdamW([emb], lr=3e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 300))
order = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0)).tolist()
for step in range(1, int(sys.argv[1]) + 1):
    b = collate([tr[i] for i in order[(step - 1) * 8: step * 8]], pad_id(tok))
    out = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets)
    out.loss.backward()
    gn = torch.nn.utils.clip_grad_norm_([emb], 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    print(step, f"{out.loss.item():.9f} {gn.item():.9f} {emb.double().sum().item():.9f}", flush=True)
    if step in (30, 100):
        from softprompt.evaluate import evaluate
        from softprompt.prompt import SoftPrompt
        torch.save(emb.detach().clone(), f"{sys.argv[2]}_{step}.pt")
        m = evaluate(model, tok, SoftPrompt(emb.detach().clone()), fmt, de, batch_size=32)
        print("EVAL", step, m["accuracy"], flush=True)
