"""Prompt ensembling: K prompts (of different lengths) scored over one model give each prompt's scores
alone; majority vote and mean log-probability are combined correctly."""
import json

import pytest
import torch

from conftest import EXAMPLES
from softprompt.cli import main
from softprompt.core.config import DataConfig
from softprompt.data.formatting import load_splits
from softprompt.evaluation.ensemble import combine, ensemble_report, ensemble_scores
from softprompt.evaluation.evaluate import example_scores
from softprompt.forward import classify
from softprompt.forward.classify import row_candidates
from softprompt.prompts.prompt import SoftPrompt, save_prompt

# Continent names: one to several tokens each (both scoring paths); capital/language: one token each.
LABELS = {"multi": ("Continent:", "Europe,Asia,Africa,Oceania,North America,South America", "continent"),
          "single": ("Capital or language?", "capital,language", "country")}


@pytest.mark.parametrize("kind", ["multi", "single"])
def test_each_prompt_scores_as_alone_in_batches_of_its_own(tiny, kind, tmp_path, monkeypatch):
    """Batches that mixed several soft prompts' rows ran each prompt's tokens again in every row, ~1.3x
    slower than scoring each prompt alone (hunt 13): each forward pass now holds one prompt's rows."""
    model, tok = tiny
    cue, labels, col = LABELS[kind]
    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()][:20]
    if kind == "single":  # give the rows a label column whose values are those label words
        rows = [{**r, "country": ("capital", "language")[i % 2]} for i, r in enumerate(rows)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, ex, _ = load_splits(DataConfig(data=str(data), template="Capital: {capital}\\n" + cue, labels=labels,
                                        label_col=col, eval_fraction=0), tok)
    lens = {len(w) for c in row_candidates(fmt, ex) for w in c}
    assert (lens == {1}) == (kind == "single")  # the premise: the path this case means to test
    torch.manual_seed(0)
    prompts = [torch.randn(P, model.config.hidden_size) * 0.2 for P in (2, 3, 5)]
    seen = []
    real = classify.next_logprobs if kind == "single" else classify.rows_continuations
    name = "next_logprobs" if kind == "single" else "rows_continuations"
    # single: rows of (prompt [P, H], ids); multi: each row's prompt keys and values (their .length)
    length = (lambda r: r[0].shape[0]) if kind == "single" else (lambda r: r.length)
    monkeypatch.setattr(classify, name, lambda m, rows, *a: seen.append({length(r) for r in rows}) or real(m, rows, *a))
    together = ensemble_scores(model, prompts, fmt, ex)
    # each forward pass holds one prompt's rows (told apart by their lengths), and every prompt is scored
    assert len(seen) >= 3 and all(len(s) == 1 for s in seen) and set().union(*seen) == {2, 3, 5}, seen
    for k, p in enumerate(prompts):
        alone = example_scores(model, tok, lambda p=p: p, fmt, ex, batch_size=7)
        assert torch.allclose(together[k], alone, atol=1e-5), (k, (together[k] - alone).abs().max())


def test_prefixes_join_an_ensemble_each_scored_as_alone(tiny, tmp_path):
    """`train` writes prefixes by default (--method auto): an ensemble takes them beside soft prompts.
    A prefix made of a soft prompt's own keys and values is that prompt to every layer, so both score
    the rows as the soft prompt does alone."""
    from softprompt.prompts.prefix import PrefixPrompt, prefix_meta, prompt_key_values

    model, tok = tiny
    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()][:12]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cue, labels, col = LABELS["multi"]
    fmt, ex, _ = load_splits(DataConfig(data=str(data), template="Capital: {capital}\\n" + cue, labels=labels,
                                        label_col=col, eval_fraction=0), tok)
    torch.manual_seed(1)
    p = torch.randn(3, model.config.hidden_size) * 0.2
    other = torch.randn(4, model.config.hidden_size) * 0.2
    prefix = PrefixPrompt(prompt_key_values(model, p), prefix_meta(model))
    together = ensemble_scores(model, [prefix, p, other], fmt, ex)
    alone = example_scores(model, tok, lambda: p, fmt, ex, batch_size=5)
    assert together.shape[:2] == (3, len(ex))
    assert torch.allclose(together[0], alone, atol=1e-5), (together[0] - alone).abs().max()
    assert torch.allclose(together[1], alone, atol=1e-5)
    assert torch.allclose(together[2], example_scores(model, tok, lambda: other, fmt, ex, batch_size=5), atol=1e-5)


def test_vote_and_mean_logprob_on_constructed_scores():
    s = torch.tensor([
        # prompt 0                         prompt 1                        prompt 2
        [[-0.8, -0.6, -9.0], [-0.1, -1.0, -1.2], [-5.0, -4.0, -0.1]],
        [[-0.8, -0.6, -9.0], [-3.0, -0.2, -2.5], [-5.0, -4.0, -0.1]],
        [[-0.01, -5.0, -9.0], [-2.0, -2.0, -0.3], [-0.2, -4.0, -0.3]],
    ])  # [K=3, N=3, C=3]
    p = combine(s)
    assert p["single"].tolist() == [[1, 0, 2], [1, 1, 2], [0, 2, 0]]
    # Row 0: two prompts vote 1, but prompt 2's confidence makes class 0 the best mean log-prob.
    # Row 1: a three-way tie, broken by the mean log-probability (class 1). Row 2: 2 of 3 vote 2.
    assert p["vote"].tolist() == [1, 1, 2]
    assert p["mean_logprob"].tolist() == [0, 1, 2]
    r = ensemble_report(s, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    # exact, from counts (hunt 13: float32's 0.7350000143051147 in --json), with each prompt's count
    assert [(x["accuracy"], x["correct"]) for x in r["prompts"]] == [(1 / 3, 1), (2 / 3, 2), (1 / 3, 1)]
    assert r["best_single"]["prompt"] == "b"
    assert r["majority_vote_accuracy"] == pytest.approx(2 / 3) and r["mean_logprob_accuracy"] == 1.0


def test_ensemble_cli(llama_dir, countries_csv, tmp_path, capsys):
    dirs = []
    for k, P in enumerate((2, 4)):
        d = tmp_path / f"p{k}"
        save_prompt(SoftPrompt(torch.randn(P, 32) * 0.2), d, {"model": str(llama_dir)})
        dirs.append(str(d))
    data = ["--data", str(countries_csv), "--template", "Country: {country}\\nEurope:", "--labels", "no,yes",
            "--label-col", "europe"]
    assert main(["ensemble", "--model", str(llama_dir), *data, *dirs, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 194 and len(r["prompts"]) == 2 and 0 <= r["mean_logprob_accuracy"] <= 1
    assert main(["ensemble", "--model", str(llama_dir), *data, *dirs]) == 0
    assert "ensemble: majority vote" in capsys.readouterr().out
    assert main(["ensemble", "--model", str(llama_dir), *data, dirs[0]]) == 2
    assert "at least two prompt folders" in capsys.readouterr().err


@pytest.mark.slow
def test_one_batch_equals_alone_on_the_builtin_model():
    from conftest import SHARED
    from softprompt.core.config import ModelConfig
    from softprompt.base.models import load_model

    model, tok = load_model(ModelConfig(device="cpu"))
    fmt, ex, _ = load_splits(DataConfig(data=str(SHARED / "sst2" / "dev.tsv"), template="Review: {sentence}\\nSentiment:",
                                        labels="negative,positive", eval_fraction=0, limit=12), tok)
    emb = model.get_input_embeddings().weight.detach()
    prompts = [emb[torch.randint(0, 5000, (P,), generator=torch.Generator().manual_seed(P))] for P in (4, 20)]
    together = ensemble_scores(model, prompts, fmt, ex)
    for k, p in enumerate(prompts):
        alone = example_scores(model, tok, lambda p=p: p, fmt, ex)
        assert torch.allclose(together[k], alone, atol=2e-4), (together[k] - alone).abs().max()


def test_a_template_with_a_written_or_a_real_newline_is_one_template(llama_dir, countries_csv, tmp_path, capsys):
    """A flag's written "\\n" and a config file's (or Python's) newline train the same prompt; resume and
    ensemble compared the two spellings as strings and refused."""
    import softprompt
    from softprompt.prompts.prompt import load_prompt

    common = dict(model=str(llama_dir), data=str(countries_csv), labels="no,yes", label_col="europe", virtual_tokens=3,
                  max_steps=2, batch_size=4, eval_every=0, eval_untuned=False, method="prompt", warmup_steps=0)
    argv = ["train", *[x for k, v in common.items() if k != "eval_untuned"
                       for x in (f"--{k.replace('_', '-')}", str(v))], "--no-eval-untuned"]
    assert main(argv + ["--template", "Country: {country}\\nEurope:", "--out", str(tmp_path / "flag")]) == 0
    softprompt.train(**common, template="Country: {country}\nEurope:", out=str(tmp_path / "py"))
    assert torch.equal(load_prompt(tmp_path / "flag").embeds, load_prompt(tmp_path / "py").embeds)
    # the finished run resumed with the other spelling: accepted (nothing left to train)
    assert softprompt.train(**common, template="Country: {country}\nEurope:", out=str(tmp_path / "flag"),
                            resume=True)["steps"] == 2
    capsys.readouterr()
    assert main(["ensemble", "--model", str(llama_dir), "--data", str(countries_csv), "--label-col", "europe",
                 "--limit", "8", "--json", str(tmp_path / "flag"), str(tmp_path / "py")]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8


def test_label_words_spelt_with_a_written_or_a_real_newline_are_two_sets(llama_dir, countries_csv, tmp_path, capsys):
    """Only a template reads a written "\\n" as a newline; label words are read as written, so two prompts
    whose words differ so were trained on different words and are not scored as one reading."""
    dirs = []
    for k, words in enumerate((["no", "yes\\nindeed"], ["no", "yes\nindeed"])):
        d = tmp_path / f"p{k}"
        save_prompt(SoftPrompt(torch.randn(2, 32) * 0.2), d, {"model": str(llama_dir), "template": "{country}",
                                                               "labels": words, "label_col": "europe"})
        dirs.append(str(d))
    assert main(["ensemble", "--model", str(llama_dir), "--data", str(countries_csv), *dirs]) == 2
    err = capsys.readouterr().err
    assert "records labels " in err and "pass --labels to score every prompt one way" in err, err
