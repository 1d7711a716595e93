"""Task mixtures (`train --mix`, data/mixture.py): one prompt over several tasks, each row with its own
label words; the label-word loss per task, per-task evaluation and the mean, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.data.batching import collate, pad_id
from softprompt.data.mixture import Mixture, load_data
from softprompt.forward.classify import class_token_ids
from softprompt.forward.hidden import batch_loss

# Inputs end in a newline, so that each label word follows without a space: one token each in the tiny
# tokenizer (which the label-word loss needs).
EUROPE = dict(template="Country: {country}\\nIn Europe:\\n", labels="N,Y", label_col="europe")
CAPITAL = {"template": "Capital: {capital}\\nEuropean:\\n", "labels": "F,T", "label_col": "europe"}


def mixed(data, **kw) -> DataConfig:
    return DataConfig(data=str(data), max_length=32, mix=[json.dumps({"data": str(data), **CAPITAL})], **{**EUROPE, **kw})


def test_rows_come_from_every_task_with_their_own_label_words(countries_csv, tiny):
    _, tok = tiny
    fmt, train, evals = load_data(mixed(countries_csv), tok, seed=0)
    assert isinstance(fmt, Mixture) and fmt.task == "classify"
    assert {e.task for e in train} == {0, 1} and {e.task for e in evals} == {0, 1}
    words = {0: ["N", "Y"], 1: ["F", "T"]}
    for e in train + evals:
        rendered = fmt.of(e).render_input(e.text)
        assert rendered.startswith("Country:" if e.task == 0 else "Capital:")
        gold = tok(words[e.task][e.label], add_special_tokens=False).input_ids
        assert e.ids[e.loss_start:] == gold
    assert fmt.label_words == ["N", "Y", "F", "T"]
    # each task holds out its own tenth: the pools are the tasks' sizes (examples-proportional)
    assert sum(e.task == 0 for e in train) == sum(e.task == 1 for e in train)


def test_mixture_label_word_loss_is_each_tasks_own_softmax(countries_csv, tiny):
    model, tok = tiny
    fmt, train, _ = load_data(mixed(countries_csv), tok, seed=0)
    ids = class_token_ids(fmt, train)
    assert ids.shape == (2, 2)
    rows = train[:6] + [e for e in train if e.task == 1][:6]
    prompt = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, n = batch_loss(model, prompt, collate(rows, pad_id(tok)), "kv", ids)
        want = sum(float(batch_loss(model, prompt, collate([e for e in rows if e.task == k], pad_id(tok)), "kv",
                                    ids[k])[0]) for k in (0, 1))
    assert n == len(rows) and abs(float(got) - want) < 1e-4


def test_train_reports_each_task_and_their_mean(countries_csv, llama_dir, tmp_path):
    from softprompt.training.train import train

    s = train(ModelConfig(model=str(llama_dir), device="cpu"), mixed(countries_csv, eval_limit=6),
              PromptConfig(virtual_tokens=3), TrainConfig(out=str(tmp_path / "mix"), max_steps=2, batch_size=4,
                                                          eval_every=0, warmup_steps=0, eval_untuned=False),
              quiet=True)
    ev = s["final_eval"]
    tasks = ev["tasks"]
    assert len(tasks) == 2 and all(t["n"] == 6 for t in tasks.values())
    assert ev["accuracy"] == pytest.approx(sum(t["accuracy"] for t in tasks.values()) / 2)
    assert ev["n"] == 12
    from softprompt.evaluation.evaluate import format_eval  # the progress line: the mean is not the pooled counts

    assert f"accuracy {100 * ev['accuracy']:.2f}% (mean over 2 tasks)" in format_eval(ev)
    assert "(3 of 6)" in format_eval({**ev, "tasks": {}, "accuracy": 0.5, "correct": 3, "n": 6})
    rc = json.loads((tmp_path / "mix" / "run_config.json").read_text())
    assert rc["DataConfig"]["mix"] == [{"data": str(countries_csv), **CAPITAL}]
    assert rc["TrainConfig"]["loss"] == "classes"  # one-token label words in every task
    meta = json.loads((tmp_path / "mix" / "prompt_config.json").read_text())
    assert meta["labels"] == ["N", "Y"]  # the recorded reading is the first task's, for eval and generate
    # push's model card says it is a mixture: every task's data, template and label words, the mean
    # labelled as such, then each task's own scores.
    from softprompt.prompts.hub_push import prepare_upload

    card = (prepare_upload(tmp_path / "mix", tmp_path / "up", "someone/mix") / "README.md").read_text()
    name = countries_csv.name
    assert f"| data | a mixture of 2 tasks: `{name}`, `{name}` |" in card
    assert "| label words, task 1 | N, Y |" in card and "| label words, task 2 | F, T |" in card
    assert "Template, task 2 (each row's columns fill the braces):\n\n```text\nCapital: {capital}" in card
    acc = ev["accuracy"]
    assert f"| accuracy (mean over the tasks) |  | {100 * acc:.2f}% |" in card
    assert "held-out accuracy (mean over 2 tasks)" in card
    for task, scores in tasks.items():
        assert f"| accuracy, task {task} |  | {100 * scores['accuracy']:.2f}% |" in card


def test_mix_on_the_command_line_and_bad_tasks(countries_csv, llama_dir, tmp_path, capsys):
    from softprompt.cli import main

    base = ["train", "--model", str(llama_dir), "--device", "cpu", "--data", str(countries_csv), "--template",
            EUROPE["template"], "--labels", "N,Y", "--label-col", "europe", "--max-steps", "1", "--batch-size", "4",
            "--eval-every", "0", "--warmup-steps", "0", "--no-eval-untuned", "--eval-limit", "4"]
    task = json.dumps({"data": str(countries_csv), **CAPITAL})
    assert main([*base, "--mix", task, "--mix", task, "--out", str(tmp_path / "a")]) == 0
    rc = json.loads((tmp_path / "a" / "run_config.json").read_text())
    # each task's 194 rows: --eval-limit 4 holds out 4 of them, and the other 190 train
    assert len(rc["DataConfig"]["mix"]) == 2 and rc["train_examples"] == 3 * 190
    capsys.readouterr()
    bad = {"not json": "--mix task 2: not a JSON object",
           json.dumps({"template": "x"}): "--mix task 2: needs its own \"data\"",
           json.dumps({"data": "x.csv", "colour": "red"}): "--mix task 2: unknown key 'colour'",
           json.dumps({"data": str(countries_csv), "labels": "one"}): "--mix task 2: --labels needs at least two",
           json.dumps({"data": str(tmp_path / "none.csv")}): "--mix task 2: missing data file"}
    for value, msg in bad.items():
        assert main([*base, "--mix", value, "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert main(["compare", "--model", str(llama_dir), "--data", str(countries_csv), "--template", "{country}",
                 "--mix", task, "--out", str(tmp_path / "c")]) == 2
    assert "unrecognized arguments: --mix" in capsys.readouterr().err


def test_a_mixture_prompt_starts_a_task_with_init_from(countries_csv, llama_dir, tmp_path):
    from softprompt.prompts.prompt import load_prompt
    from softprompt.training.train import train

    m = ModelConfig(model=str(llama_dir), device="cpu")
    t = dict(max_steps=1, batch_size=4, eval_every=0, warmup_steps=0, eval_untuned=False)
    train(m, mixed(countries_csv, eval_limit=4), PromptConfig(virtual_tokens=3), TrainConfig(out=str(tmp_path / "mix"), **t),
          quiet=True)
    one = DataConfig(data=str(countries_csv), max_length=32, eval_limit=4, **EUROPE)
    s = train(m, one, PromptConfig(init_from=str(tmp_path / "mix")), TrainConfig(out=str(tmp_path / "one"), **t),
              quiet=True)
    assert s["steps"] == 1 and load_prompt(tmp_path / "one").length == 3  # the mixture's P adopted


def test_a_chat_task_beside_a_templated_one(countries_csv, llama_dir, tmp_path, capsys):
    """The first task's `messages` column is found by itself; a --mix task with its own template read
    that found column as its own and was refused for a --messages-col nobody gave."""
    from journey_helpers import write_chats
    from softprompt.cli import main

    chats = write_chats(tmp_path / "chats.jsonl", 12)
    task = json.dumps({"data": str(countries_csv), **EUROPE})
    assert main(["train", "--model", str(llama_dir), "--data", str(chats), "--mix", task, "--max-steps", "1",
                 "--batch-size", "4", "--eval-every", "0", "--virtual-tokens", "3", "--eval-limit", "4",
                 "--out", str(tmp_path / "mix")]) == 0, capsys.readouterr().err
    tasks = json.loads((tmp_path / "mix" / "summary.json").read_text())["final_eval"]["tasks"]
    second = f"2:{countries_csv.name}"
    assert list(tasks) == ["1:chats.jsonl", second] and "accuracy" in tasks[second]


def test_language_modelling_tasks_beside_a_classifier(countries_csv, llama_dir, tmp_path, capsys):
    """A --mix task read as a text column or as conversations is language modelling: it does not take
    the first task's label words (it was refused: "--labels needs --template")."""
    from journey_helpers import write_chats
    from softprompt.cli import main

    chats = write_chats(tmp_path / "chats.jsonl", 12)
    tasks = [json.dumps({"data": str(countries_csv), "text_col": "capital"}),
             json.dumps({"data": str(chats), "messages_col": "messages"})]
    assert main(["train", "--model", str(llama_dir), "--data", str(countries_csv), "--template", EUROPE["template"],
                 "--labels", "N,Y", "--label-col", "europe", "--mix", tasks[0], "--mix", tasks[1], "--max-steps", "1",
                 "--batch-size", "4", "--eval-every", "0", "--virtual-tokens", "3", "--eval-limit", "4",
                 "--out", str(tmp_path / "mix")]) == 0, capsys.readouterr().err
    scores = json.loads((tmp_path / "mix" / "summary.json").read_text())["final_eval"]["tasks"]
    assert list(scores) == [f"1:{countries_csv.name}", f"2:{countries_csv.name}", "3:chats.jsonl"]
    assert "accuracy" in scores[f"1:{countries_csv.name}"]
    assert not any("accuracy" in scores[k] for k in list(scores)[1:])
    # The mean is of one quantity: the classifier's vocabulary loss (lm_loss) beside the others' (loss),
    # not its label-word loss; keep-best compares runs by it.
    final = json.loads((tmp_path / "mix" / "summary.json").read_text())["final_eval"]
    vocab = [scores[f"1:{countries_csv.name}"]["lm_loss"]] + [scores[k]["loss"] for k in list(scores)[1:]]
    assert final["loss"] == pytest.approx(sum(vocab) / 3, rel=1e-5)
    assert f"({final['tokens']} tokens, mean over 3 tasks)" in capsys.readouterr().err
