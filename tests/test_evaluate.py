"""Evaluation: the label tokens' loss read off the label scores (lm_loss) equals the separate loss pass."""
import torch

from softprompt.core.config import DataConfig
from softprompt.data.formatting import load_splits
from softprompt.evaluation.evaluate import accuracy, eval_loss, evaluate
from conftest import EXAMPLES


def test_classification_loss_from_scores_equals_loss_pass(tiny):
    model, tok = tiny
    # Continent names span one to several tokens here, so both scoring paths are exercised.
    cfg = DataConfig(data=str(EXAMPLES), template="Country: {country}\\nContinent:",
                     labels="Europe,Asia,Africa,Oceania,North America,South America", label_col="continent",
                     eval_fraction=0)
    fmt, ex, _ = load_splits(cfg, tok)
    p = torch.randn(3, model.config.hidden_size) * 0.1
    prompt = lambda: p
    got, ref = evaluate(model, tok, prompt, fmt, ex), eval_loss(model, tok, prompt, ex)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["lm_loss"] - ref["loss"]) / ref["loss"] < 1e-6
    assert got["accuracy"] == accuracy(model, tok, prompt, fmt, ex)["accuracy"]


def test_label_candidates_are_per_row(tiny, tmp_path):
    """A label word after a trailing space tokenises differently from one after a word: each row is
    scored with its own candidates, exactly as when scored alone (not with the first row's)."""
    import json

    from softprompt.forward.classify import row_candidates
    from softprompt.evaluation.evaluate import example_scores

    model, tok = tiny
    rows = [{"t": "Review: a great movie\nSentiment:", "y": 1}, {"t": "Review: a dull film\nSentiment: ", "y": 0},
            {"t": "Review: a dull film\nSentiment:", "y": 0}, {"t": "Review: a great movie ", "y": 1}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, ex, _ = load_splits(DataConfig(data=str(data), template="{t}", labels="negative,positive", label_col="y",
                                        eval_fraction=0), tok)
    cands = row_candidates(fmt, ex)
    assert len({tuple(map(tuple, c)) for c in cands}) == 2  # the premise: two different candidate sets
    p = torch.randn(2, model.config.hidden_size) * 0.1
    together = example_scores(model, tok, lambda: p, fmt, ex, batch_size=4)
    alone = torch.cat([example_scores(model, tok, lambda: p, fmt, [e]) for e in ex])
    assert torch.allclose(together, alone, atol=1e-5)
    # The loss read off the scores agrees with the separate loss pass for mixed candidates too.
    got, ref = evaluate(model, tok, lambda: p, fmt, ex), eval_loss(model, tok, lambda: p, ex)
    assert got["tokens"] == ref["tokens"] and abs(got["lm_loss"] - ref["loss"]) / ref["loss"] < 1e-5


def test_a_progress_bar_is_drawn_only_for_rows_it_scores(tiny, capsys, monkeypatch):
    """Label words of several tokens each: every evaluation first drew an empty `classify: 0it` bar
    for the single-token rows there were none of (hunt 8). On a terminal: off one, no bar is drawn."""
    from softprompt.forward import classify
    from softprompt.forward.classify import label_scores

    monkeypatch.setattr(classify, "live_output", lambda: True)
    model, tok = tiny
    rows = [(None, tok("Review: a dull film\nSentiment:").input_ids)] * 2
    cands = [[tok(" negative really").input_ids, tok(" positive really").input_ids]] * 2
    assert all(len(c) > 1 for c in cands[0])
    label_scores(model, rows, cands, pad=0, progress=True)
    err = capsys.readouterr().err
    assert "classify" in err and "0it" not in err


def test_eval_says_where_it_scores_otherwise_than_train_did(llama_dir, tmp_path):
    """Hunt 13: on a CPU with native bf16, train scored its held-out rows on a bfloat16 base and eval on a
    float32 one, with another --max-length: 52 of 64 against the 53 of 64 train printed, and nothing said
    why. eval says so, naming the flags that score as train did; alike settings say nothing."""
    import json
    import warnings

    from softprompt.core.config import ModelConfig
    from softprompt.core.utils import SoftpromptWarning
    from softprompt.evaluation.evaluate import eval_prompt
    from softprompt.prompts.prompt import SoftPrompt, save_prompt

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in map(json.loads, EXAMPLES.read_text().splitlines()[:6])))
    reading = {"template": "Country: {country}\nCapital:", "target": " {capital}"}
    dcfg = DataConfig(data=str(rows), **reading)

    def scored(dtype, max_length):
        meta = {"eval": {"loss": 1.0}, "dtype": dtype, "config": {"DataConfig": {**reading, "max_length": max_length}}}
        prompt = save_prompt(SoftPrompt(torch.zeros(2, 32)), tmp_path / f"{dtype}-{max_length}", meta)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            eval_prompt(ModelConfig(model=str(llama_dir), device="cpu"), dcfg, str(prompt))
        return [str(w.message) for w in seen if issubclass(w.category, SoftpromptWarning)]

    said = scored("bfloat16", 4)
    assert any("in float32, where train ran it in bfloat16 and at --max-length 256, where train cut rows at 4" in s
               and s.endswith("(give --dtype bfloat16 --max-length 4 to score as train did)") for s in said), said
    assert not any("score as train did" in s for s in scored("float32", 256)), "alike settings said something"
    assert not any("score as train did" in s for s in scored("float32", 100)), "a length that cuts no row matters not"
