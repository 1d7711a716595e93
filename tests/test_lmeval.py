"""lm-evaluation-harness: the `softprompt` model's loglikelihood is softprompt's own scoring, and on a
local task (a YAML over a JSONL of SST-2 dev rows) lm_eval's accuracy is `softprompt eval`'s."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig  # noqa: E402
from softprompt.evaluation.evaluate import eval_prompt  # noqa: E402
from softprompt.evaluation.lmeval_model import SoftpromptLM  # noqa: E402
from softprompt.forward.classify import continuation_logprobs  # noqa: E402
from softprompt.prompts.prompt import init_prompt, save_prompt  # noqa: E402

from conftest import SHARED  # noqa: E402

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
    save_prompt(sp, out, {"model": "test", "chat": False})
    return sp.embeds.detach()


def _req(ctx, cont):
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


def test_loglikelihood_is_softprompts_scoring(llama_dir, tmp_path):
    from softprompt.forward.classify import next_logprobs
    from softprompt.base.models import load_model

    _prompt(*load_model(str(llama_dir)), tmp_path / "p")
    lm = SoftpromptLM(pretrained=str(llama_dir), prompt=str(tmp_path / "p"), device="cpu", batch_size=2)
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
