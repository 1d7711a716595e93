"""The method comparison on the tiny Llama: every row present with exact trainable-parameter counts,
its files written, the base untouched by prompt tuning; full fine-tuning through the same loop; the
prompt-engineering context; the CLI and the ablation script end to end."""
import importlib.util
import json

import pytest
import torch

from conftest import ROOT
from softprompt.base.models import load_model
from softprompt.cli import main
from softprompt.core.config import CompareConfig, DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.core.utils import SoftpromptError, count_params, weights_hash
from softprompt.data.formatting import load_splits
from softprompt.training.compare import compare
from softprompt.training.engineering import build_context, pick_shots, shot_text, with_context
from softprompt.training.train import train


def _cls_cfgs(model_dir, data, out, **ckw):
    m = ModelConfig(model=str(model_dir), device="cpu")
    d = DataConfig(data=str(data), template="Country: {country}\\nEurope:", labels="no,yes", label_col="europe",
                   eval_fraction=0.2, eval_limit=12, max_length=32)
    p = PromptConfig(virtual_tokens=3, init="labels")
    t = TrainConfig(lr=0.05, batch_size=4, max_steps=3, warmup_steps=1, seed=0)  # no,yes: several tokens each here
    c = CompareConfig(out=str(out), k_shot=2, ft_steps=2, ft_lr=1e-3, **ckw)
    return m, d, p, t, c


def test_compare_rows_params_files(llama_dir, countries_csv, tmp_path):
    model, tok = load_model(str(llama_dir))
    before = weights_hash(model)
    out = tmp_path / "cmp"
    r = compare(*_cls_cfgs(llama_dir, countries_csv, out), model=model, tok=tok, quiet=True)
    rows = {x["method"]: x for x in r["rows"]}
    # The default rows: prompt engineering, plain prompt tuning, train's default (a prefix), fine-tuning.
    assert list(rows) == ["untuned", "zero-shot", "k-shot", "prompt", "prefix", "full"]
    H, N = model.config.hidden_size, count_params(model)
    assert rows["prompt"]["trainable_params"] == 3 * H
    assert rows["prefix"]["base_weights_unchanged"] and rows["prefix"]["trainable_params"] > 3 * H
    assert rows["full"]["trainable_params"] == N == r["base_params"]
    assert all(rows[m]["trainable_params"] == 0 for m in ("untuned", "zero-shot", "k-shot"))
    # Prompt tuning left the base bit-identical; full fine-tuning worked on a copy.
    assert rows["prompt"]["base_weights_unchanged"] and weights_hash(model) == before
    for m, x in rows.items():
        assert x["eval"]["n"] == 12 and 0 <= x["eval"]["accuracy"] <= 1 and x["ms_per_example"] > 0, m
    assert rows["prompt"]["steps"] == 3 and rows["full"]["steps"] == 2 and rows["full"]["lr"] == 1e-3
    # Artifacts: the context text, the prompt tensor (P*H fp32 + header), the whole model.
    assert (out / "k-shot" / "context.txt").read_text().count("\n\n") == 3  # instruction + 2 shots
    assert rows["zero-shot"]["artifact_bytes"] == len((out / "zero-shot" / "context.txt").read_bytes())
    assert 3 * H * 4 < rows["prompt"]["artifact_bytes"] < 3 * H * 4 + 1024
    assert rows["full"]["artifact_bytes"] > N * 4
    assert (out / "full" / "model" / "model.safetensors").is_file() and (out / "prompt" / "prompt.safetensors").is_file()
    for f in ("compare.json", "compare.md", "compare.png"):
        assert (out / f).stat().st_size > 100, f
    md = (out / "compare.md").read_text()
    assert md.count("\n|") == 2 + 6 and "prompt tuning (P=3)" in md and "full fine-tuning" in md
    assert json.loads((out / "compare.json").read_text())["rows"][3]["method"] == "prompt"


def test_full_finetuning_uses_the_same_loop(llama_dir, countries_csv, tmp_path):
    model, tok = load_model(str(llama_dir))
    m, d, p, t, _ = _cls_cfgs(llama_dir, countries_csv, tmp_path)
    t.out, t.method, t.lr, t.max_steps, t.eval_every, t.save_every = str(tmp_path / "ft"), "full", 1e-3, 3, 0, 0
    s = train(m, d, p, t, model=model, tok=tok, quiet=True)
    assert s["method"] == "full" and s["trainable_params"] == count_params(model)
    assert not s["base_weights_unchanged"]  # every weight learned
    assert not any(q.requires_grad for q in model.parameters())  # handed back frozen
    saved, _ = load_model(str(tmp_path / "ft" / "model"))
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
    t.resume = True
    with pytest.raises(SoftpromptError, match="cannot --resume"):
        train(m, d, p, t, model=model, tok=tok, quiet=True)


def test_prompt_engineering_context(tiny, countries_csv):
    model, tok = tiny
    d = DataConfig(data=str(countries_csv), template="Country: {country}\\nEurope:", labels="no,yes",
                   label_col="europe", eval_fraction=0.2)
    fmt, train_ex, eval_ex = load_splits(d, tok)
    shots = pick_shots(fmt, train_ex, 4, seed=0)
    assert sorted(e.label for e in shots) == [0, 0, 1, 1]  # label-balanced
    assert shot_text(fmt, tok, shots[0]).endswith(" no" if shots[0].label == 0 else " yes")
    ctx = build_context("Is the country in Europe?", [shot_text(fmt, tok, e) for e in shots])
    ex = with_context(fmt, eval_ex[0], ctx)
    # Same supervised tokens and label as without the context; the input starts with the context.
    assert ex.ids[ex.loss_start:] == eval_ex[0].ids[eval_ex[0].loss_start:] and ex.label == eval_ex[0].label
    assert tok.decode(ex.ids[:ex.loss_start]).startswith("Is the country in Europe?\n\nCountry: ")


def test_compare_cli_generation_data(llama_dir, countries_csv, tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(["compare", "--model", str(llama_dir), "--device", "cpu", "--data", str(countries_csv),
               "--template", "Country: {country}\\nCapital:", "--target", " {capital}", "--eval-limit", "8",
               "--max-length", "32", "--virtual-tokens", "2", "--init", "vocab", "--max-steps", "2",
               "--batch-size", "4", "--methods", "zero-shot,k-shot,prompt", "--k-shot", "1", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "held-out loss" in table and "perplexity" in table and "1-shot" in table
    # each row's work is said before it starts (the scoring of the k-shot row took minutes without a word)
    assert "[compare] prompt engineering, 1-shot: scoring 8 held-out rows" in table
    assert "[compare] prompt tuning (P=2): training, then scoring 8 held-out rows" in table
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [x["method"] for x in rows] == ["zero-shot", "k-shot", "prompt"]
    assert all(x["eval"]["tokens"] == rows[0]["eval"]["tokens"] for x in rows)  # same scored tokens
    # The prompt's run replays bit for bit: its record names the dtype compare trained in, not auto's
    # (bf16 for a soft prompt on a CPU with native bf16).
    record = out / "prompt" / "run_config.json"
    assert json.loads(record.read_text())["ModelConfig"]["dtype"] == "float32"
    assert main(["train", "--config", str(record), "--out", str(tmp_path / "again")]) == 0
    again, first = (p / "prompt.safetensors" for p in (tmp_path / "again", out / "prompt"))
    assert again.read_bytes() == first.read_bytes()
    # So do the prompt's own record and the comparison's (their sections sit under `config`): compare
    # --config compare.json read no section, loaded the model and then said "no data given".
    assert main(["train", "--config", str(out / "prompt" / "prompt_config.json"), "--out", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "prompt.safetensors").read_bytes() == first.read_bytes()
    assert main(["compare", "--config", str(out / "compare.json"), "--out", str(tmp_path / "cmp2")]) == 0
    replayed = json.loads((tmp_path / "cmp2" / "compare.json").read_text())["rows"]
    assert [x["eval"]["loss"] for x in replayed] == [x["eval"]["loss"] for x in rows]
    assert main(["compare", "--model", str(llama_dir), "--data", str(countries_csv), "--text-col", "country",
                 "--methods", "prompt,nope", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown --methods" in capsys.readouterr().err
    # --init-from: the source's length is the rows' (their names and the record said --virtual-tokens'
    # default), and a source that cannot start a method is refused before anything is scored or written.
    args = ["compare", "--model", str(llama_dir), "--device", "cpu", "--data", str(countries_csv), "--template",
            "Country: {country}\\nCapital:", "--target", " {capital}", "--eval-limit", "8", "--max-length", "32",
            "--max-steps", "1", "--batch-size", "4", "--methods", "untuned,prompt"]
    assert main([*args, "--init-from", str(out / "prompt"), "--out", str(tmp_path / "from")]) == 0
    result = json.loads((tmp_path / "from" / "compare.json").read_text())
    assert result["rows"][1]["name"] == "prompt tuning (P=2)"
    assert result["config"]["PromptConfig"]["virtual_tokens"] == 2
    # Each row takes --init-from and --forward-path where its method takes them: full fine-tuning has no
    # prompt to start, and a prefix no input embeddings to prepend (its path is its own, kv).
    both = [*args[:-1], "prompt,prefix,full", "--ft-steps", "1", "--forward-path", "concat"]
    assert main([*both, "--init-from", str(out / "prompt"), "--out", str(tmp_path / "all")]) == 0
    rows = json.loads((tmp_path / "all" / "compare.json").read_text())["rows"]
    source = str(out / "prompt")
    assert [(x["method"], x.get("init"), x.get("init_from")) for x in rows] == [
        ("prompt", "file", source), ("prefix", "file", source), ("full", None, None)]
    taken = {m: json.loads((tmp_path / "all" / m / "run_config.json").read_text())["forward_path_taken"]
             for m in ("prompt", "prefix")}
    assert taken == {"prompt": "concat", "prefix": "kv"}
    capsys.readouterr()
    assert main([*args, "--init-from", str(out / "prompt"), "--out", str(out)]) == 2  # its prompt row replaced it
    assert f"--out {out} holds the source {out / 'prompt'}" in capsys.readouterr().err
    assert main([*args, "--init-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "none")]) == 2
    assert "--init-from" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main([*args[:-1], "untuned,full", "--init-from", str(out / "prompt"), "--out", str(tmp_path / "none")]) == 2
    assert "--methods untuned,full trains none" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_an_interrupted_comparison_leaves_no_summary_of_the_one_before(llama_dir, countries_csv, tmp_path,
                                                                        monkeypatch, capsys):
    """A comparison run again into its --out and stopped while a row trained left the old compare.json
    and compare.md naming prompt files that the new run had already deleted (hunt 8)."""
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(llama_dir), "--device", "cpu", "--data", str(countries_csv), "--template",
            "Country: {country}\\nCapital:", "--target", " {capital}", "--eval-limit", "4", "--max-length", "32",
            "--max-steps", "1", "--batch-size", "4", "--methods", "untuned,prompt", "--out", str(out)]
    assert main(argv) == 0 and (out / "compare.json").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("softprompt.training.compare.trained_row", interrupted)
    assert main(argv) == 130
    assert not any((out / name).exists() for name in ("compare.json", "compare.md", "compare.png"))


@pytest.mark.parametrize("cmd", ["compare", "ensemble", "inspect"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: softprompt " + cmd in capsys.readouterr().out


def test_ablation_script(llama_dir, countries_csv, tmp_path):
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "experiments" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "abl"
    res = mod.main(["--model", str(llama_dir), "--data", str(countries_csv), "--template",
                    "Country: {country}\\nEurope:", "--labels", "no,yes", "--label-col", "europe",
                    "--eval-data", "", "--eval-fraction", "0.2", "--eval-limit", "10", "--max-length", "32", "--lengths", "1,2",
                    "--inits", "random,labels", "--ensemble-length", "2", "--max-steps", "2", "--batch-size", "4", "--loss", "lm",
                    "--out", str(out)])
    assert [(r["virtual_tokens"], r["init"]) for r in res["runs"]] == [(1, "labels"), (2, "labels"), (2, "random")]
    assert res["ensemble"]["n"] == 10 and len(res["ensemble"]["prompts"]) == 2
    for f in ("ablations.md", "ablations.json", "ablations.png"):
        assert (out / f).stat().st_size > 100, f


def test_compare_prefix_ptuning_residual_rows(llama_dir, countries_csv, tmp_path):
    """The other prompt methods as rows beside prompt tuning: each trained at its own default rate,
    its trainable parameters counted from the architecture, its bytes on disk its saved file's size."""
    from softprompt.training.methods import METHODS

    model, tok = load_model(str(llama_dir))
    before = weights_hash(model)
    out = tmp_path / "cmp"
    cfgs = _cls_cfgs(llama_dir, countries_csv, out, methods="prompt,prefix,ptuning,residual")
    r = compare(*cfgs, model=model, tok=tok, quiet=True)
    rows = {x["method"]: x for x in r["rows"]}
    assert list(rows) == ["prompt", "prefix", "ptuning", "residual"]
    c = model.config
    L, kv_heads, d, H, P = c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.hidden_size, 3
    assert rows["prefix"]["trainable_params"] == L * 2 * kv_heads * d * P
    # PEFT's MLP encoder at width H (Linear H->H, H->H, H->H) and its [P, H] input embedding.
    assert rows["ptuning"]["trainable_params"] == P * H + 3 * (H * H + H)
    m = H // 2  # residual's bottleneck: Linear H->m, m->H, LayerNorm(H), and the [P, H] embedding
    assert rows["residual"]["trainable_params"] == P * H + (H * m + m) + (m * H + H) + 2 * H
    # "no,yes" are several tokens each here: the lm loss, whose default rate each method knows.
    for name in ("prefix", "ptuning", "residual"):
        assert rows[name]["lr"] == METHODS[name].default_lr("lm"), name
    assert rows["prompt"]["lr"] == 0.05  # --lr is prompt tuning's
    assert len({rows[n]["lr"] for n in rows}) == 3  # 0.05, 3e-2 (prefix, residual), 1e-3 (ptuning)
    # A prefix does not start from label words: it took its own default start (a text's keys and values).
    assert (rows["prefix"]["init"], rows["ptuning"]["init"], rows["residual"]["init"]) == ("auto", "labels", "labels")
    for name, x in rows.items():
        saved = out / name / "prompt.safetensors"
        assert x["artifact"] == str(saved) and x["artifact_bytes"] == saved.stat().st_size, name
        assert x["steps"] == 3 and x["train_seconds"] > 0 and x["base_weights_unchanged"], name
        assert x["eval"]["n"] == 12 and 0 <= x["eval"]["accuracy"] <= 1, name
    # The prefix file holds L*2*kv_heads*P*d fp32 values; ptuning and residual save a [P, H] prompt.
    assert L * 2 * kv_heads * d * P * 4 < rows["prefix"]["artifact_bytes"] < L * 2 * kv_heads * d * P * 4 + 1024
    assert rows["ptuning"]["artifact_bytes"] == rows["residual"]["artifact_bytes"] == rows["prompt"]["artifact_bytes"]
    assert weights_hash(model) == before
    md = (out / "compare.md").read_text()
    assert md.count("\n|") == 2 + 4
    for label in ("prefix tuning (P=3)", "P-tuning (P=3)", "residual prompt tuning (P=3)"):
        assert label in md
    assert [x["method"] for x in json.loads((out / "compare.json").read_text())["rows"]] == list(rows)
    assert (out / "compare.png").stat().st_size > 100


def test_compare_does_not_offer_a_task_mixture(capsys):
    """compare scores every method on one split of one task: --help does not list --mix, and the
    flag is refused as unknown, before anything loads."""
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--data" in (text := capsys.readouterr().out) and "--mix" not in text
    assert main(["compare", "--mix", '{"data": "x.csv"}']) == 2
    assert "unrecognized arguments: --mix" in capsys.readouterr().err


def test_compare_help_says_the_dtype_its_rows_run_in():
    """Hunt 13: compare's --dtype help was train's ("auto: bfloat16 ... for training a soft prompt or a
    prefix on CPUs with native bf16"), but one float32 base serves every row on a CPU."""
    from softprompt.cli import build_parsers

    _, parsers = build_parsers(only="compare")
    text = " ".join(parsers["compare"].format_help().split())
    assert "one for every row: auto (bfloat16 on GPUs that support it, float32 elsewhere" in text
    assert "on CPUs with native bf16 matmuls" not in text


def _chat_rows(n: int) -> list[dict]:
    capitals = [("France", "Paris"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Spain", "Madrid"), ("Italy", "Rome")]
    def turn(role, content):
        return {"role": role, "content": content}

    return [{"messages": [turn("system", "Answer like a pirate."), turn("user", f"Capital of {c}?"),
                          turn("assistant", f"Arr, {a}."), turn("user", "And its country?"),
                          turn("assistant", f"Arr, {c}.")]}
            for c, a in (capitals * n)[:n]]


def test_prompt_engineering_on_chat_rows_scores_their_own_answers(llama_dir, tmp_path):
    """Hunt 15: on chat data the zero- and k-shot rows scored the second user turn and the chat markup
    (48 tokens where the other rows scored 26), dropped the row's system message for the template's
    default, and showed k-shot questions without their answers."""
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(20)))
    m, _, p, t, c = _cls_cfgs(llama_dir, f, tmp_path / "cmp", methods="untuned,zero-shot,k-shot")
    d = DataConfig(data=str(f), eval_fraction=0.25, max_length=93)  # some rows lose their 2nd answer, some keep part
    result = compare(m, d, p, t, c, quiet=True)
    rows = {r["method"]: r for r in result["rows"]}
    assert result["task"] == "chat"
    assert rows["zero-shot"]["eval"]["tokens"] == rows["k-shot"]["eval"]["tokens"] == rows["untuned"]["eval"]["tokens"]
    turns = [json.loads(line) for line in (tmp_path / "cmp" / "k-shot" / "context.jsonl").read_text().splitlines()]
    assert turns[0]["role"] == "system" and [t["role"] for t in turns[1:]] == ["user", "assistant"] * 4  # 2 shots
    assert all(t["content"].startswith("Arr, ") for t in turns[2::2])  # the shots' answers are shown

    # One row: the instruction joins the row's own system message, and the scored ids are the row's.
    from softprompt.training.engineering import chat_context, chat_with_context

    model, tok = load_model(str(llama_dir))
    fmt, train_ex, eval_ex = load_splits(d, tok)
    for row in eval_ex:
        ex = chat_with_context(fmt, row, chat_context("Be brief.", train_ex[:2]))
        assert [ex.ids[a:b] for a, b in ex.spans] == [row.ids[a:b] for a, b in row.spans]
        assert ex.messages[0] == {"role": "system", "content": "Be brief.\n\nAnswer like a pirate."}
    assert any(len(r.spans) == 1 for r in eval_ex) and any(len(r.spans) == 2 for r in eval_ex)
