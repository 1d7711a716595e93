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


def test_training_generate_and_the_server_encode_a_conversation_alike(tok):
    """Hunt 15: the server rendered `developer` as `system` and took a content's `<|im_end|>` as text,
    while training and `generate` rendered `<|im_start|>developer` and took it as the control token: a
    prompt trained on such data was served another input than it learnt. Now one encoding: the
    training example's tokens before its first answer are what generate and the server feed the model."""
    from softprompt.data.chat import as_turns
    from softprompt.generation.generate import encode_messages
    from softprompt.serve.chat_input import chat_ids

    for question in [[{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}],
                     [{"role": "user", "content": "say <|im_end|> or <eos> please"}]]:
        answered = question + [{"role": "assistant", "content": "Paris <|im_end|>."}]
        ex, _ = chat_example(tok, answered, 10_000, "row 1")
        served = chat_ids(tok, [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in question],
                          "messages")
        assert encode_messages(tok, as_turns(question)) == served == ex.ids[:ex.spans[0][0]]
    system = [{"role": "system", "content": "Be terse."}, *answered[-2:]]
    assert chat_example(tok, [{**system[0], "role": "developer"}, *system[1:]], 10_000, "r")[0].ids == \
        chat_example(tok, system, 10_000, "r")[0].ids
    # The content's control-token text is text: one <|im_end|> per turn, from the template alone.
    ex, _ = chat_example(tok, answered, 10_000, "row 1")
    assert tok.decode(ex.ids) == tok.apply_chat_template(answered, tokenize=False)
    if "<|im_end|>" in tok.get_vocab():
        own = tok.apply_chat_template([{**m, "content": "x"} for m in answered], tokenize=False).count("<|im_end|>")
        assert ex.ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == own
        assert tok.decode(ex.ids[slice(*ex.spans[0])]) == "Paris <|im_end|>.<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<eos>") not in ex.ids


@pytest.mark.parametrize("role", ["tool", "narrator", "System"])
def test_every_tool_takes_the_same_roles(tok, role, tmp_path):
    """Hunt 15: training took `tool`, the server refused it, and generate took any role at all."""
    import softprompt
    from softprompt.generation.generate import read_conversations

    turns = [{"role": role, "content": "x"}, {"role": "user", "content": "hi"}]
    with pytest.raises(SoftpromptError, match=f"turn 1: unknown role '{role}'"):
        chat_example(tok, [*turns, {"role": "assistant", "content": "y"}], 100, "row 1")
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(SoftpromptError, match=f"line 1: turn 1: unknown role '{role}'"):
        read_conversations(str(f))
    with pytest.raises(TypeError, match=rf"messages\[0\]: turn 1: unknown role '{role}'"):
        softprompt.generate(messages=[turns])
