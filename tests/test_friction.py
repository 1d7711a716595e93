"""Issue 26's friction items: a prompt's recorded settings are every command's defaults, the same rows
and clear numbers in train and eval, training output, early input checks, file modes, PEFT/Hub
interop, lm-eval's flags and chat generation."""
from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

from softprompt.cli import main
from softprompt.core.utils import SoftpromptError, SoftpromptWarning

TEMPLATE = "Country: {country}\\nEurope:"


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """A classification prompt trained on the countries table (its template, labels and label column
    recorded), and the table."""
    import csv

    from conftest import EXAMPLES

    root = tmp_path_factory.mktemp("friction")
    data = root / "countries.csv"
    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()]
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["country", "capital", "continent", "europe"])
        for r in rows:
            w.writerow([r["country"], r["capital"], r["continent"], int(r["continent"] == "Europe")])
    out = root / "run"
    rc = main(["train", "--model", str(llama_dir), "--data", str(data), "--template", TEMPLATE, "--labels", "no,yes",
               "--label-col", "europe", "--virtual-tokens", "3", "--init", "labels", "--max-steps", "4",
               "--batch-size", "4", "--eval-every", "2", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    return out, data


def run_json(capsys, argv) -> object:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- 1: recorded settings are the defaults

def test_eval_takes_the_prompts_recorded_template_and_labels(trained, llama_dir, capsys):
    out, data = trained
    base = ["eval", "--model", str(llama_dir), "--data", str(data), "--prompt", str(out), "--json"]
    recorded = run_json(capsys, base)
    explicit = run_json(capsys, base + ["--template", TEMPLATE, "--labels", "no,yes", "--label-col", "europe"])
    assert "accuracy" in recorded and recorded == explicit
    # A flag still wins: another template gives other numbers.
    other = run_json(capsys, base + ["--template", "{country} in Europe?", "--labels", "no,yes",
                                     "--label-col", "europe"])
    assert other["loss"] != recorded["loss"]


def test_a_split_of_a_local_file_is_refused_not_ignored(trained, llama_dir, capsys):
    """`eval --config RUN/run_config.json --split validation` on a run trained from local files scored
    its training file: a local file is read whole, so --split named rows it never read."""
    out, data = trained
    record = str(out / "run_config.json")
    for argv in (["eval", "--prompt", str(out)], ["eval", "--config", record, "--prompt", str(out)],
                 ["train", "--template", TEMPLATE, "--out", str(out / "x")]):
        capsys.readouterr()
        assert main([*argv, "--model", str(llama_dir), "--data", str(data), "--split", "validation"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--split validation: --data {data} is a local file, read whole (a Hub dataset has "
                            "splits); give the file of the rows you mean as --data"), err
        assert "Traceback" not in err and not (out / "x").exists()
    # So is --eval-split of a local --eval-data file, which train recorded and ignored.
    assert main(["train", "--template", TEMPLATE, "--out", str(out / "x"), "--model", str(llama_dir),
                 "--data", str(data), "--eval-data", str(data), "--eval-split", "test"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--eval-split test: --eval-data {data} is a local file, read "
                                                    "whole (a Hub dataset has splits); give the file of the rows you "
                                                    "mean as --eval-data")
    assert not (out / "x").exists()


def test_a_full_fine_tuning_run_given_as_a_prompt_points_to_its_model(trained, llama_dir, tmp_path, capsys):
    _, data = trained
    full = tmp_path / "full"
    assert main(["train", "--method", "full", "--model", str(llama_dir), "--data", str(data), "--template", TEMPLATE,
                 "--labels", "no,yes", "--label-col", "europe", "--max-steps", "1", "--batch-size", "4",
                 "--eval-every", "0", "--save-every", "0", "--out", str(full)]) == 0
    capsys.readouterr()
    assert main(["eval", "--prompt", str(full), "--model", str(llama_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{full} is a full fine-tuning run (`train --method full`), which holds a fine-tuned model, "
                        f"not a prompt: pass --model {full / 'model'} (and no prompt)"), err
    assert main(["eval", "--model", str(full / "model"), "--data", str(data), "--template", TEMPLATE]) == 0
    # In the API's words, the command stays a command.
    import softprompt
    from softprompt.api import ConfigError

    with pytest.raises(ConfigError, match=r"run \(`train --method full`\), which .* pass model "):
        softprompt.evaluate(str(full), model=str(llama_dir), data=str(data), template=TEMPLATE)


def test_no_chat_turns_off_a_prompt_s_recorded_chat_flag(trained, llama_dir, tmp_path, capsys):
    """A flag still wins over the prompt's record, --no-chat too (it was read as 'not given')."""
    import softprompt

    _, data = trained
    chat = tmp_path / "chat"
    assert main(["train", "--model", str(llama_dir), "--data", str(data), "--template", TEMPLATE, "--labels", "no,yes",
                 "--label-col", "europe", "--chat", "--method", "prompt", "--virtual-tokens", "3", "--max-steps", "2",
                 "--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--out", str(chat)]) == 0
    base = ["eval", "--model", str(llama_dir), "--data", str(data), "--prompt", str(chat), "--limit", "6", "--json"]
    recorded, on, off = (run_json(capsys, base + extra) for extra in ([], ["--chat"], ["--no-chat"]))
    assert recorded == on and off["lm_loss"] != on["lm_loss"]
    kw = dict(model=str(llama_dir), data=str(data), limit=6)
    # (the command prints 6 significant digits; the API returns the float)
    assert softprompt.evaluate(str(chat), **kw)["lm_loss"] == pytest.approx(on["lm_loss"], rel=1e-5)
    assert softprompt.evaluate(str(chat), chat=False, **kw)["lm_loss"] == pytest.approx(off["lm_loss"], rel=1e-5)
    # ensemble reads every prompt as the first one: a chat prompt beside a plain one needs the choice said.
    out, _ = trained
    both = ["ensemble", "--model", str(llama_dir), "--data", str(data), str(out), str(chat), "--limit", "6", "--json"]
    capsys.readouterr()
    assert main(both) == 2
    assert f"{chat} was trained through the chat template and {out} was not: pass --chat or --no-chat" in \
        capsys.readouterr().err
    assert run_json(capsys, both + ["--no-chat"])["n"] == 6
    # generate's conversations take the chat template: --raw or --template beside them is refused.
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": "Chile?"}]}) + "\n")
    assert main(["generate", "--model", str(llama_dir), "--prompt", str(chat), "--messages", str(msgs), "--raw"]) == 2
    assert "--messages takes each conversation through the chat template" in capsys.readouterr().err


def test_ensemble_takes_the_first_prompts_recorded_settings(trained, llama_dir, capsys):
    out, data = trained
    base = ["ensemble", "--model", str(llama_dir), "--data", str(data), str(out), str(out), "--json"]
    recorded = run_json(capsys, base)
    explicit = run_json(capsys, base + ["--template", TEMPLATE, "--labels", "no,yes", "--label-col", "europe"])
    assert recorded["n"] == explicit["n"] > 0 and recorded["prompts"] == explicit["prompts"]


def test_generate_formats_text_with_the_recorded_template(trained, llama_dir, capsys):
    out, _ = trained
    base = ["generate", "--model", str(llama_dir), "--prompt", str(out), "--max-new-tokens", "6", "--json"]
    templated = run_json(capsys, base + ["Chile"])
    # The shell's written \n is a newline, as in train's templates.
    by_hand = run_json(capsys, base + ["--raw", "Country: Chile\\nEurope:"])
    assert templated[0]["tuned"] == by_hand[0]["tuned"] and templated[0]["input"] == "Chile"
    raw = run_json(capsys, base + ["--template", "{input}", "Country: Chile\nEurope:"])
    assert raw[0]["tuned"] == by_hand[0]["tuned"]
    bare = run_json(capsys, base + ["--raw", "Chile"])
    untemplated = run_json(capsys, base + ["--template", "{x}", "Chile"])
    assert bare[0]["tuned"] == untemplated[0]["tuned"]


def test_the_python_generate_takes_what_the_command_takes(trained, llama_dir, tmp_path, capsys):
    """softprompt.generate's template=, system= and messages= give the command's --raw, --system and
    --messages answers."""
    import softprompt

    out, _ = trained
    base = ["generate", "--model", str(llama_dir), "--prompt", str(out), "--max-new-tokens", "5", "--json"]
    kw = dict(prompt=str(out), model=str(llama_dir), max_new_tokens=5)
    assert softprompt.generate("Chile", **kw) == run_json(capsys, base + ["Chile"])
    raw = run_json(capsys, base + ["--raw", "Country: Chile"])
    assert softprompt.generate("Country: Chile", template="", **kw) == raw
    assert softprompt.generate("Chile", system="Be brief.", **kw) == run_json(capsys, base + ["--system", "Be brief.",
                                                                                              "Chile"])
    conv = [{"role": "user", "content": "Chile?"}]
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(json.dumps({"messages": conv}) + "\n")
    assert softprompt.generate(messages=[conv], **kw) == run_json(capsys, base + ["--messages", str(msgs)])
    # OpenAI's content of text parts, as the server takes it: the same answer, from a file and from Python.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Chi"}, {"type": "text", "text": "le?"}]}]
    msgs.write_text(json.dumps({"messages": parts}) + "\n")
    assert softprompt.generate(messages=[parts], **kw) == run_json(capsys, base + ["--messages", str(msgs)]) == \
        softprompt.generate(messages=[conv], **kw)
    with pytest.raises(TypeError, match="messages must be a list of conversations"):
        softprompt.generate(messages=[{"role": "user", "content": "x"}], **kw)
    # The command's refusals, in Python's words: a template beside messages was ignored, and a malformed
    # one was said to name no columns.
    from softprompt.api import ConfigError

    for bad in (dict(messages=[conv], template="{x}"), dict(texts="Chile", messages=[conv])):
        with pytest.raises(ConfigError, match="^messages go through the chat template"):
            softprompt.generate(**bad, **kw)
    with pytest.raises(ConfigError, match="^template"):
        softprompt.generate("Chile", template="{a", **kw)


def test_generate_template_of_several_columns_takes_json(trained, llama_dir, capsys):
    out, _ = trained
    base = ["generate", "--model", str(llama_dir), "--prompt", str(out), "--max-new-tokens", "4", "--json"]
    two = run_json(capsys, base + ["--template", "{a} and {b}", '{"a": "Chile", "b": "Peru"}'])
    same = run_json(capsys, base + ["--raw", "Chile and Peru"])
    assert two[0]["tuned"] == same[0]["tuned"]
    capsys.readouterr()
    assert main(base + ["--template", "{a} and {b}", "Chile"]) == 2
    err = capsys.readouterr().err
    assert "names the columns a, b" in err and err.rstrip().endswith("or --template '' to send it as it is")
    # A recorded template is quoted as typed: repr() showed a flag's \n as \\n, which failed when copied.
    from softprompt.generation.generate import apply_template

    with pytest.raises(SoftpromptError, match=r"^the template '\{a\}\\n\{b\}' names the columns a, b"):
        apply_template("{a}\\n{b}", "Chile", 1)
    assert run_json(capsys, base + ["--template", "", "Chile and Peru"]) == same  # the advice, followed
    # In Python the advice names the keyword, and following it works (the API has no `raw`).
    import softprompt
    from softprompt.api import ConfigError

    kw = dict(prompt=str(out), model=str(llama_dir), max_new_tokens=4)
    with pytest.raises(ConfigError, match="or template '' to send it as it is$"):
        softprompt.generate(["Chile"], template="{a} and {b}", **kw)
    assert softprompt.generate(["Chile and Peru"], template="", **kw)[0]["tuned"] == same[0]["tuned"]
    # ... and a dict of the columns fills them, as the JSON object does on the command line.
    row = {"b": "Peru", "a": "Chile"}
    assert softprompt.generate(row, template="{a} and {b}", **kw) == [{"input": row, "tuned": same[0]["tuned"]}]
    with pytest.raises(ConfigError, match="^the template '{a} and {b}' names the columns a, b; TEXT 1 lacks b: give"):
        softprompt.generate([{"a": "Chile"}], template="{a} and {b}", **kw)
    with pytest.raises(ConfigError, match="^TEXT 1 holds columns, but no template fills them: give a template of"):
        softprompt.generate([row], template="", **kw)
    with pytest.raises(TypeError, match="^generate\\(\\): texts must be a string, a dict"):
        softprompt.generate([{1: "Chile"}], template="{a} and {b}", **kw)


def test_server_classify_applies_the_recorded_template(llama_dir, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running

    from softprompt.core.config import ServeConfig
    from softprompt.base.models import load_model
    from softprompt.prompts.prompt import SoftPrompt, save_prompt

    model, tok = load_model(str(llama_dir))
    embeds = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    meta = {"model": "tiny", "labels": ["negative", "positive"]}
    dirs = {"templated": save_prompt(SoftPrompt(embeds), tmp_path / "t",
                                     {**meta, "template": "Review: {sentence}\\nSentiment:"}),
            "bare": save_prompt(SoftPrompt(embeds), tmp_path / "b", meta)}
    cfg = ServeConfig(max_batch=4, max_queue=8, batch_wait_ms=1, max_input_tokens=64)
    with running(model, tok, {k: str(v) for k, v in dirs.items()}, cfg) as (_, run):
        with httpx.Client(base_url=run.url, timeout=30) as c:
            a = c.post("/v1/classify", json={"task": "templated", "text": "a dull film"}).json()
            b = c.post("/v1/classify", json={"task": "bare", "text": "Review: a dull film\nSentiment:"}).json()
            raw = c.post("/v1/classify", json={"task": "bare", "text": "a dull film"}).json()
    assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert a["scores"] != pytest.approx(raw["scores"], abs=1e-5)


# ---------------------------------------------------------------- 2: the same rows, clear numbers

def test_eval_limit_takes_the_rows_train_eval_limit_takes(trained, llama_dir, tmp_path, capsys):
    _, data = trained
    out = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--data", str(data), "--eval-data", str(data), "--template",
                 TEMPLATE, "--labels", "no,yes", "--label-col", "europe", "--virtual-tokens", "3", "--max-steps", "2",
                 "--warmup-steps", "1", "--batch-size", "4", "--eval-limit", "8", "--no-keep-best", "--out", str(out),
                 "--device", "cpu", "--dtype", "float32"]) == 0
    # float32 as `eval` scores on a CPU: auto trains a prefix in bf16 on a native-bf16 CPU, and train's
    # own evaluation runs on the model it trains
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_eval"]
    assert summary["eval_dtype"] == "float32"  # says which dtype train's own figures were scored in
    got = run_json(capsys, ["eval", "--model", str(llama_dir), "--data", str(data), "--prompt", str(out),
                            "--limit", "8", "--json"])
    assert got["n"] == final["n"] == 8
    assert got["loss"] == pytest.approx(final["loss"], rel=1e-4) and got["correct"] == final["correct"]


def test_eval_help_speaks_of_scored_rows():
    """eval's and ensemble's --help spoke of training: --text-col "train on this plain text column",
    --dtype "the soft prompt and its optimiser state stay float32" (hunt 9)."""
    from softprompt.cli import build_parsers

    for cmd in ("eval", "ensemble"):
        parser = build_parsers(cmd)[1][cmd]
        helps = {a.dest: a.help or "" for a in parser._actions}
        assert "first" in helps["limit"] and "score" in helps["text_col"] and "scored" in helps["messages_col"]
        assert "training" not in helps["limit"] and "train on" not in helps["text_col"], helps
        assert "trains" not in helps["messages_col"] and "optimiser" not in helps["dtype"], helps


def test_classification_loss_is_over_the_label_words(tiny):
    from softprompt.core.config import DataConfig
    from softprompt.data.formatting import load_splits
    from softprompt.evaluation.evaluate import eval_loss, evaluate, example_scores

    from conftest import EXAMPLES

    model, tok = tiny
    cfg = DataConfig(data=str(EXAMPLES), template="Country: {country}\\nContinent:",
                     labels="Europe,Asia,Africa,Oceania,North America,South America", label_col="continent",
                     eval_fraction=0, limit=20)
    fmt, ex, _ = load_splits(cfg, tok)
    p = torch.randn(3, model.config.hidden_size) * 0.1
    m = evaluate(model, tok, lambda: p, fmt, ex)
    scores = example_scores(model, tok, lambda: p, fmt, ex)
    gold = torch.tensor([e.label for e in ex])
    want = float(-torch.log_softmax(scores, -1)[torch.arange(len(ex)), gold].mean())
    assert m["loss"] == pytest.approx(want, rel=1e-5)
    assert m["lm_loss"] == pytest.approx(eval_loss(model, tok, lambda: p, ex)["loss"], rel=1e-5)
    # The accuracy is the count's fraction, a Python float.
    assert m["accuracy"] == m["correct"] / m["n"] and isinstance(m["accuracy"], float)


def test_summary_names_the_best_eval_metric_not_a_negative_score(llama_dir, tmp_path):
    from conftest import EXAMPLES

    out = tmp_path / "lm"
    assert main(["train", "--model", str(llama_dir), "--data", str(EXAMPLES), "--template", "Country: {country}",
                 "--virtual-tokens", "2", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "4",
                 "--eval-every", "1", "--out", str(out), "--device", "cpu"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert "best_eval_score" not in s and s["best_eval_metric"] == "loss"
    assert 0 < s["best_eval_loss"] <= s["final_eval"]["loss"] + 1e-9


# ---------------------------------------------------------------- 3: training output

def test_train_prints_each_evaluation_and_refuses_a_warmup_past_the_end(trained, llama_dir, tmp_path, capsys):
    _, data = trained
    argv = ["train", "--model", str(llama_dir), "--data", str(data), "--template", TEMPLATE, "--labels", "no,yes",
            "--label-col", "europe", "--virtual-tokens", "3", "--max-steps", "4", "--batch-size", "4", "--device", "cpu"]
    capsys.readouterr()
    assert main(argv + ["--eval-every", "2", "--warmup-steps", "1", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "untuned model held-out: loss" in err and "accuracy" in err
    assert "step 2/4 held-out: loss" in err and "step 4/4 held-out: loss" in err
    assert main(argv + ["--warmup-steps", "20", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "softprompt: error: --warmup-steps 20 is longer than the run's 4 steps: the rate would reach only 19% of "
        "--lr; give --warmup-steps 4 or less")
    assert not (tmp_path / "b").exists()
    assert main(argv + ["--eval-every", "0", "--out", str(tmp_path / "c")]) == 0  # the default warm-up, 10 steps
    warned = [line for line in capsys.readouterr().err.splitlines() if "default warm-up" in line]
    assert warned == ["[softprompt] warning: the default warm-up of 10 steps is longer than the run's 4 steps: the "
                      "rate reaches 36% of --lr (give --warmup-steps 0 or so)"]  # once, not once per check


def test_train_imports_neither_bitsandbytes_nor_peft_without_quantize(llama_dir, tmp_path):
    import subprocess
    import sys

    from conftest import EXAMPLES

    code = ("import sys\nfrom softprompt.cli import main\n"
            f"assert main(['train', '--model', {str(llama_dir)!r}, '--data', {str(EXAMPLES)!r}, '--text-col', 'country',"
            f" '--virtual-tokens', '2', '--max-steps', '1', '--warmup-steps', '1', '--batch-size', '4', '--out',"
            f" {str(tmp_path / 'r')!r}, '--device', 'cpu']) == 0\n"
            "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert "FutureWarning" not in r.stderr and "gemm_4bit" not in r.stderr


# ---------------------------------------------------------------- 4: early checks, fast --help

@pytest.mark.parametrize("case", ["help", "config_typo", "used_out", "missing_data", "bad_column", "eval_prompt"])
def test_inputs_are_checked_before_torch_is_imported(case, tmp_path):
    """Each of these is answered by the flags module alone: no torch, no transformers, no model."""
    import subprocess
    import sys

    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\na fine film\t1\n")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "summary.json").write_text("{}")
    (tmp_path / "typo.yaml").write_text("DataConfig:\n  tempalte: x\n")
    train = ["train", "--data", str(data), "--template", "{sentence}", "--out", str(tmp_path / "new")]
    argv, msg = {
        "help": (["train", "--help"], None),
        "config_typo": (train + ["--config", str(tmp_path / "typo.yaml")], "tempalte"),
        "used_out": (train[:-1] + [str(tmp_path / "used")], "already holds files"),
        "missing_data": (["train", "--data", str(tmp_path / "no.tsv"), "--template", "{sentence}"],
                         "missing data file"),
        "bad_column": (["train", "--data", str(data), "--template", "{sentense}", "--out", str(tmp_path / "new")],
                       f"column 'sentense' not found in {data} row 1 (columns: 'sentence', 'label'); a CSV/TSV "
                       "file's row 1 names its columns: add one if it holds data"),
        "eval_prompt": (["eval", "--data", str(data), "--prompt", str(tmp_path / "nope")], "missing prompt file"),
    }[case]
    code = ("import sys\nfrom softprompt.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    rc, loaded = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]", (case, r.stderr)
    if msg is None:
        assert rc == "0"
    else:
        assert rc == "2" and msg in r.stderr.strip().splitlines()[-1], r.stderr


# ---------------------------------------------------------------- 5: file modes follow the umask

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_follow_the_umask(umask, llama_dir, tmp_path):
    import os
    import stat

    from conftest import EXAMPLES

    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert main(["train", "--model", str(llama_dir), "--data", str(EXAMPLES), "--text-col", "country",
                     "--virtual-tokens", "2", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "4",
                     "--save-every", "1", "--out", str(out), "--device", "cpu"]) == 0
        assert main(["export-peft", str(out), str(tmp_path / "peft")]) == 0
    finally:
        os.umask(old)
    paths = [p for root in (out, tmp_path / "peft") for p in [root, *root.rglob("*")]]
    assert {"prompt.safetensors", "run_config.json", "summary.json", "checkpoint", "adapter_model.safetensors",
            "adapter_config.json"} <= {p.name for p in paths}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ---------------------------------------------------------------- 6: PEFT and Hub interop

def test_export_and_push_write_one_adapter_config_with_a_hub_base_model(tmp_path):
    from softprompt.prompts.hub_push import prepare_upload
    from softprompt.prompts.peft_io import export_peft
    from softprompt.prompts.prompt import SoftPrompt, save_prompt

    d = save_prompt(SoftPrompt(torch.zeros(2, 8)), tmp_path / "p", {"model": "smollm2-135m-instruct", "init": "random"})
    exported = json.loads((export_peft(d, tmp_path / "peft") / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pushed = json.loads((prepare_upload(d, tmp_path / "up", "me/p") / "adapter_config.json").read_text())
    assert pushed == exported


def test_import_reads_back_the_built_in_model_that_export_named_by_its_hub_id(tmp_path):
    # export-peft names the built-in model by its Hub id; importing our own export records it as
    # exported, so the round-tripped prompt is not "trained for another model" on the built-in.
    from softprompt.prompts.peft_io import export_peft, import_peft
    from softprompt.prompts.prefix import PrefixPrompt
    from softprompt.prompts.prompt import SoftPrompt, save_prompt, warn_other_base

    builtin = {"model": "smollm2-135m-instruct", "init": "random"}
    soft = save_prompt(SoftPrompt(torch.zeros(2, 8)), tmp_path / "soft", builtin)
    prefix = save_prompt(PrefixPrompt(torch.zeros(30, 2, 3, 1, 64)), tmp_path / "prefix", builtin)
    for d in (soft, prefix):
        back = import_peft(export_peft(d, tmp_path / f"{d.name}-peft"), tmp_path / f"{d.name}-back")
        assert json.loads((back / "prompt_config.json").read_text())["model"] == "smollm2-135m-instruct", d
    # PEFT's own adapter for that Hub id keeps it; and the two names are one model to the other-base warning
    peft_dir = tmp_path / "soft-peft"
    (peft_dir / "softprompt_config.json").unlink()
    back = import_peft(peft_dir, tmp_path / "peft-back")
    assert json.loads((back / "prompt_config.json").read_text())["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    builtin_model = types.SimpleNamespace(softprompt_model="smollm2-135m-instruct")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_other_base("HuggingFaceTB/SmolLM2-135M-Instruct", builtin_model, "prompt p")
    with pytest.warns(SoftpromptWarning, match="was trained for 'other/model'"):
        warn_other_base("other/model", builtin_model, "prompt p")


@pytest.mark.parametrize("data", ["/home/someone/private/dev.tsv", "stanfordnlp/sst2", "nyu-mll/glue:sst2"])
def test_model_card_names_hub_data_shows_the_template_and_has_model_index(data, tmp_path):
    from huggingface_hub import ModelCard

    from softprompt.prompts.hub_push import prepare_upload
    from softprompt.prompts.prompt import SoftPrompt, save_prompt

    template = "Review: {sentence}\\nSentiment:"
    meta = {"model": "smollm2-135m-instruct", "task": "classify", "template": template, "labels": ["a", "b"],
            "config": {"DataConfig": {"data": data, "template": template}},
            "eval": {"accuracy": 0.925, "loss": 0.31234567, "lm_loss": 3.3}}
    d = save_prompt(SoftPrompt(torch.zeros(2, 8)), tmp_path / "p", meta)
    card = ModelCard.load(prepare_upload(d, tmp_path / "up", "me/sst2-prompt") / "README.md")
    hub = data.split(":")[0] if not data.startswith("/") else None
    assert card.data.datasets == ([hub] if hub else None)
    assert "/home/someone" not in card.content
    assert "```text\nReview: {sentence}\nSentiment:\n```" in card.text and "\\n" not in card.text.split("## Use")[0]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.925, "loss": 0.3123}
    assert card.data.eval_results[0].task_type == "text-classification"


# ---------------------------------------------------------------- 7: lm-eval's own flags

def test_lm_eval_passes_its_output_flags_through(llama_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    rows = [("a great movie", 1), ("a dull film", 0), ("fine and warm", 1), ("boring", 0)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_sst.yaml").write_text(
        f"task: tiny_sst\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "Review: {{sentence}}\\nSentiment:"\ndoc_to_choice: ["negative", "positive"]\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "results"
    assert main(["lm-eval", "--model_args", f"pretrained={llama_dir},device=cpu", "--tasks", "tiny_sst",
                 "--include_path", str(tasks), "--output_path", str(out), "--log_samples", "--apply_chat_template",
                 "--gen_kwargs", "temperature=0", "--batch_size", "4"]) == 0
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_tiny_sst_*.jsonl")
    res = json.loads(results.read_text())
    assert res["results"]["tiny_sst"]["acc,none"] in (0, 0.25, 0.5, 0.75, 1)
    assert res["config"]["gen_kwargs"] == {"temperature": 0} and res["chat_template"]
    logged = [json.loads(l) for l in samples.read_text().splitlines()]
    assert len(logged) == 4 and "<|user|>" in logged[0]["arguments"]["gen_args_0"]["arg_0"]


# ---------------------------------------------------------------- 8: chat

def test_a_messages_column_taken_by_default_is_said(tok_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from softprompt.core.config import DataConfig
    from softprompt.data.formatting import load_splits

    data = tmp_path / "chat.jsonl"
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text((json.dumps(conv) + "\n") * 4)
    fmt, _, _ = load_splits(DataConfig(data=str(data), eval_fraction=0), AutoTokenizer.from_pretrained(tok_dir))
    assert fmt.task == "chat"
    assert "reading the 'messages' column as chat conversations" in capsys.readouterr().err


def test_a_column_of_turns_is_not_filled_into_a_template_and_a_text_column_is_not_read_as_turns(tok_dir, tmp_path):
    """Hunt 15: `--template "Q: {messages}"` trained on the list's Python text ("Q: [{'role': ..."), and
    `--messages-col text` on a column of strings named a shuffled row, not the column or what it held."""
    from transformers import AutoTokenizer

    from softprompt.core.config import DataConfig
    from softprompt.data.formatting import load_splits

    data = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data.write_text((json.dumps({"messages": conv, "text": "plain", "meta": {"a": 1}}) + "\n") * 4)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with pytest.raises(SoftpromptError, match=r"column 'messages' holds a list, not text \(chat turns train with "
                                              "--messages-col and no --template\)"):
        load_splits(DataConfig(data=str(data), template="Q: {messages}", eval_fraction=0), tok)
    with pytest.raises(SoftpromptError, match="--target ' {meta}' at .*column 'meta' holds a dict, not text"):
        load_splits(DataConfig(data=str(data), template="{text}", target=" {meta}", eval_fraction=0), tok)
    with pytest.raises(SoftpromptError, match="column 'text': expected a non-empty list of {role, content} turns, "
                                              "not a str"):
        load_splits(DataConfig(data=str(data), messages_col="text", eval_fraction=0), tok)


def test_generate_takes_a_system_message_and_conversations(llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from softprompt.generation.generate import encode_for_generation

    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert tok.decode(encode_for_generation(tok, "hi", system="Be brief.")) == \
        "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    convs = tmp_path / "convs.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Country: Chile"}]
    longer = turns + [{"role": "assistant", "content": "Europe: no"}, {"role": "user", "content": "Country: Peru"}]
    convs.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": longer}) + "\n")
    base = ["generate", "--model", str(llama_dir), "--max-new-tokens", "5", "--json"]
    with_system = run_json(capsys, base + ["--system", "Be brief.", "Country: Chile"])
    from_file = run_json(capsys, base + ["--messages", str(convs)])
    assert len(from_file) == 2 and from_file[0]["baseline"] == with_system[0]["baseline"]
    assert from_file[1]["input"] == "Country: Peru"
    capsys.readouterr()
    assert main(base + ["--messages", str(convs), "hello"]) == 2
    assert "not both" in capsys.readouterr().err


def test_ensemble_refuses_prompts_that_read_rows_otherwise(trained, llama_dir, tmp_path, capsys):
    """Every prompt is scored with the first one's template and label words: a prompt that recorded
    others was scored on rows it was not trained to read, without a word."""
    import shutil

    out, data = trained
    other = tmp_path / "other"
    shutil.copytree(out, other)
    meta = json.loads((other / "prompt_config.json").read_text())
    meta["labels"] = ["maybe", "sure"]
    meta["config"]["DataConfig"]["labels"] = "maybe,sure"
    (other / "prompt_config.json").write_text(json.dumps(meta))
    base = ["ensemble", "--model", str(llama_dir), "--data", str(data), str(out), str(other), "--json"]
    capsys.readouterr()
    assert main(base) == 2
    assert capsys.readouterr().err.strip().endswith(f"{out} records labels 'no,yes' and {other} 'maybe,sure': pass "
                                                    "--labels to score every prompt one way")
    assert run_json(capsys, base + ["--labels", "no,yes", "--label-col", "europe"])["n"] > 0
