"""Chat data: a `messages` column trains through the tokenizer's chat template with the loss on the
assistant turns only; the mask is checked against the template's own rendering, multi-turn, and
through the model against HF's loss with the same labels."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from softprompt.core.config import DataConfig
from softprompt.core.utils import SoftpromptError
from softprompt.data.batching import collate, pad_id
from softprompt.data.chat import chat_example
from softprompt.data.formatting import load_splits
from softprompt.evaluation.evaluate import eval_loss

# ChatML as SmolLM2 writes it, default system prompt included: a template that adds text of its own.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TALK = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Peru?"}, {"role": "assistant", "content": "Lima, on the coast."}]


@pytest.fixture(params=["plain", "chatml"])
def tok(request, tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    if request.param == "chatml":
        t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        t.chat_template = CHATML
    return t


def test_assistant_mask_is_the_assistant_turns_of_the_rendering(tok):
    ex, cut = chat_example(tok, TALK, 10_000, "row 1")
    rendering = tok.apply_chat_template(TALK, tokenize=False)
    assert not cut and tok.decode(ex.ids) == rendering  # every token, in order
    supervised = [tok.decode(ex.ids[a:b]) for a, b in ex.spans]
    end = "<|im_end|>\n" if "im_end" in rendering else "\n"  # each answer with its end-of-turn marker
    assert supervised == ["Paris." + end, "Lima, on the coast." + end]
    # Everything else, the default system prompt and both user turns, is context only.
    b = collate([ex], pad_id(tok))
    context = tok.decode([t for t, y in zip(b.input_ids[0].tolist(), b.targets[0].tolist()) if y == -100])
    assert "Capital of France?" in context and "And of Peru?" in context and "Paris" not in context
    assert [t for t in b.targets[0].tolist() if t != -100] == [t for a, e in ex.spans for t in ex.ids[a:e]]


def test_truncation_keeps_whole_tokens_and_drops_rows_with_no_answer_left(tok):
    full, _ = chat_example(tok, TALK, 10_000, "row 1")
    a, b = full.spans[1]
    ex, cut = chat_example(tok, TALK, a + 2, "row 1")
    assert cut and ex.ids == full.ids[:a + 2] and ex.spans == (full.spans[0], (a, a + 2))
    none, cut = chat_example(tok, TALK, full.spans[0][0], "row 1")
    assert none is None and cut


@pytest.mark.parametrize("messages,msg", [
    ([], "expected a non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "turn 1: expected"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "turn 1: expected"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "assistant", "content": "x"}], "the first turn is the assistant's"),  # hunt 15: a traceback
])
def test_bad_messages_name_the_row_and_turn(tok_dir, messages, msg):
    with pytest.raises(SoftpromptError, match=msg):
        chat_example(AutoTokenizer.from_pretrained(tok_dir), messages, 100, "f.jsonl row 3")


def test_a_content_of_text_parts_trains_as_its_text(tok):
    """OpenAI's content form, a list of {"type": "text", "text"} parts (what the server takes, and what a
    file exported from an OpenAI chat log holds), was refused in training data: it reads as its text."""
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:4]}, {"type": "text", "text": m["content"][4:]}]}
             for m in TALK]
    (a, _), (b, _) = chat_example(tok, parts, 10_000, "row 1"), chat_example(tok, TALK, 10_000, "row 1")
    assert (a.ids, a.spans, a.text) == (b.ids, b.spans, b.text)  # hunt 15: .text was the parts list


def test_a_template_that_rewrites_earlier_turns_is_refused(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    # Shows only the last user turn in full: earlier turns change once a later one exists.
    t.chat_template = ("{% for m in messages %}{% if loop.last or m['role'] != 'user' %}{{ m['content'] }}{% else %}"
                       "...{% endif %}\n{% endfor %}")
    with pytest.raises(SoftpromptError, match="does not render turn 2 after the turns before it"):
        chat_example(t, TALK, 100, "row 1")


def test_messages_file_loss_equals_hf_loss_on_assistant_labels(llama_dir, tmp_path):
    """A JSONL of conversations is found by its `messages` column; its held-out loss (no prompt) is
    HF's own loss with labels on the assistant tokens and -100 elsewhere."""
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    rows = [{"messages": TALK}, {"messages": TALK[:2]}, {"messages": [{"role": "system", "content": "Terse."}, *TALK[2:]]}]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, ex, _ = load_splits(DataConfig(data=str(f), eval_fraction=0), tok)
    assert fmt.task == "chat" and fmt.cfg.messages_col == "messages" and fmt.cfg.chat
    ours = eval_loss(model, tok, None, ex)
    b = collate(ex, pad_id(tok))
    with torch.no_grad():
        hf = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss
    assert ours["tokens"] == int((b.targets[:, 1:] != -100).sum()) and ours["tokens"] > 0
    assert ours["loss"] == pytest.approx(float(hf), rel=1e-5)
