"""Reading, formatting, tokenising and batching data; each bad input gives one clear error."""
import json

import pytest

from softprompt.core.config import DataConfig
from softprompt.core.utils import SoftpromptError
from softprompt.data.batching import batch_order, collate
from softprompt.data.formatting import Formatter, load_splits, read_rows


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_local_format_reads_the_same_rows(tmp_path):
    rows = [{"sentence": 'say "hi"', "label": "1"}, {"sentence": "bad, sad", "label": "0"}]
    files = [
        _write(tmp_path, "a.tsv", "sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows)),
        _write(tmp_path, "a.csv", 'sentence,label\n"say ""hi""",1\n"bad, sad",0\n'),
        _write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
        _write(tmp_path, "a.json", json.dumps(rows)),
        _write(tmp_path, "b.json", json.dumps({"sentence": [r["sentence"] for r in rows], "label": ["1", "0"]})),
    ]
    for f in files:
        assert read_rows(str(f)) == rows, f.name


def test_real_sst2_and_awesome_prompts_parse():
    from conftest import SHARED

    dev = read_rows(str(SHARED / "sst2" / "dev.tsv"))
    assert len(dev) == 872 and set(dev[0]) == {"sentence", "label"}
    acts = read_rows(str(SHARED / "awesome-chatgpt-prompts" / "prompts.csv"))
    assert len(acts) == 210 and set(acts[0]) == {"act", "prompt"}  # 211 rows, one malformed (skipped)


@pytest.mark.parametrize("name,text,msg", [
    ("missing.csv", None, "missing data file"),
    ("empty.csv", "", "no rows"),
    ("header.csv", "a,b\n", "no rows"),
    ("bad.jsonl", '{"a": 1}\n{"a": \n', "corrupt JSONL"),
    ("bad.json", "[{", "corrupt JSON"),
    ("ragged.tsv", "a\tb\n1\n", "wrong number of fields in every row"),
])
def test_bad_files(tmp_path, name, text, msg):
    p = tmp_path / name
    if text is not None:
        p.write_text(text)
    with pytest.raises(SoftpromptError, match=msg):
        read_rows(str(p))


def test_classification_labels_by_index_or_word(tmp_path, tiny):
    _, tok = tiny
    f = _write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in
                                           [{"s": "good", "y": 1}, {"s": "bad", "y": "negative"}]))
    cfg = DataConfig(data=str(f), template="Review: {s}\\nSentiment:", labels="negative,positive", label_col="y",
                     eval_fraction=0)
    fmt, ex, _ = load_splits(cfg, tok)
    assert sorted(e.label for e in ex) == [0, 1]
    for e in ex:  # the target is exactly the label word's tokens, after a space
        word = fmt.label_words[e.label]
        assert tok.decode(e.ids[e.loss_start:]) == " " + word
        assert tok.decode(e.ids[:e.loss_start]).endswith("Sentiment:")


def test_unknown_label_and_missing_column(tmp_path, tiny):
    _, tok = tiny
    f = _write(tmp_path, "d.csv", "s,y\ngood,2\n")
    with pytest.raises(SoftpromptError, match=r"unknown label '2' at .*d.csv row 1"):
        load_splits(DataConfig(data=str(f), template="{s}", labels="no,yes", label_col="y", eval_fraction=0), tok)
    with pytest.raises(SoftpromptError, match=r"column 'label' not found in .*d.csv"):
        load_splits(DataConfig(data=str(f), template="{s}", labels="no,yes", eval_fraction=0), tok)
    with pytest.raises(SoftpromptError, match=r"column 'text' not found"):
        load_splits(DataConfig(data=str(f), text_col="text", eval_fraction=0), tok)


def test_target_template_loss_only_on_target_plus_eos(tiny):
    _, tok = tiny
    fmt = Formatter(DataConfig(template="Act as a {act}.\\nPrompt:", target=" {prompt}"), tok)
    e = fmt.encode({"act": "teacher", "prompt": "explain things"})
    assert tok.decode(e.ids[e.loss_start:]) == " explain things" + tok.eos_token
    lm = Formatter(DataConfig(template="Act as a {act}.\\nPrompt: {prompt}"), tok).encode(
        {"act": "teacher", "prompt": "explain"})
    assert lm.loss_start == 0 and tok.decode(lm.ids) == "Act as a teacher.\nPrompt: explain"


def test_truncation_keeps_target_and_cue(tiny):
    _, tok = tiny
    fmt = Formatter(DataConfig(template="Review: {s}\\nSentiment:", labels="negative,positive", max_length=12), tok)
    e = fmt.encode({"s": "word " * 50, "label": 1})
    assert len(e.ids) <= 12 and fmt.truncated == 1
    assert tok.decode(e.ids[e.loss_start:]) == " positive"
    assert tok.decode(e.ids[:e.loss_start]).endswith("Sentiment:")


@pytest.mark.parametrize("how", [dict(template="Review: {s}\\nSentiment:", labels="negative,positive"),
                                 dict(template="Q: {s}\\nA:", target=" {t}"), dict(text_col="s")])
def test_rows_tokenised_in_chunks_equal_the_rows_one_by_one(tiny, monkeypatch, how):
    """encode_rows tokenises its rows a chunk at a time (each side of a chunk in one call); every Example
    is the one encode gives that row alone (whose contents the tests above check), cut rows and all."""
    import softprompt.data.formatting as formatting

    _, tok = tiny
    rows = [{"s": "word " * (i * 7 % 23), "t": "an answer " * (i % 4 + 1), "label": i % 2} for i in range(11)]
    cfg = DataConfig(max_length=24, **how)
    want = Formatter(cfg, tok)
    ref = [e for e in map(want.encode, rows) if e.ids]  # an empty row is left out
    monkeypatch.setattr(formatting, "ENCODE_CHUNK", 3)
    fmt = Formatter(cfg, tok)
    got = fmt.encode_rows(rows, "rows", list(range(1, 12)))
    fields = lambda exs: [(e.ids, e.loss_start, e.label, e.text) for e in exs]  # noqa: E731
    assert fields(got) == fields(ref)
    assert fmt.truncated == want.truncated > 0


def test_chat_template_wraps_input(tiny):
    _, tok = tiny
    fmt = Formatter(DataConfig(template="{q}", labels="no,yes", chat=True), tok)
    e = fmt.encode({"q": "is it?", "label": "yes"})
    assert tok.decode(e.ids[:e.loss_start]) == "<|user|>is it?\n<|assistant|>"
    assert tok.decode(e.ids[e.loss_start:]) == " yes"
    nl = Formatter(DataConfig(template="{q}\\n", labels="no,yes"), tok).encode({"q": "is it?", "label": 1})
    assert tok.decode(nl.ids[nl.loss_start:]) == "yes"  # no space after a newline


def test_heldout_split_and_limit(countries_csv, tiny):
    _, tok = tiny
    cfg = DataConfig(data=str(countries_csv), template="Country: {country}", eval_fraction=0.2, limit=50)
    _, tr, ev = load_splits(cfg, tok, seed=0)
    assert len(tr) == 50 and len(ev) == round(194 * 0.2)
    assert {e.text for e in tr}.isdisjoint({e.text for e in ev})


def test_collate_pads_right_and_masks_targets(tiny):
    _, tok = tiny
    fmt = Formatter(DataConfig(template="{a}", target=" {b}"), tok)
    exs = [fmt.encode({"a": "x", "b": "long answer here"}), fmt.encode({"a": "longer input", "b": "y"})]
    b = collate(exs, tok.pad_token_id)
    for i, e in enumerate(exs):
        n = len(e.ids)
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert (b.targets[i, :e.loss_start] == -100).all() and (b.targets[i, n:] == -100).all()
        assert b.targets[i, e.loss_start:n].tolist() == e.ids[e.loss_start:]


def test_batch_order_is_a_seeded_permutation_grouped_by_length():
    lengths = [(i * 37) % 101 for i in range(1000)]
    a, b = batch_order(lengths, 8, seed=3), batch_order(lengths, 8, seed=3)
    assert a == b and a != batch_order(lengths, 8, seed=4)
    assert sorted(i for bt in a for i in bt) == list(range(1000))
    spread = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a) / len(a)
    assert spread < 10  # random batches would spread over ~80


def test_row_errors_name_the_files_row_after_the_shuffle(tiny, tmp_path):
    """Issue 17 row 11: a row that lacks a column, or whose value the template cannot format, is an
    error naming the file's own row number (rows are shuffled before they are read)."""
    _, tok = tiny
    rows = [{"s": f"text {i}", "n": i, "label": i % 2} for i in range(20)]
    rows[13] = {"n": 13, "label": 1}
    p = _write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(data=str(p), template="{s}", labels="no,yes", eval_fraction=0.2)
    with pytest.raises(SoftpromptError, match=r"^column 's' not found in .*d\.jsonl(?: \(held out\))? row 14 "
                                              r"\(columns: 'n', 'label'\)$"):
        load_splits(cfg, tok, seed=3)
    rows[13] = {"s": "fine", "n": "thirteen", "label": 1}
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Issue 27 L9: a format spec such as {n:d} is refused with the template, before any row is read.
    with pytest.raises(SoftpromptError, match=r"^--template '\{s\} \{n:d\}': write each column as a plain"):
        load_splits(DataConfig(data=str(p), template="{s} {n:d}", labels="no,yes", eval_fraction=0.2), tok, seed=3)
    # The row numbers only label errors: the examples and their order are the same as before.
    _, tr, ev = load_splits(DataConfig(data=str(p), template="{s}", labels="no,yes", eval_fraction=0.2), tok, seed=3)
    import random

    want = list(rows)
    random.Random(3).shuffle(want)
    assert [e.text for e in ev + tr] == [r["s"] for r in want]
