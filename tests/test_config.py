"""Config checks live in the dataclasses (`__post_init__`): each bad value or combination is one
SoftpromptError naming the flag, raised when the config is built, again by `dataclasses.replace`
after a field was changed, and as a one-line CLI error with exit status 2."""
import dataclasses

import pytest

from softprompt.cli import main
from softprompt.core.config import (CompareConfig, DataConfig, GenerateConfig, ModelConfig, PromptConfig, ServeConfig,
                               TrainConfig)
from softprompt.core.utils import SoftpromptError

NAN = float("nan")

CASES = [
    (ModelConfig, {"dtype": "int8"}, "unknown --dtype 'int8'"),
    (DataConfig, {"max_length": 0}, "--max-length must be at least 1 (got 0)"),
    (DataConfig, {"eval_fraction": 1.0}, "--eval-fraction must be in [0, 1)"),
    (DataConfig, {"eval_fraction": NAN}, "--eval-fraction must be a finite number"),
    # hunt 10: the fraction was dropped without a word where the held-out rows come from elsewhere
    (DataConfig, {"eval_fraction": 0.2, "eval_data": "dev.csv"}, "--eval-fraction 0.2 holds rows out of --data "
                                                                 "where no --eval-data or --eval-split is given"),
    (DataConfig, {"eval_fraction": 0.3, "eval_split": "validation"}, "--eval-fraction 0.3 holds rows out"),
    (DataConfig, {"limit": -1}, "--limit must be at least 0"),
    (DataConfig, {"template": "{sentence"}, "--template '{sentence': expected '}' before end of string"),
    (DataConfig, {"target": "x}"}, "--target 'x}': Single '}' encountered"),
    (DataConfig, {"template": "a {} b"}, "every {...} must name a column"),
    (DataConfig, {"template": "{0}"}, "every {...} must name a column"),
    (DataConfig, {"template": "{x!z}"}, "unknown conversion '!z'"),
    (DataConfig, {"template": "{x}", "labels": "yes"}, "--labels needs at least two comma-separated words"),
    (DataConfig, {"template": "{x}", "labels": "yes,no,yes"}, "names a word twice"),
    (DataConfig, {"labels": "no,yes", "text_col": "t"}, "--labels needs --template"),
    (DataConfig, {"template": "{x}", "target": " {y}", "labels": "no,yes"}, "--labels makes a classifier (a label "
                                                                             "word after --template) and --target"),
    (DataConfig, {"template": "{x}", "text_col": "t"}, "--text-col is the input where no --template builds one"),
    (PromptConfig, {"virtual_tokens": 0}, "--virtual-tokens must be at least 1 (got 0)"),
    (PromptConfig, {"init": "zeros"}, "unknown --init 'zeros': use auto, random"),
    (PromptConfig, {"init": "file"}, "--init file needs --init-file DIR"),
    (TrainConfig, {"batch_size": 0}, "--batch-size must be >= 1"),
    (TrainConfig, {"lr": NAN}, "--lr >= 0"),
    (TrainConfig, {"log_every": 0}, "--log-every must be at least 1"),
    (TrainConfig, {"grad_clip": float("inf")}, "--grad-clip must be a finite number"),
    (TrainConfig, {"max_steps": 0, "epochs": 0.0}, "--epochs must be > 0 when --max-steps is 0"),
    (TrainConfig, {"optimizer": "sgd"}, "unknown --optimizer 'sgd'"),
    (TrainConfig, {"method": "full", "resume": True}, "--method full runs in one process and cannot --resume"),
    (GenerateConfig, {"max_new_tokens": -1}, "--max-new-tokens must be at least 1 (got -1)"),
    (GenerateConfig, {"temperature": 0.0}, "--temperature must be > 0"),
    (GenerateConfig, {"top_p": 1.5}, "--top-p must be in (0, 1]"),
    (GenerateConfig, {"repetition_penalty": NAN}, "--repetition-penalty must be a finite number"),
    (GenerateConfig, {"repetition_penalty": 0.0}, "--repetition-penalty must be > 0"),
    (CompareConfig, {"methods": "prompt,lora"}, "unknown --methods ['lora']"),
    (CompareConfig, {"methods": " , "}, "unknown --methods"),
    (CompareConfig, {"k_shot": 0}, "--k-shot must be >= 1"),
    (CompareConfig, {"eval_batch_size": 0}, "--eval-batch-size must be at least 1"),
    (ServeConfig, {"max_batch": 0}, "--max-batch must be at least 1 (got 0)"),
    (ServeConfig, {"max_queue": 0}, "--max-queue must be at least 1 (got 0)"),
    (ServeConfig, {"max_n": 0}, "--max-n must be at least 1 (got 0)"),
    (ServeConfig, {"max_input_tokens": 0}, "--max-input-tokens must be at least 1"),
    (ServeConfig, {"batch_wait_ms": -1.0}, "--batch-wait-ms must be at least 0"),
    (ServeConfig, {"batch_wait_ms": NAN}, "--batch-wait-ms must be a finite number"),
    (ServeConfig, {"port": 70000}, "--port must be at most 65535"),
    (ServeConfig, {"default_max_tokens": 300}, "--default-max-tokens 300 is over --max-new-tokens 256"),
    (ServeConfig, {"read_timeout": 0.0}, "--read-timeout must be a finite number of seconds > 0"),
    (ServeConfig, {"shutdown_timeout": -1.0}, "--shutdown-timeout must be a finite number of seconds >= 0"),
    (ServeConfig, {"admin_token": "\ud800"}, r"--admin-token '\ud800' is not valid Unicode"),
    (ServeConfig, {"host": " "}, "--host is empty: give an address"),  # hunt 14: "" bound every interface
]


@pytest.mark.parametrize("cls,kw,msg", CASES, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in CASES])
def test_each_check_names_the_flag(cls, kw, msg):
    with pytest.raises(SoftpromptError) as e:
        cls(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)
    cfg = cls()  # the defaults pass; a field changed afterwards is caught by replace()
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(SoftpromptError) as e:
        dataclasses.replace(cfg)
    assert msg in str(e.value)


def test_defaults_and_good_values_pass():
    for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig, GenerateConfig, CompareConfig, ServeConfig):
        cls()
    ServeConfig(max_batch=1, max_queue=1, batch_wait_ms=0.0, port=0, shutdown_timeout=0.0)
    assert ServeConfig(host="[::1]").host == "::1"  # a URL's bracketed IPv6 form, as other tools take it
    DataConfig(template="Review: {sentence}\\nSentiment: {{literal}}", labels="negative, positive")
    PromptConfig(init="file", init_file="runs/p")
    assert DataConfig(labels=" a,, b ", template="{x}").label_words == ["a", "b"]


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--max-new-tokens", "-1", "hi"], "--max-new-tokens must be at least 1 (got -1)"),
    (["train", "--max-length", "0", "--data", "x.csv", "--text-col", "t"], "--max-length must be at least 1"),
    (["eval", "--template", "{sentence", "--data", "x.csv"], "--template '{sentence'"),
    (["compare", "--methods", "lora"], "unknown --methods ['lora']"),
    (["serve", "--max-batch", "0"], "--max-batch must be at least 1 (got 0)"),
    (["serve", "--max-queue", "0"], "--max-queue must be at least 1 (got 0)"),
])
def test_cli_reports_config_errors_in_one_line(argv, msg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softprompt: error: ") and msg in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_a_mix_task_s_target_or_labels_say_what_kind_of_task_it_is():
    """A --mix task that gives a target generates and one that gives labels classifies, whatever the first
    task is: the first task's label words used to win over the task's own target without a word."""
    d = DataConfig(data="a.csv", template="{x}", labels="no,yes", mix=[{"data": "b.csv", "template": "{q}",
                                                                        "target": " {a}"}])
    assert (d.task_config(1).labels, d.task_config(1).target) == ("", " {a}")
    d = DataConfig(data="a.csv", template="{q}", target=" {a}", mix=[{"data": "b.csv", "labels": "no,yes"}])
    assert (d.task_config(1).template, d.task_config(1).labels, d.task_config(1).target) == ("{q}", "no,yes", "")


def test_labels_given_read_a_generation_prompt_s_template_as_a_classifier():
    """eval --labels on a prompt that records a template and a target takes the template alone: with
    the target too, the two would be refused together for a --target nobody typed."""
    from softprompt.prompts.recorded import with_recorded

    given = {"template": "", "target": "", "text_col": "", "messages_col": "", "labels": "no,yes"}
    out = with_recorded(given, {"template": "{x}", "target": " {y}"})
    assert (out["template"], out["target"], out["labels"]) == ("{x}", "", "no,yes")
    DataConfig(**out)


def test_the_base_defaults_to_the_prompt_s_as_it_was_quantised(tmp_path):
    """--model and --quantize unset (None): the record's base and its quantisation; a --model given
    loads that model unquantised unless --quantize says otherwise; no prompt: the built-in."""
    import argparse
    import json

    from softprompt.prompts.recorded import fill_base

    prompt = tmp_path / "p"
    prompt.mkdir()
    (prompt / "prompt.safetensors").write_bytes(b"")  # read_meta reads the record only
    (prompt / "prompt_config.json").write_text(json.dumps(
        {"model": "org/base", "config": {"ModelConfig": {"model": "org/base", "quantize": "4bit"}}}))

    def filled(prompt_path, **given):
        args = argparse.Namespace(**{"model": None, "quantize": None, **given})
        fill_base(args, prompt_path)
        return args.model, args.quantize

    assert filled(str(prompt)) == ("org/base", "4bit")
    assert filled(str(prompt), quantize="8bit") == ("org/base", "8bit")
    assert filled(str(prompt), model="other/base") == ("other/base", "none")
    assert filled("none") == filled("") == ("smollm2-135m-instruct", "none")
    (prompt / "prompt_config.json").write_text(json.dumps({"init": "peft"}))  # a record naming no base
    assert filled(str(prompt)) == ("smollm2-135m-instruct", "none")
    with pytest.raises(SoftpromptError, match="--model is empty"):  # not the current folder
        ModelConfig(model="")


def test_a_config_file_reads_a_leading_tilde_as_the_home_folder(tmp_path, monkeypatch):
    """No shell expands ~ in a config file: `out: ~/runs/x` made a folder named ~ in the working one,
    while `data: ~/d.csv` read the home's. Every path key now reads it as the home folder."""
    from softprompt.cli import Command, run

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    seen = []
    monkeypatch.setattr(Command, "check", lambda self, args: None)
    monkeypatch.setattr(Command, "load", lambda self: (lambda args: seen.append(args) or 0,))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ModelConfig: {model: ~/m}\nDataConfig: {data: ~/d.csv, template: '~/{a}'}\n"
                   "TrainConfig: {out: ~/runs/x}\nensemble: {prompts: [~/a, ~/b]}\n")
    assert run(["train", "--config", str(cfg)]) == 0
    assert (seen[0].model, seen[0].data, seen[0].out) == (f"{home}/m", f"{home}/d.csv", f"{home}/runs/x")
    assert seen[0].template == "~/{a}"  # not a path
    assert run(["ensemble", "--config", str(cfg), "--data", "d.csv"]) == 0
    assert seen[1].prompts == [f"{home}/a", f"{home}/b"]
