"""Property-based fuzzing of the CLI's argument and file parsing (hypothesis; issue 17): whatever
the input, `softprompt` exits 0, or exits 2 with one `softprompt: error:` line last on stderr;
never a traceback, and a refused `train` leaves no run folder.

Three properties: every command's flags with any values, parsed and turned into its configs (not
run: `serve` would serve and `demo` train the built-in model); `eval` and `train` on the tiny
Llama with generated data files (JSONL, JSON, CSV, TSV: missing columns, odd values, nested
objects), templates (stray braces, format specs, conversions), label words and lengths; and
`generate` with generated texts and decoding flags. Derandomised, so every run tries the same
inputs; no example database is written.
"""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from softprompt.cli import COMMANDS, build_parser, main  # noqa: E402
from softprompt.core.config import (CompareConfig, DataConfig, GenerateConfig, ModelConfig, PromptConfig,  # noqa: E402
                               ServeConfig, TrainConfig, from_args)
from softprompt.core.utils import SoftpromptError  # noqa: E402

CONFIGS = (ModelConfig, DataConfig, PromptConfig, TrainConfig, GenerateConfig, CompareConfig, ServeConfig)
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

NASTY = st.sampled_from(["", " ", "\n", "\\n", "{", "}", "{}", "{0}", "{x!z}", "{x:d}", "{x.y}", "{x[0]}", "nan",
                         "inf", "-1", "0", "1e400", "\x00", "\ud800", "é🤖", "a,b", ",", "--", "-h2", "=x"])
text = st.text(max_size=10) | NASTY
numbers = st.integers(-3, 70).map(str) | st.floats(allow_nan=True, allow_infinity=True).map(str)


def _flags(cmd: str) -> list[str]:
    p = build_parser(only=cmd)._subparsers._group_actions[0].choices[cmd]
    return [o for a in p._actions for o in a.option_strings if o not in ("-h", "--help")]


def _run(argv: list[str]) -> int:
    return main(argv)


def _ends_well(rc: int, err: str) -> None:
    hypothesis.event(f"exit {rc}" + (f": {err.splitlines()[-1][19:50]}" if rc else ""))
    assert rc in (0, 2), rc
    assert "Traceback" not in err
    if rc == 2:
        assert err.splitlines()[-1].startswith("softprompt: error: "), err


@st.composite
def argvs(draw):
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    tokens = st.sampled_from(_flags(cmd)) | text | numbers
    return [cmd, *draw(st.lists(tokens, max_size=8))]


@settings(max_examples=200, **FUZZ)
@given(argv=argvs())
def test_any_flags_parse_into_configs_or_one_error(argv):
    try:
        args = build_parser(only=argv[0]).parse_args(argv)
        for cls in CONFIGS:
            from_args(cls, args)
    except SoftpromptError as e:
        assert "\n" not in str(e) or "\\n" in argv[-1] or any("\n" in a for a in argv)


# ---------------------------------------------------------------- data files, run for real

def mostly(good, bad):
    """About four draws in five from `good`, so that many inputs get past the checks into the model."""
    return st.integers(0, 9).flatmap(lambda i: bad if i in (3, 7) else good)


COLUMNS = ["text", "label", "x", "y"]
values = (st.none() | st.booleans() | st.integers(-2, 3) | st.floats(allow_nan=True) | text
          | st.sampled_from(["a dull film", "no", "yes", "positive", "1", "0"]))
odd_values = st.recursive(values, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(text, inner, max_size=2),
                          max_leaves=4)
good_row = st.fixed_dictionaries({"text": st.sampled_from(["a great movie", "a dull film", "ok", "é🤖 x"]) | text,
                                  "label": st.sampled_from([0, 1, "0", "1", "no", "yes"])},
                                 optional={"x": values, "y": odd_values})
odd_row = st.dictionaries(st.sampled_from(COLUMNS) | text, odd_values, max_size=4)
rows = mostly(st.lists(mostly(good_row, odd_row), min_size=3, max_size=8), st.lists(odd_row, max_size=2))
templates = mostly(st.sampled_from(["Review: {text}\\nSentiment:", "{text}", "{text} {x}", "Q: {text!r} {{A}}:",
                                    "{text:>12}|"]),
                   st.lists(st.sampled_from(["Review: ", "{text}", "{x}", "{label}", "\\n", " ", "{", "}", "{{",
                                             "{text:>3}", "{x!r}", "{y.real}", "{text[0]}"]) | NASTY,
                            max_size=4).map("".join))
label_words = mostly(st.sampled_from(["no,yes", "negative,positive", "bad, good ,fine"]),
                     st.sampled_from(["a", "yes,yes", " , ,x,y", "\\n,\\t"]) | text)
lengths = mostly(st.sampled_from(["8", "16", "64"]), st.sampled_from(["-1", "0", "1", "2", "3"]))


def _write(path, kind: str, rs: list[dict]) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    elif kind == "json":
        path.write_text(json.dumps(rs))
    else:  # csv/tsv: the first row's keys as the header, values as text
        cols = list(dict.fromkeys(k for r in rs for k in r)) or ["text"]
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if kind == "tsv" else ",")
        w.writerow(cols)
        for r in rs:
            w.writerow([str(r.get(c, "")).replace("\t", " ") for c in cols])
        path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass"))  # a lone surrogate: not UTF-8


@st.composite
def data_args(draw, tmp):
    kind = draw(st.sampled_from(["jsonl", "json", "csv", "tsv"]))
    path = tmp / f"d{draw(st.integers(0, 10 ** 9))}.{kind}"
    _write(path, kind, draw(rows))
    argv = ["--data", str(path)]
    how = draw(mostly(st.just("template"), st.sampled_from(["text_col", "both", "none"])))
    if how in ("template", "both"):
        argv += ["--template", draw(templates)]
    if how in ("text_col", "both"):
        argv += ["--text-col", draw(st.sampled_from(COLUMNS) | text)]
    task = draw(st.sampled_from(["classify", "classify", "target", "lm"]))
    if task == "classify":
        argv += ["--labels", draw(label_words), "--label-col", draw(mostly(st.just("label"), st.just("missing")))]
    elif task == "target":
        argv += ["--target", draw(mostly(st.sampled_from([" {label}", " {x}"]), templates))]
    argv += ["--max-length", draw(lengths)]
    if draw(st.booleans()):
        argv += ["--chat"]
    return argv


@settings(max_examples=80, **FUZZ)
@given(data=st.data())
def test_eval_on_any_data_file_ends_in_a_result_or_one_error(data, llama_dir, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("fuzz")
    argv = ["eval", "--model", str(llama_dir), "--device", "cpu", *data.draw(data_args(tmp))]
    capsys.readouterr()
    rc = _run(argv)
    out, err = capsys.readouterr()
    _ends_well(rc, err)
    if rc == 0:
        assert math.isfinite(float(out.split()[1])) or out.split()[1] in ("nan", "inf")  # "loss <x> ..."


@settings(max_examples=20, phases=[Phase.generate], **FUZZ)  # no shrinking: each example trains
@given(data=st.data())
def test_train_on_any_data_file_trains_or_makes_nothing(data, llama_dir, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("fuzz")
    out = tmp / "run"
    argv = ["train", "--model", str(llama_dir), "--device", "cpu", "--out", str(out), "--max-steps", "1",
            "--batch-size", "2", "--virtual-tokens", "2", "--eval-every", "0", "--save-every", "0",
            "--eval-fraction", data.draw(st.sampled_from(["0", "0.3"])), *data.draw(data_args(tmp))]
    capsys.readouterr()
    rc = _run(argv)
    _ends_well(rc, capsys.readouterr().err)
    assert (out / "prompt.safetensors").is_file() if rc == 0 else not out.exists()


@settings(max_examples=40, **FUZZ)
@given(texts=st.lists(mostly(st.sampled_from(["Country: Peru\nFacts:", "hello", " "]), text), max_size=3),
       flags=st.lists(st.sampled_from(["--sample", "--chat", "--compare", "--json"]), unique=True),
       budget=mostly(st.sampled_from(["1", "3"]), st.sampled_from(["-1", "0"])),
       temperature=mostly(st.sampled_from(["0.7", "1", "5"]), numbers),
       top_p=mostly(st.sampled_from(["0.5", "1"]), numbers),
       penalty=mostly(st.sampled_from(["1", "1.3"]), numbers))
def test_generate_on_any_text_and_flags_ends_in_text_or_one_error(texts, flags, budget, temperature, top_p, penalty,
                                                                  llama_dir, capsys):
    argv = ["generate", "--model", str(llama_dir), "--device", "cpu", "--max-new-tokens", budget, "--temperature",
            temperature, "--top-p", top_p, "--repetition-penalty", penalty, *flags, "--", *texts]
    capsys.readouterr()
    rc = _run(argv)
    _ends_well(rc, capsys.readouterr().err)


def test_lm_rows_of_one_token_train_and_evaluate(llama_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    assert main(["train", "--model", str(llama_dir), "--device", "cpu", "--data", str(data), "--template", "{text}",
                 "--max-length", "1", "--max-steps", "1", "--eval-fraction", "0.5", "--out", str(tmp_path / "run")]) == 0
