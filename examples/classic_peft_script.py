"""The classic PEFT prompt-tuning script (PEFT's and Hugging Face's bloomz-560m recipe): wrap a causal
LM with get_peft_model(PromptTuningConfig(...)), tokenize awesome-chatgpt-prompts, train with
transformers.Trainer, save, reload with PeftModel.from_pretrained, then generate with the untuned
and the tuned model side by side. Here on softprompt's built-in SmolLM2-135M-Instruct and the
local copy of the data, so it runs offline.

classic_softprompt_script.py is this file with the `from peft import` line changed to
`from softprompt import`: the same script, run by softprompt.

    python examples/classic_peft_script.py [--max-steps 2] [--json result.json]
"""
import argparse
import csv
import json
import resource
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from softprompt.base.models import builtin_model_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "awesome-chatgpt-prompts" / "prompts.csv"

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--max-steps", type=int, default=-1, help="optimiser steps (default: --epochs over the rows)")
ap.add_argument("--epochs", type=float, default=5)
ap.add_argument("--rows", type=int, default=50, help="training rows (the recipe's 50)")
ap.add_argument("--max-new-tokens", type=int, default=50)
ap.add_argument("--data", default=str(DATA))
ap.add_argument("--out", default="runs/classic_prompt", help="where the adapter is saved")
ap.add_argument("--json", default="", help="also write the results to this file")
args = ap.parse_args()
if not Path(args.data).is_file():  # before the model loads
    ap.error(f"--data {args.data}: no such file (awesome-chatgpt-prompts' prompts.csv, from "
             "https://huggingface.co/datasets/fka/awesome-chatgpt-prompts)")
torch.manual_seed(0)

model_name_or_path = str(builtin_model_dir())  # the built-in model's cached folder
tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
foundational_model = AutoModelForCausalLM.from_pretrained(model_name_or_path)


def get_outputs(model, inputs, max_new_tokens=args.max_new_tokens):
    return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          max_new_tokens=max_new_tokens, repetition_penalty=1.5, early_stopping=True,
                          eos_token_id=tokenizer.eos_token_id)


input_prompt = tokenizer("I want you to act as a motivational coach. ", return_tensors="pt")
untuned = tokenizer.batch_decode(get_outputs(foundational_model, input_prompt), skip_special_tokens=True)[0]

# The recipe's load_dataset("fka/awesome-chatgpt-prompts"), from the local copy (csv reads its rows
# that pandas' csv reader refuses).
with open(args.data, newline="") as f:
    data = Dataset.from_list(list(csv.DictReader(f))[:args.rows])
data = data.map(lambda samples: tokenizer(samples["prompt"], truncation=True, max_length=128), batched=True,
                remove_columns=data.column_names)

peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.RANDOM,
                                 num_virtual_tokens=4, tokenizer_name_or_path=model_name_or_path)
peft_model = get_peft_model(foundational_model, peft_config)
peft_model.print_trainable_parameters()

training_args = TrainingArguments(output_dir=args.out + "_trainer", per_device_train_batch_size=4, learning_rate=3.5e-3,
                                  num_train_epochs=args.epochs, max_steps=args.max_steps, use_cpu=True,
                                  save_strategy="no", report_to=[], logging_steps=5, seed=0)
trainer = Trainer(model=peft_model, args=training_args, train_dataset=data,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
start = time.perf_counter()
trainer.train()
train_seconds = time.perf_counter() - start
trainer.model.save_pretrained(args.out)

loaded_model = PeftModel.from_pretrained(foundational_model, args.out, is_trainable=False)
tuned = tokenizer.batch_decode(get_outputs(loaded_model, input_prompt), skip_special_tokens=True)[0]
print("untuned:", repr(untuned))
print("tuned:  ", repr(tuned))

if args.json:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(args.json).write_text(json.dumps({
        "library": PeftModel.__module__.split(".")[0], "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2), "train_loss": trainer.state.log_history[-1].get("train_loss"),
        "logged_losses": losses, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "untuned": untuned, "tuned": tuned}, indent=2) + "\n")
