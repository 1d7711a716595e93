"""The command line: --help of every command, the full train/eval/generate/PEFT cycle on a tiny
model, and one clear error line with a non-zero exit for bad input."""
import argparse
import json
import subprocess
import sys

import pytest

from softprompt.cli import build_parser, main

COMMANDS = ["train", "eval", "generate", "serve", "export-peft", "import-peft", "push", "lm-eval", "demo"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: softprompt " + cmd in out
    for action in build_parser()._subparsers._group_actions[0].choices[cmd]._actions:
        if action.option_strings and action.help is None:
            pytest.fail(f"{cmd} {action.option_strings} has no help text")
        # Hunt 17: --keep-best and --eval-untuned did not say they are on unless turned off
        if isinstance(action, argparse.BooleanOptionalAction) and action.default is True:
            assert "on by default" in action.help, (cmd, action.option_strings)


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "softprompt", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_train_eval_generate_peft_cycle(llama_dir, countries_csv, tmp_path, capsys):
    out = tmp_path / "run"
    data = ["--data", str(countries_csv), "--template", "Country: {country}\\nEurope:", "--labels", "no,yes",
            "--label-col", "europe"]
    rc = main(["train", "--model", str(llama_dir), *data, "--virtual-tokens", "3", "--init", "labels",
               "--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and (out / "prompt.safetensors").is_file()
    capsys.readouterr()
    # No --model: the base the prompt was trained on (the built-in would refuse this prompt's width).
    assert main(["eval", *data, "--prompt", str(out), "--json"]) == 0
    got = capsys.readouterr()
    tuned = json.loads(got.out)
    # its own training file: said so, since a newcomer's first check scored learnt rows (hunt 9)
    assert f"[softprompt] warning: --data {countries_csv} is the data {out} was trained on" in got.err
    assert main(["eval", "--model", str(llama_dir), *data, "--prompt", "none", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    for m in (tuned, base):
        assert set(m) >= {"loss", "perplexity", "accuracy"} and m["n"] == 194
    assert tuned["loss"] != base["loss"]
    assert main(["generate", "--prompt", str(out), "--compare", "--max-new-tokens", "5", "--json",
                 "Country: Chile\nEurope:"]) == 0
    got = capsys.readouterr()
    res = json.loads(got.out)
    assert set(res[0]) == {"input", "baseline", "tuned"}
    # a classifier's free text is not its prediction, which a user took for a failed prompt (hunt 9)
    assert f"[softprompt] warning: {out} was trained to choose among its label words (no, yes), not to write " \
           "text: `softprompt eval`" in got.err
    assert main(["export-peft", str(out), str(tmp_path / "peft")]) == 0
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "prompt.safetensors").read_bytes() != b""
    # The installed command, as a user runs it: the imported prompt's base is the adapter's.
    r = subprocess.run([sys.executable, "-m", "softprompt", "eval", *data, "--prompt", str(tmp_path / "back"),
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == {**tuned, "prompt": str(tmp_path / "back")}, r.stderr[-2000:]
    # A base recorded as a path that is not on this machine is named, before any model loads.
    meta = json.loads((out / "prompt_config.json").read_text())
    (out / "prompt_config.json").write_text(json.dumps({**meta, "model": str(tmp_path / "moved")}))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    moved = tmp_path / "moved"
    assert f"{out} was trained on '{moved}', which is not on this machine: name its base with --model" in err, err
    assert main(["inspect", str(out), "--model", str(llama_dir), "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", "--prompt", str(out / "prompt_config.json"), "hi"]) == 2  # a file, not the prompt
    assert "prompt_config.json is not a prompt: give the prompt's folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["eval", "--data", "/no/such.csv", "--text-col", "t"], "missing data file: /no/such.csv"),
    (["eval", "--data", "no-such-org/no-such-dataset", "--text-col", "t"],
     "cannot load dataset 'no-such-org/no-such-dataset' (split 'train') from the Hugging Face Hub"),
    (["eval", "--prompt", "/no/prompt", "--data", "x.csv", "--text-col", "t"], "missing prompt file"),
    (["export-peft", "/no/prompt", "OUT"], "missing prompt file"),
    (["import-peft", "/no/adapter", "OUT"], "missing file: /no/adapter/adapter_config.json"),
    (["generate", "--model", "/no/model/dir", "hello"], "missing model path"),
    # `none` is the untuned model: it was compared with itself, its text printed twice (once as tuned)
    (["generate", "--model", "/no/model/dir", "--prompt", "none", "--compare", "hello"],
     "--compare needs --prompt DIR"),
    (["train", "--model", "no-such-org/no-such-model", "--data", "d.csv", "--text-col", "t"],
     "cannot load model 'no-such-org/no-such-model' from the Hugging Face Hub"),
])
def test_errors_are_one_line_and_nonzero(argv, msg, llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("t\nsome text\n")  # data is checked before the model: let it pass
    if argv[0] == "eval":
        argv = [argv[0], "--model", str(llama_dir), *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("softprompt: error: ") and msg in err[-1], err
    assert not (tmp_path / "OUT").exists()


def test_command_table_and_lazy_imports():
    """Each command is a table entry whose module has the two functions; listing the commands
    imports none of them (nor torch), and one command's --help imports only its own module."""
    import importlib

    from softprompt.cli import COMMANDS

    assert set(COMMANDS) == {
        "train", "eval", "generate", "serve", "export-peft", "import-peft", "push", "lm-eval", "compare", "ensemble",
        "inspect", "demo"}
    for name, cmd in COMMANDS.items():
        mod = importlib.import_module(cmd.module)
        assert all(callable(getattr(mod, f)) for f in cmd.functions), name
    code = ("import sys\nfrom softprompt.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('softprompt.')))")
    top = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert eval(top.stdout.strip().splitlines()[-1]) == ["softprompt.cli", "softprompt.core", "softprompt.core.utils"]
    sub = subprocess.run([sys.executable, "-c", code, "export-peft", "--help"], capture_output=True, text=True,
                         check=True)
    loaded = eval(sub.stdout.strip().splitlines()[-1])
    assert ("softprompt.prompts.peft_io" in loaded and "softprompt.training.train" not in loaded
            and "softprompt.serve" not in loaded)


def test_usage_errors_are_one_line(capsys):
    assert main(["train", "--max-length", "x"]) == 2
    assert capsys.readouterr().err == "softprompt: error: train: argument --max-length: invalid int value: 'x'\n"
    assert main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("softprompt: error: argument COMMAND: invalid choice: 'nope'")


@pytest.mark.parametrize("case", ["jsonl_row2_lacks_column", "unbalanced_brace", "max_length_0"])
def test_row11_bad_data_is_one_clear_line_and_makes_nothing(case, llama_dir, tmp_path, monkeypatch, capsys):
    """Issue 17 row 11: each was a traceback (and --max-length 0 a half-made run folder)."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    rows = [{"sentence": "a great movie", "label": 1}, {"text": "a dull film", "label": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"sentence": f"fine {i}", "label": 1}
                                                                      for i in range(8)]))
    template, extra, msg = {
        "jsonl_row2_lacks_column": ("Review: {sentence}", [], f"column 'sentence' not found in {data} row 2 "
                                                             "(columns: 'text', 'label')"),
        "unbalanced_brace": ("{sentence", [], "--template '{sentence': expected '}' before end of string "
                                              "(write {{ and }} for literal braces)"),
        "max_length_0": ("Review: {sentence}", ["--max-length", "0"], "--max-length must be at least 1 (got 0)"),
    }[case]
    for cmd in (["train", "--out", "run"], ["eval"]):
        rc = main([*cmd, "--model", str(llama_dir), "--device", "cpu", "--data", str(data), "--template", template,
                   "--labels", "negative,positive", *extra])
        err = capsys.readouterr().err
        # Only the model's loading bar may come first (on stderr); the error is the last line.
        assert rc == 2 and err.splitlines()[-1] == f"softprompt: error: {msg}" and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


def test_row12_generate_refuses_bad_budget_and_nan_prompt(llama_dir, tmp_path, capsys):
    """Issue 17 row 12: both exited 0 with empty output."""
    import torch

    from softprompt.prompts.prompt import SoftPrompt, save_prompt

    assert main(["generate", "--model", str(llama_dir), "--max-new-tokens", "-1", "hello"]) == 2
    assert capsys.readouterr().err == "softprompt: error: --max-new-tokens must be at least 1 (got -1)\n"
    embeds = torch.zeros(3, 32)
    embeds[1, 5] = float("nan")
    save_prompt(SoftPrompt(embeds), tmp_path / "nan", {"model": str(llama_dir)})
    capsys.readouterr()
    assert main(["generate", "--model", str(llama_dir), "--prompt", str(tmp_path / "nan"), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"softprompt: error: {tmp_path / 'nan' / 'prompt.safetensors'}: "
                                    "'prompt_embeddings' holds 1 NaN or infinite value(s)") and "Traceback" not in err
