"""Data through `datasets`: parquet and arrow files, a builder over --data-files, a Hub-style dataset
folder with named configs (NAME:CONFIG / --data-config) and splits (--split, --eval-split), all
giving the same examples as the same rows in a JSONL file; Arrow data stays Arrow (no second copy
as Python lists); offline, a Hub id is one error line, said before any model loads."""
import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from softprompt.core.config import DataConfig
from softprompt.core.utils import SoftpromptError, SoftpromptWarning
from softprompt.data.datasource import read_rows, take
from softprompt.data.precheck import check_source
from softprompt.data.formatting import load_splits

ROWS = [{"sentence": f"film number {i} was {'good' if i % 3 else 'bad'}", "label": int(i % 3 != 0)} for i in range(30)]
DEV = [{"sentence": f"dev film {i} was {'fine' if i % 2 else 'dull'}", "label": i % 2} for i in range(8)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(data, **kw):
    return DataConfig(data=str(data), template="Review: {sentence}\\nSentiment:", labels="negative,positive", **kw)


def _ids(examples):
    return [(e.ids, e.loss_start, e.label) for e in examples]


@pytest.fixture
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def test_parquet_arrow_and_builder_files_equal_jsonl(tmp_path, tok):
    ref = load_splits(_cfg(_jsonl(tmp_path / "d.jsonl", ROWS), eval_fraction=0.2), tok, seed=1)
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, ds.data.schema) as w:
        w.write_table(ds.data.table)
    ds.select(range(12)).to_parquet(str(tmp_path / "a.parquet"))
    ds.select(range(12, 30)).to_parquet(str(tmp_path / "b.parquet"))
    for data, kw in [(tmp_path / "d.parquet", {}), (tmp_path / "d.arrow", {}),
                     ("parquet", {"data_files": f"{tmp_path / 'a.parquet'},{tmp_path / 'b.parquet'}"})]:
        fmt, tr, ev = load_splits(_cfg(data, eval_fraction=0.2, **kw), tok, seed=1)
        assert _ids(tr) == _ids(ref[1]) and _ids(ev) == _ids(ref[2]), data
    rows = read_rows(str(tmp_path / "d.parquet"))
    assert isinstance(rows, datasets.Dataset)  # memory-mapped Arrow, rows built one at a time
    assert list(take(rows, [3, 1])) == [ROWS[3], ROWS[1]]


def test_builder_files_are_recorded_absolute_and_each_pattern_must_match(tmp_path, tok, monkeypatch, capsys):
    """`--data parquet --data-files 'parts/*.parquet'` was recorded as typed, so the run's record read
    nothing from another folder; a pattern matching no file was said to be a schema or Hub problem,
    after the model had loaded. (A Hub dataset's --data-files are its repository's: left as given.)"""
    from softprompt.cli import main
    from softprompt.core.config import DataConfig

    (tmp_path / "parts").mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "parts" / "a.parquet"))
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(data="parquet", data_files="parts/*.parquet", text_col="sentence")
    assert cfg.data_files == str(tmp_path / "parts" / "*.parquet")
    assert DataConfig(data="org/set", data_files="data/*.parquet").data_files == "data/*.parquet"
    monkeypatch.chdir(tmp_path / "parts")  # the record, read from elsewhere
    assert len(load_splits(cfg, tok)[1]) == len(ROWS) - 3
    for files, words in (("nothing/*.parquet", f"--data-files {tmp_path}/parts/nothing/*.parquet: no file matches"),
                         ("", "--data parquet reads the files that --data-files names")):
        assert main(["train", "--model", str(tmp_path / "no-model"), "--data", "parquet", "--data-files", files,
                     "--text-col", "sentence", "--out", str(tmp_path / "run")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_large_file_holds_out_a_thousand_rows_and_the_rest_trains(tmp_path, tok):
    """--eval-fraction 0.1 of a 67k-row file held out and scored 6,735 rows at every evaluation (half an
    hour each for language modelling on a CPU, hunt 9); at most 1000 are held out now, or --eval-limit's
    N, and no held-out row goes unscored (--eval-limit took N of the 10% and left the rest idle)."""
    rows = [{"sentence": f"film {i}", "label": i % 2} for i in range(12_000)]
    data = _jsonl(tmp_path / "big.jsonl", rows)
    for limit, held in ((0, 1000), (300, 300), (5000, 1200)):
        _, train, evals = load_splits(_cfg(data, eval_limit=limit), tok)
        assert (len(train), len(evals)) == (12_000 - held, held), limit


def _hub_style_folder(root):
    """A dataset repository as the Hub holds one: data files per config and split, the configs
    declared in the README's YAML header."""
    for config, rows, dev in (("sst2", ROWS, DEV), ("tiny", ROWS[:4], DEV[:2])):
        d = root / "data" / config
        d.mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(str(d / "train.parquet"))
        datasets.Dataset.from_list(dev).to_parquet(str(d / "validation.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: data/{c}/train.parquet\n"
        f"  - split: validation\n    path: data/{c}/validation.parquet\n" for c in ("sst2", "tiny")) + "---\n")
    return root


def test_named_config_and_eval_split_of_a_dataset_repository(tmp_path, tok):
    repo = _hub_style_folder(tmp_path / "glue")
    ref_train = load_splits(_cfg(_jsonl(tmp_path / "t.jsonl", ROWS), eval_fraction=0), tok, seed=2)[1]
    ref_dev = load_splits(_cfg(_jsonl(tmp_path / "v.jsonl", DEV), eval_fraction=0), tok)[1]
    for cfg in (_cfg(f"{repo}:sst2", eval_split="validation"), _cfg(repo, data_config="sst2", eval_split="validation")):
        _, tr, ev = load_splits(cfg, tok, seed=2)
        assert _ids(tr) == _ids(ref_train) and sorted(_ids(ev)) == sorted(_ids(ref_dev))
    _, tr, _ = load_splits(_cfg(f"{repo}:tiny", eval_fraction=0), tok)
    assert len(tr) == 4
    # The eval side's --split: `eval` reads one split of the dataset.
    _, dev, _ = load_splits(_cfg(f"{repo}:sst2", split="validation", eval_fraction=0), tok)
    assert sorted(_ids(dev)) == sorted(_ids(ref_dev))
    # A split the local folder lacks is said to be the folder's, not the Hub's (no Hub was asked).
    with pytest.raises(SoftpromptError) as e:
        load_splits(_cfg(f"{repo}:sst2", split="test", eval_fraction=0), tok)
    assert str(e.value).startswith(f"cannot load the folder '{repo}' (config 'sst2', split 'test'): ")
    assert "Hub" not in str(e.value) and "'validation'" in str(e.value)
    # A folder whose files hold other columns: one line, not datasets' DatasetGenerationError traceback.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"t": "good", "label": 1}\n')
    (mixed / "b.jsonl").write_text('{"text": "x", "n": [1, 2]}\n')
    with pytest.raises(SoftpromptError, match=r"^cannot read '.*mixed' \(split 'train'\) as one table of rows "
                                              r"\(CastError: .*\): do its files share their columns\?$"):
        load_splits(_cfg(str(mixed), eval_fraction=0), tok)
    # A folder of files of two types: datasets read the commonest type's alone, without a word.
    (mixed / "b.jsonl").unlink()
    (mixed / "a.jsonl").write_text('{"sentence": "good", "label": 1}\n')
    (mixed / "c.csv").write_text("sentence,label\nbad,0\n")
    (mixed / "dataset_info.json").write_text("{}")  # datasets' metadata is no data file
    with pytest.raises(SoftpromptError, match=r"folder .*mixed holds data files of several types \(a.jsonl, c.csv\)"):
        check_source(str(mixed))
    (mixed / "c.csv").unlink()
    assert len(load_splits(_cfg(str(mixed), eval_fraction=0), tok)[1]) == 1


@pytest.mark.parametrize("kw,msg", [
    ({"data": "x.csv", "eval_split": "train"}, "--eval-split 'train' is the training --split"),
    ({"data": "org/set:a", "data_config": "b"}, "--data 'org/set:a' names config 'a' but --data-config says 'b'"),
    ({"data": "no-such-org/no-such-set:cfg"},
     "cannot load dataset 'no-such-org/no-such-set' (config 'cfg', split 'train') from the Hugging Face Hub"),
])
def test_refused_with_one_line(tok, kw, msg):
    with pytest.raises(SoftpromptError) as e:
        load_splits(DataConfig(text_col="t", **kw), tok)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_a_corrupt_parquet_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SoftpromptError, match="cannot read .*bad.parquet"):
        read_rows(str(tmp_path / "bad.parquet"))


def test_eval_split_of_a_local_file_is_refused_it_held_out_every_training_row(tmp_path, tok, capsys):
    """A local file is read whole, so --eval-split validation "held out" the training rows themselves
    (eval_examples equal to train_examples, hunt 9); eval --split is refused so, and train's too now."""
    from softprompt.cli import main

    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(SoftpromptError, match="--eval-split validation: --data .* is a local file, read whole"):
        load_splits(_cfg(data, eval_split="validation"), tok)
    assert main(["train", "--model", str(tmp_path / "no-model"), "--data", str(data), "--template", "{sentence}",
                 "--eval-split", "validation", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err  # the same words as load_splits': the held-out rows go in --eval-data
    assert "--eval-split validation: --data" in err and "--eval-data FILE" in err and not (tmp_path / "run").exists()


def test_a_hub_dataset_or_builder_is_read_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A Hub id was read only after the model loaded, so an unknown or unreachable dataset, a split it
    lacks or a column the template names but it lacks was said a model load later (and, with the Hub
    unreachable, after `datasets`' retries). Each is now one line before any model loads: here a
    --model that does not exist, which would be named first otherwise."""
    from softprompt.cli import main

    (tmp_path / "parts").mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "parts" / "a.parquet"))
    capsys.readouterr()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as conftest sets it: no request leaves this machine
    argv = ["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run")]
    builder = ["--data", "parquet", "--data-files", str(tmp_path / "parts" / "a.parquet")]
    for flags, words in (
            (["--data", "nobody/nothing", "--template", "{text}"],
             "cannot load dataset 'nobody/nothing' (split 'train') from the Hugging Face Hub"),
            ([*builder, "--template", "Review: {sentense}"],
             "column 'sentense' not found in parquet (columns: 'sentence', 'label')"),
            ([*builder, "--template", "{sentence}", "--eval-split", "validation"], "split 'validation'"),
            (builder, "say how to read each row of parquet (columns: 'sentence', 'label')")):
        assert main([*argv, *flags]) == 2, flags
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if line.startswith("softprompt:")]  # not `datasets`' progress
        assert len(said) == 1 and words in said[0] and "no-model" not in err and "Traceback" not in err, (flags, err)
    assert not (tmp_path / "run").exists()
    # what passes the check trains as before: the model is then the first thing that fails
    assert main([*argv, *builder, "--template", "{sentence}"]) == 2
    assert "no-model" in capsys.readouterr().err
    # the installed command on the built-in model, as a user meets it: no weights are loaded
    r = subprocess.run([str(Path(sys.executable).parent / "softprompt"), "train", "--data", "nobody/nothing",
                        "--template", "{text}", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    said = "softprompt: error: cannot load dataset 'nobody/nothing'"
    assert r.returncode == 2 and "Loading" not in r.stderr and r.stderr.startswith(said), r.stderr


def _table(path, rows, header: bool, sep: str = "\t"):
    lines = ([sep.join(rows[0])] if header else []) + [sep.join(str(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("ext,sep", [(".tsv", "\t"), (".csv", ",")])
def test_columns_names_a_header_less_table_and_it_reads_as_the_headed_one(tmp_path, tok, ext, sep):
    """A header-less CSV/TSV file (AG News as shared here: text, then the label) could not be read at all:
    row 1 became the column names. --columns names them, for --data and --eval-data alike."""
    headed = load_splits(_cfg(_table(tmp_path / f"h{ext}", ROWS, True, sep),
                              eval_data=str(_table(tmp_path / f"hd{ext}", DEV, True, sep))), tok, seed=1)
    bare = load_splits(_cfg(_table(tmp_path / f"b{ext}", ROWS, False, sep), columns="sentence,label",
                            eval_data=str(_table(tmp_path / f"bd{ext}", DEV, False, sep))), tok, seed=1)
    assert _ids(bare[1]) == _ids(headed[1]) and _ids(bare[2]) == _ids(headed[2]) and len(bare[1]) == len(ROWS)
    with pytest.raises(SoftpromptError, match="column 'sentence' not found .*row 1 names its columns: add one if it "
                                              "holds data, or name them with --columns"):
        check_source(str(tmp_path / f"b{ext}"), columns=["sentence", "label"])


@pytest.mark.parametrize("kw,msg", [
    ({"columns": "text,,label"}, "--columns 'text,,label' has an empty name"),
    ({"columns": "text,text"}, "--columns 'text,text' names a column twice"),
    ({"columns": "text,label", "data": "d.jsonl"}, "--columns names the columns of a header-less .csv/.tsv file, "
                                                   "and --data 'd.jsonl' is not one"),
    ({"columns": "text,label", "data": "org/set", "eval_data": "e.json"}, "and --data 'org/set' and --eval-data "
                                                                        "'e.json' are not one"),
])
def test_columns_refused_with_one_line(kw, msg):
    with pytest.raises(SoftpromptError) as e:
        DataConfig(template="{text}", **{"data": "d.tsv", **kw})
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_columns_against_a_file_it_does_not_fit_is_said_before_the_model_loads(tmp_path, capsys):
    from softprompt.cli import main

    bare = _table(tmp_path / "b.tsv", ROWS, False)
    argv = ["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"), "--template", "{text}"]
    for flags, words in ((["--data", str(bare), "--columns", "text,label,source"],
                          "b.tsv row 1 has 2 field(s), and --columns names 3 (text, label, source)"),
                         (["--data", str(bare), "--columns", "sentence,label"],
                          "column 'text' not found in ")):
        assert main([*argv, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "no-model" not in err, (flags, err)
    assert not (tmp_path / "run").exists()


def test_a_mixture_task_reading_its_own_file_does_not_take_the_flags_columns():
    """--columns names the columns of one file: a --mix task with a JSONL file of its own was refused for
    the first task's --columns, and one with a header-less file names its own."""
    cfg = DataConfig(data="a.tsv", columns="text,label", template="{text}", labels="no,yes",
                     mix=['{"data": "b.jsonl", "template": "{x}", "labels": "no,yes"}',
                          '{"data": "c.csv", "columns": "x,label", "template": "{x}", "labels": "no,yes"}'])
    assert [(t.data, t.header) for t in cfg.tasks()] == [("a.tsv", ["text", "label"]), ("b.jsonl", None),
                                                         ("c.csv", ["x", "label"])]


def test_a_prompt_trained_with_columns_reads_a_header_less_file_as_its_training_file(tmp_path, tok):
    """eval of a prompt trained on a header-less file (AG News as shared here) took that file's row 1 for
    column names unless --columns was given again. A file header-less as the training file was (row 1
    lacks the reading's columns, with as many fields as the names) now takes the recorded names; a headed
    file, one of another width, and --columns given stay as they were."""
    from softprompt.prompts.recorded import recorded_columns

    meta = {"config": {"DataConfig": {"columns": "sentence,label", "template": "{sentence}", "labels": "neg,pos"}}}
    bare = _table(tmp_path / "bare.tsv", ROWS, False)
    with pytest.warns(SoftpromptWarning, match="reading .*bare.tsv without a header, its columns named sentence,label "
                                               "as the prompt's training data was"):
        taken = recorded_columns(_cfg(bare), meta)
    assert taken.header == ["sentence", "label"]
    headed = load_splits(_cfg(_table(tmp_path / "headed.tsv", ROWS, True)), tok, seed=1)
    assert _ids(load_splits(taken, tok, seed=1)[1]) == _ids(headed[1])
    wide = tmp_path / "wide.tsv"
    wide.write_text("".join(f"{r['sentence']}\t{r['label']}\tx\n" for r in ROWS))
    for unchanged in (_cfg(tmp_path / "headed.tsv"), _cfg(wide), _cfg(bare, columns="label,sentence")):
        assert recorded_columns(unchanged, meta) == unchanged, unchanged


def _bad_sources(tmp: Path) -> list[tuple[list[str], str]]:
    """(flags, the words of their one error line) for data the run could not read (hunt 10), each made here."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.jsonl").write_bytes(b'{"sentence": "caf\xe9", "label": 1}\n')
    for folder, name in (("d_empty", "empty.jsonl"), ("d_latin1", "latin1.jsonl")):
        (tmp / folder).mkdir()
        (tmp / folder / name).write_bytes((tmp / name).read_bytes())
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp / "d.parquet"))
    (tmp / "d.json").write_text(json.dumps(ROWS))
    (tmp / "header.csv").write_text("sentence,label\n")
    (tmp / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]) + "{oops\n")
    words = [{**r, "label": ["neg", "pos"][r["label"]]} for r in ROWS]
    (tmp / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in words))
    late = [dict(r, label=1) for r in ROWS[:3]] + [dict(ROWS[3], label=3)] + ROWS[4:]
    (tmp / "late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in late))
    (tmp / "d.csv").write_text("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in ROWS))
    (tmp / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in ROWS))
    (tmp / "d.txt").write_text("a film\n")
    return [
        (["--data", "json", "--data-files", str(tmp / "empty.jsonl")], "no rows in 'json' (split 'train')"),
        (["--data", str(tmp / "d_empty")], "no rows in '"),
        (["--data", "json", "--data-files", str(tmp / "latin1.jsonl")], "Invalid UTF8 sequence"),
        (["--data", str(tmp / "d_latin1")], "(is it UTF-8 text?)"),
        (["--data", str(tmp / "d.json"), "--template", "{text}"], "column 'text' not found in "
                                                                  f"{tmp / 'd.json'} (columns: 'sentence', 'label')"),
        (["--data", str(tmp / "d.parquet"), "--template", "{text}"],
         f"column 'text' not found in {tmp / 'd.parquet'} ("),
        (["--data", str(tmp / "header.csv")], f"no rows in {tmp / 'header.csv'}"),
        (["--data", str(tmp / "broken.jsonl")], "corrupt JSONL in "),
        (["--data", str(tmp / "words.jsonl")], "unknown label 'neg' at "),
        (["--data", str(tmp / "late.jsonl")], f"unknown label 3 at {tmp / 'late.jsonl'} row 4: expected one of"),
        (["--data", str(tmp / "d.txt")], "a file of type '.txt' is not read"),
        (["--data", str(tmp / "d.csv"), "--data-files", str(tmp / "d.csv")], "is a local file, read whole"),
        (["--data", "parquet", "--data-files", str(tmp / "d.csv")], "cannot read the --data-files of 'parquet'"),
    ]


def test_data_the_run_could_not_read_is_one_line_before_the_model_loads(tmp_path, capsys):
    """Hunt 10: an empty or non-UTF-8 JSON file read through `datasets` ended in a StopIteration or a
    UnicodeDecodeError traceback (the second after the model loaded); a misspelt column in a .json or
    .parquet file, an empty, broken or non-UTF-8 local file and label values that are not the label
    words were each said only after the model loaded (and named a row the shuffle met first); a .txt or
    .gz file was read as JSON. Each is now one line, before any model loads (a --model that does not
    exist would be named first otherwise), and names the first bad row in file order."""
    from softprompt.cli import main

    argv = ["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"), "--template",
            "Review: {sentence}", "--labels", "negative,positive"]
    for flags, words in _bad_sources(tmp_path):
        assert main([*argv, *flags]) == 2, flags
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("softprompt:")]
        assert len(said) == 1 and words in said[0] and "no-model" not in said[0], (flags, said)
    assert not (tmp_path / "run").exists()


def test_a_file_builder_s_parse_error_is_not_blamed_on_columns_or_the_hub(tmp_path):
    # A TSV read as CSV: row 1 of data has no comma, the next has one (a second field).
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nplain\t1\nno wit , only gags\t0\n")
    with pytest.raises(SoftpromptError) as e:
        read_rows("csv", data_files=str(tmp_path / "d.tsv"))
    assert "ParserError" in str(e.value) and "share their columns" not in str(e.value)
    with pytest.raises(SoftpromptError) as e:
        read_rows("parquet", data_files=str(tmp_path / "d.tsv"))
    assert str(e.value).startswith("cannot read the --data-files of 'parquet'") and "Hub" not in str(e.value)


def test_what_the_early_read_refused_wrongly_is_read_as_the_run_reads_it(tmp_path, tok):
    """Hunt 11 on the early read: an --eval-data folder was read at split '' (the run reads validation); a
    row the run skips (null text) was refused for its label while a null label passed and failed after the
    model loaded (the run now skips it too); a bad label past eval --limit's rows refused the file; a --mix
    task with its own file inherited --data-files; a header-less file's blank first line and a headed
    --eval-data beside a header-less --data were refused under --columns."""
    from softprompt.flags import check_data

    repo = _hub_style_folder(tmp_path / "glue")
    train = _jsonl(tmp_path / "t.jsonl", ROWS)
    check_data(_cfg(train, eval_data=f"{repo}:sst2"))  # its validation split, as load_splits reads it
    assert len(load_splits(_cfg(train, eval_data=f"{repo}:sst2"), tok)[2]) == len(DEV)
    nulls = ROWS[:5] + [{"sentence": None, "label": "???"}, {"sentence": "unlabelled", "label": None}] + ROWS[5:]
    data = _jsonl(tmp_path / "nulls.jsonl", nulls)
    check_data(_cfg(data))
    with pytest.warns(SoftpromptWarning, match=r"skipped 2 row\(s\) of .* with null in sentence, label "
                                               r"\(rows \[6, 7\]"):
        assert len(load_splits(_cfg(data, eval_fraction=0), tok)[1]) == len(ROWS)
    late = _jsonl(tmp_path / "late.jsonl", ROWS + [{"sentence": "meh", "label": "neutral"}])
    check_data(_cfg(late, limit=8), eval_too=False, scoring=True)  # eval --limit 8 scores rows 1-8 only
    with pytest.raises(SoftpromptError, match=f"unknown label 'neutral' at {late} row 31"):
        check_data(_cfg(late, limit=8))  # train draws its --limit rows from all of them
    mixed = DataConfig(data="json", data_files=str(train), template="{sentence}", labels="negative,positive",
                       mix=[json.dumps({"data": str(_table(tmp_path / "h.tsv", ROWS, True)), "template": "{sentence}",
                                        "labels": "negative,positive"})])
    check_data(mixed)
    bare = tmp_path / "blank.tsv"
    bare.write_text("\n" + _table(tmp_path / "b.tsv", ROWS, False).read_text())
    headed = _table(tmp_path / "hd.tsv", DEV, True)
    cfg = _cfg(bare, columns="sentence,label", eval_data=str(headed))
    check_data(cfg)
    _, tr, ev = load_splits(cfg, tok)
    assert len(tr) == len(ROWS) and len(ev) == len(DEV)  # hd.tsv's header row, equal to --columns, is no row


def test_a_later_json_row_without_a_column_is_named_before_the_model_loads(tmp_path):
    from softprompt.flags import check_data

    data = _jsonl(tmp_path / "d.jsonl", ROWS[:4] + [{"label": 1}] + ROWS[4:])
    with pytest.raises(SoftpromptError, match=f"column 'sentence' not found in {data} row 5 \\(columns: 'label'\\)"):
        check_data(_cfg(data))
    with pytest.raises(SoftpromptError, match=r"column 'sentence' not found in .*h.tsv \(columns named by --columns: "):
        check_data(_cfg(_table(tmp_path / "h.tsv", ROWS, True), columns="text,label"))


def test_labels_map_the_data_s_values_to_other_words(tmp_path, tok):
    """Hunt 12: RTE's labels are the strings entailment and not_entailment (2 and 5 tokens), so the README's
    --labels entailment,not_entailment trained over the whole vocabulary and learnt the majority class; the
    benches rewrote the files to yes/no. --labels VALUE=WORD maps a value to a word: the same Examples as
    the rewritten file, the values checked before the model loads."""
    from softprompt.flags import check_data

    words = [{**r, "label": ["entailment", "not_entailment"][r["label"]]} for r in ROWS]
    mapped = DataConfig(data=str(_jsonl(tmp_path / "w.jsonl", words)), template="Review: {sentence}\\nSentiment:",
                        labels="entailment=yes , not_entailment=no", eval_fraction=0)
    assert (mapped.label_words, mapped.label_values) == (["yes", "no"], ["entailment", "not_entailment"])
    ref = load_splits(replace(mapped, data=str(_jsonl(tmp_path / "i.jsonl", ROWS)), labels="yes,no"), tok)[1]
    assert _ids(load_splits(mapped, tok)[1]) == _ids(ref)
    check_data(mapped)
    odd = _jsonl(tmp_path / "odd.jsonl", words[:3] + [{"sentence": "x", "label": "neutral"}])
    with pytest.raises(SoftpromptError, match=r"unknown label 'neutral' at .*odd.jsonl row 4: expected one of "
                                              r"\['entailment', 'not_entailment'\]"):
        check_data(replace(mapped, data=str(odd)))
    for labels, words in (("a=yes,b=", "neither empty"), ("a=yes,a=no", "names a value twice"),
                          ("a=yes,b=yes", "names a word twice")):
        with pytest.raises(SoftpromptError, match=words):
            DataConfig(template="{x}", labels=labels)
