"""lm-evaluation-harness: the `softprompt` model's loglikelihood is softprompt's own scoring, and on a
local task (a YAML over a JSONL of SST-2 dev rows) lm_eval's accuracy is `softprompt eval`'s."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig  # noqa: E402
from softprompt.core.utils import SoftpromptError  # noqa: E402
from softprompt.evaluation.evaluate import eval_prompt  # noqa: E402
from softprompt.evaluation.lmeval_model import SoftpromptLM  # noqa: E402
from softprompt.forward.classify import continuation_logprobs  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, init_prompt, save_prompt  # noqa: E402

from conftest import EXAMPLES, SHARED  # noqa: E402

TASK = """task: sst2_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Review: {{{{sentence}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
"""


def _prompt(model, tok, out, labels=("negative", "positive")):
    sp = init_prompt(model, tok, PromptConfig(virtual_tokens=4, init="labels"), list(labels), seed=1)
    save_prompt(sp, out, {"model": model.softprompt_model, "chat": False})  # the name load_model was given
    return sp.embeds.detach()


def _req(ctx, cont):
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


def test_loglikelihood_is_softprompts_scoring(llama_dir, tmp_path):
    from softprompt.forward.classify import next_logprobs
    from softprompt.base.models import load_model

    _prompt(*load_model(str(llama_dir)), tmp_path / "p")
    # No pretrained=: the base the prompt was trained on (the built-in's width would refuse it)
    lm = SoftpromptLM(prompt=str(tmp_path / "p"), device="cpu", batch_size=2)
    assert lm.model.softprompt_model == str(llama_dir)
    pairs = [("Country: France\nFacts:", " capital=Paris"), ("Review: a dull film\nSentiment:", " negative"),
             ("Act as a teacher.", "\nPrompt: explain things"), ("Country: Peru", " and more")]
    got = lm.loglikelihood([_req(c, t) for c, t in pairs])
    rows = [(lm.prompt, lm.tok(c).input_ids) for c, _ in pairs]
    conts = [lm.tok(t, add_special_tokens=False).input_ids for _, t in pairs]
    want = continuation_logprobs(lm.model, rows, conts, lm.tok.pad_token_id)
    assert [g for g, _ in got] == pytest.approx(want.tolist(), abs=1e-5)
    # A continuation made of the greedy tokens is greedy; the same with its last token changed is not.
    ctx, greedy = lm.tok(pairs[0][0]).input_ids, []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(next_logprobs(lm.model, [(lm.prompt, ctx + greedy)], lm.tok.pad_token_id).argmax()))
    other = greedy[:-1] + [(greedy[-1] + 1) % lm.model.config.vocab_size]
    flags = [lm.score([(ctx, greedy), (ctx, other)])[i][1] for i in (0, 1)]
    assert flags == [True, False]


@pytest.mark.slow
def test_lm_eval_accuracy_equals_softprompt_eval_on_sst2_rows(tmp_path):
    """The built-in model with a (label-initialised) prompt: lm_eval's acc on 48 SST-2 dev rows is
    `softprompt eval`'s accuracy on the same rows, and every row's label scores agree."""
    from softprompt.evaluation.lmeval import evaluate_tasks
    from softprompt.base.models import load_model

    rows = [dict(zip(("sentence", "label"), l.split("\t"))) for l in
            (SHARED / "sst2" / "dev.tsv").read_text().splitlines()[1:49]]
    data = tmp_path / "sst2_dev.jsonl"
    data.write_text("".join(json.dumps({"sentence": r["sentence"], "label": int(r["label"])}) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sst2_local.yaml").write_text(TASK.format(data=data))
    model, tok = load_model(ModelConfig(device="cpu"))
    _prompt(model, tok, tmp_path / "p")
    ours = eval_prompt(ModelConfig(device="cpu"), DataConfig(data=str(data), template="Review: {sentence}\\nSentiment:",
                                                            labels="negative,positive"), str(tmp_path / "p"),
                       model=model, tok=tok)
    res = evaluate_tasks(f"pretrained=smollm2-135m-instruct,prompt={tmp_path / 'p'},device=cpu", ["sst2_local"],
                         str(tasks), batch_size=16)
    right = lambda acc: round(acc * 48, 3)  # rows classified right (softprompt's mean is a float32's)
    print(f"lm_eval acc {res['results']['sst2_local']['acc,none']:.4f}, softprompt eval {ours['accuracy']:.4f} on 48 rows")
    assert right(res["results"]["sst2_local"]["acc,none"]) == right(ours["accuracy"])
    assert ours["n"] == 48 and 14 < right(ours["accuracy"]) < 48


# ---------------------------------------------------------------- a prefix (per-layer keys and values)

PAIRS = [("Country: France\nFacts:", " capital=Paris"), ("Review: a dull film\nSentiment:", " negative"),
         ("Act as a teacher.", "\nPrompt: explain things"), ("Country: Peru", " and more")]


def _prefix(model, tok, out):
    """A random prefix saved under `out`, 30x the model's own key/value spread (at its own scale a prefix
    barely moves the tiny models' near-uniform next-token distributions)."""
    from types import SimpleNamespace

    from softprompt.prompts.prefix import PrefixPrompt, init_prefix

    pre = init_prefix(model, tok, SimpleNamespace(virtual_tokens=5, init="random", init_text="Act."), seed=5)
    save_prompt(PrefixPrompt(pre.key_values().detach() * 30, pre.meta), out, {"model": "tiny", "chat": False})


def _by_hand(model, prefix, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The model's own forward over ctx + cont with the prefix's keys and values as past_key_values
    (None: no prefix): the continuation's summed log-probability and whether it is the greedy one."""
    from transformers import DynamicCache

    ids = torch.tensor([ctx + cont])
    P = prefix.length if prefix is not None else 0
    cache = (DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in prefix.past_key_values(model)])
             if prefix is not None else None)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=torch.ones(1, P + ids.shape[1], dtype=torch.long),
                  cache=cache, use_cache=prefix is not None).logits[0].float()
    lp = torch.log_softmax(z, -1)[len(ctx) - 1:-1]  # the states that predict the continuation's tokens
    y = torch.tensor(cont)
    return float(lp.gather(1, y[:, None]).sum()), bool((lp.argmax(-1) == y).all())


def test_prefix_loglikelihood_is_the_models_own_with_the_prefix_as_cache(model_dir, tmp_path):
    """Llama (grouped-query attention: 2 kv heads for 4) and BLOOM (ALiBi): the wrapper's loglikelihood
    with a prefix is what the model's own forward gives with the prefix's keys and values as its cache,
    within 1e-5 in fp32; an empty context scores its first token after BOS (a prefix predicts no token)."""
    from softprompt.base.models import load_model
    from softprompt.prompts.prompt import load_prompt

    _prefix(*load_model(str(model_dir)), tmp_path / "pre")
    lm = SoftpromptLM(pretrained=str(model_dir), prompt=str(tmp_path / "pre"), device="cpu", batch_size=2)
    prefix = load_prompt(tmp_path / "pre", lm.model)
    pairs = PAIRS + [("", " capital=Paris")]
    got = lm.loglikelihood([_req(c, t) for c, t in pairs])
    start = [lm.tok.bos_token_id if lm.tok.bos_token_id is not None else lm.tok.eos_token_id]
    ids = [(lm.tok(c).input_ids or start, lm.tok(t, add_special_tokens=False).input_ids) for c, t in pairs]
    want = [_by_hand(lm.model, prefix, c, t) for c, t in ids]
    assert [g for g, _ in got] == pytest.approx([w for w, _ in want], abs=1e-5)
    assert [g for _, g in got] == [w for _, w in want]
    # The prefix is in play: without it the model scores every pair otherwise.
    bare = [_by_hand(lm.model, None, c, t)[0] for c, t in ids]
    assert all(abs(g - b) > 1e-3 for (g, _), b in zip(got, bare))


def test_a_soft_prompt_and_its_prefix_score_and_generate_the_same(model_dir, tmp_path):
    """A soft prompt converted to a prefix (its keys and values through the frozen model, --init-from's
    rule) gives the soft prompt's loglikelihoods within 1e-5 wherever the continuation does not start
    the text (the soft prompt's last state predicts a first token; a prefix has none), its rolling
    loglikelihoods (each window starts after BOS), and its greedy generate_until text."""
    from softprompt.base.models import load_model
    from softprompt.prompts.prefix import PrefixPrompt, prefix_meta, prompt_key_values

    model, tok = load_model(str(model_dir))
    gen = torch.Generator().manual_seed(7)
    soft = SoftPrompt(torch.randn(4, model.config.hidden_size, generator=gen) * 0.5)
    meta = {"model": str(model_dir), "chat": False}
    save_prompt(soft, tmp_path / "soft", meta)
    save_prompt(PrefixPrompt(prompt_key_values(model, soft.embeds), prefix_meta(model)), tmp_path / "pre", meta)
    def both(max_length):
        return [SoftpromptLM(pretrained=str(model_dir), prompt=str(tmp_path / p), device="cpu", batch_size=2,
                             max_length=max_length) for p in ("soft", "pre")]

    lms = both(None)  # the model's own length: each pair's continuation fits whole
    assert lms[1].prompt.kind == "prefix"
    lls = [[s for s, _ in lm.loglikelihood([_req(c, t) for c, t in PAIRS])] for lm in lms]
    assert lls[1] == pytest.approx(lls[0], abs=1e-5)
    lms = both(8)  # 4 positions of text: several windows of each text rolled, and a context's end kept
    texts = ["Country: France\nFacts: capital=Paris; continent=Europe", "Act as a teacher."]
    rolled = [lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0)
                                        for t in texts]) for lm in lms]
    assert rolled[1] == pytest.approx(rolled[0], abs=1e-5)
    asks = [Instance(request_type="generate_until", doc={}, arguments=(c, {"until": [], "max_gen_toks": 6}), idx=0)
            for c, _ in PAIRS[:2]]
    made = [lm.generate_until(asks) for lm in lms]
    assert made[1] == made[0] and all(made[0])
    # The prompt is in play: the untuned model scores the pairs otherwise (on the near-uniform tiny
    # Llama by a few hundredths only).
    bare = SoftpromptLM(pretrained=str(model_dir), device="cpu").loglikelihood([_req(c, t) for c, t in PAIRS])
    assert max(abs(a - b) for a, (b, _) in zip(lls[0], bare)) > 1e-2


def test_the_prompt_s_positions_come_out_of_max_length(llama_dir, tmp_path, monkeypatch):
    """A window holds the prompt's P positions and the text: a scored row (context tail + whole
    continuation, whose last token is only a target) is at most max_length - P + 1 tokens, and the
    rolling windows cover the text once, in order, each within that budget."""
    model = SoftpromptLM(pretrained=str(llama_dir), device="cpu").model
    save_prompt(SoftPrompt(torch.zeros(4, model.config.hidden_size)), tmp_path / "p", {"model": str(llama_dir)})
    lm = SoftpromptLM(pretrained=str(llama_dir), prompt=str(tmp_path / "p"), device="cpu", max_length=10)
    row = lm.window(list(range(100, 120)), [1, 2, 3])
    assert row.ids == [117, 118, 119, 1, 2, 3] and row.loss_start == 3  # 10 - 4 = 6 positions of text
    seen = []
    lm.score = lambda pairs: (seen.extend(pairs), [(0.0, True)] * len(pairs))[1]
    text = "Country: France\nFacts: capital=Paris; continent=Europe; language=French; currency=euro"
    lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)])
    assert [tok for _, cont in seen for tok in cont] == lm.continuation_ids(text) and len(seen) > 2
    assert all(len(c) + len(t) <= 10 - 4 + 1 and c for c, t in seen)
    # generate_until keeps the context's end: the prompt, the context and the new tokens fit max_length
    fed = []
    monkeypatch.setattr("softprompt.evaluation.lmeval_model.generate_batch",
                        lambda model, tok, rows, cfg, kv: (fed.extend(rows), [[1]] * len(rows))[1])
    lm.generate_until([Instance(request_type="generate_until", doc={}, arguments=(text, {"max_gen_toks": 2}), idx=0)])
    assert fed[0][1] == lm.context_ids(text)[-(10 - 4 - 2):]
    with pytest.raises(SoftpromptError, match="max_length=4 leaves no room for text after the prompt's 4 virtual"):
        SoftpromptLM(pretrained=str(llama_dir), prompt=str(tmp_path / "p"), device="cpu", max_length=4)


COUNTRIES_TASK = """task: countries_europe
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Country: {{{{country}}}}\\nEurope:"
doc_to_choice: ["no", "yes"]
doc_to_target: europe
metric_list:
  - metric: acc
"""


def test_local_tasks_are_indexed_without_lm_eval_s_own():
    """Tasks all found in --include_path as plain tasks are read from there alone; any other name (a
    built-in task, or a group whose members may be built in) indexes lm_eval's own tasks too."""
    from softprompt.evaluation.lmeval import task_manager

    made = []

    class Manager:
        def __init__(self, include_path=None, include_defaults=True):
            made.append(include_defaults)
            self.all_subtasks = ["mine", "other"] + (["hellaswag"] if include_defaults else [])

    assert task_manager(Manager, ["mine", "other"], "tasks").all_subtasks == ["mine", "other"] and made == [False]
    made.clear()
    assert "hellaswag" in task_manager(Manager, ["mine", "hellaswag"], "tasks").all_subtasks and made == [False, True]
    made.clear()
    task_manager(Manager, ["hellaswag"], None)
    assert made == [True]


def test_lm_eval_command_on_a_prefix_train_wrote(llama_dir, tmp_path, capsys):
    """The journey: `train --method prefix` (two steps) on the tiny Llama, then `lm-eval` on its folder
    with a local multiple-choice task: lm_eval's acc is `softprompt eval`'s accuracy on the same rows."""
    from softprompt.cli import main
    from softprompt.core.config import ModelConfig

    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()][:24]
    data = tmp_path / "countries.jsonl"
    data.write_text("".join(json.dumps({"country": r["country"], "europe": int(r["continent"] == "Europe")}) + "\n"
                            for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "countries_europe.yaml").write_text(COUNTRIES_TASK.format(data=data))
    pre = tmp_path / "pre"
    assert main(["train", "--model", str(llama_dir), "--method", "prefix", "--data", str(data), "--template",
                 "Country: {country}\\nEurope:", "--label-col", "europe", "--labels", "no,yes", "--max-steps", "2",
                 "--warmup-steps", "0", "--batch-size", "4", "--virtual-tokens", "3", "--eval-fraction", "0",
                 "--no-eval-untuned", "--out", str(pre)]) == 0
    assert json.loads((pre / "prompt_config.json").read_text())["kind"] == "prefix"
    capsys.readouterr()
    assert main(["lm-eval", "--model_args", f"pretrained={llama_dir},prompt={pre},device=cpu", "--tasks",
                 "countries_europe", "--include_path", str(tmp_path / "tasks"), "--batch_size", "8",
                 "--output_path", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "countries_europe" in table and "acc" in table
    acc = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["countries_europe"]
    ours = eval_prompt(ModelConfig(model=str(llama_dir), device="cpu"), DataConfig(data=str(data)), str(pre))
    print(f"lm_eval acc {acc['acc,none']:.4f}, softprompt eval {ours['accuracy']:.4f} on 24 rows")
    assert ours["n"] == 24 and round(acc["acc,none"] * 24, 3) == round(ours["accuracy"] * 24, 3)
    # The untuned model, as the model's docstring allows (lm_eval reads `none` as Python's None), and
    # model_args it cannot read refused in one line.
    assert main(["lm-eval", "--model_args", f"pretrained={llama_dir},prompt=none,device=cpu", "--tasks",
                 "countries_europe", "--include_path", str(tmp_path / "tasks"), "--limit", "4"]) == 0
    for bad, words in (("chat=maybe", "chat=maybe: expected true or false"),
                       ("max_length=abc", "max_length=abc: expected a whole number"),
                       ("promt=x", "unknown key(s) promt"),
                       ("max_length=2", "max_length=2 leaves no room for text after the prompt's 3 virtual tokens")):
        capsys.readouterr()
        assert main(["lm-eval", "--model_args", f"pretrained={llama_dir},prompt={pre},{bad}", "--tasks",
                     "countries_europe", "--include_path", str(tmp_path / "tasks")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1] and not any(l.startswith("Traceback") for l in err), err


def test_the_window_is_the_model_s_length_and_cannot_pass_it(tok_dir, tmp_path):
    """GPT-2 learns a table of its positions: a text longer than it scores in windows of the model's
    own length by default (2048 indexed past a 32-position table: a torch IndexError), and a larger
    max_length is refused in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from families import tiny_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok), tok.pad_token_id, tok.eos_token_id,
                                                 n_positions=32)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    lm = SoftpromptLM(pretrained=str(gpt2), device="cpu")
    assert lm.max_length == 32
    text = "Country: France\nFacts: capital=Paris; continent=Europe; language=French. " * 6
    assert len(lm.continuation_ids(text)) > 64
    rolled = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,),
                                                idx=0)])
    assert len(rolled) == 1 and rolled[0] < 0
    assert lm.loglikelihood([_req(text, " Paris")])[0][0] < 0  # the context's end that fits
    # a continuation itself longer than the window cannot be scored whole: refused (it was an IndexError)
    with pytest.raises(SoftpromptError, match=r"a continuation of \d+ tokens does not fit the 32 positions that "
                                              "max_length=32 leaves for text"):
        lm.loglikelihood([_req("Country:", text)])
    with pytest.raises(SoftpromptError, match="max_length=64 exceeds the model's 32 positions: give at most 32"):
        SoftpromptLM(pretrained=str(gpt2), device="cpu", max_length=64)
    assert SoftpromptLM(pretrained=str(gpt2), device="cpu", max_length="16").max_length == 16


def test_a_missing_base_names_model_args_and_lm_eval_s_own_model_flag_is_not_taken(llama_dir, tmp_path, capsys):
    from softprompt.cli import main

    save_prompt(SoftPrompt(torch.zeros(2, 32)), tmp_path / "p", {"model": str(tmp_path / "moved")})
    with pytest.raises(SoftpromptError, match="not on this machine: name its base with --model_args pretrained="):
        SoftpromptLM(prompt=str(tmp_path / "p"), device="cpu")
    # lm_eval's --model is another flag: not an abbreviation of --model_args here
    assert main(["lm-eval", "--model", "hf", "--model_args", f"pretrained={llama_dir}", "--tasks", "t"]) == 2
    assert "unrecognized arguments: --model hf" in capsys.readouterr().err


def test_chat_true_beside_apply_chat_template_is_refused(llama_dir, capsys):
    """Hunt 15: `--model_args chat=true --apply_chat_template` put lm_eval's rendered chat through the
    template again, inside a second user turn (exact match 0.5 -> 0), without a word."""
    from softprompt.cli import main

    args = ["lm-eval", "--model_args", f"pretrained={llama_dir},chat=True", "--tasks", "t", "--apply_chat_template"]
    assert main(args) == 2
    assert "--model_args chat=true would wrap that rendering again" in capsys.readouterr().err
