"""Every supported model family, as a tiny random model (tests/families.py), passes the same five
checks: the prompt path equals the hand-built `inputs_embeds` reference (and its loss equals
transformers' own), a zero-length prompt equals the base model, an exported prompt gives PEFT the
same logits, mixed-prompt generation over rows of different lengths equals one at a time, and
label words of several tokens score as one plain forward per word does."""
import pytest
import torch

from families import FAMILIES, tiny_config
from softprompt.core.config import DataConfig, GenerateConfig
from softprompt.data.batching import collate
from softprompt.data.formatting import Formatter
from softprompt.forward.hidden import batch_loss, logits, text_hidden
from softprompt.generation.generate import generate_batch

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher.", "x"]
P = 5


@pytest.fixture(scope="module")
def family_dirs(tok_dir, tmp_path_factory):
    """Each family saved once (as a user's model folder), loaded per test through load_model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok), tok.pad_token_id, tok.eos_token_id))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _load(family_dirs, name):
    from softprompt.base.models import load_model

    return load_model(str(family_dirs[name]))


def _batch(tok):
    fmt = Formatter(DataConfig(text_col="t", max_length=64), tok)
    return collate([fmt.encode({"t": t}) for t in TEXTS], tok.pad_token_id)


def _reference_logits(model, prompt, b):
    B = b.input_ids.shape[0]
    emb = model.get_input_embeddings()(b.input_ids)
    x = torch.cat([prompt.expand(B, *prompt.shape), emb], 1)
    mask = torch.cat([torch.ones(B, prompt.shape[0], dtype=torch.long), b.attention_mask], 1)
    return model(inputs_embeds=x, attention_mask=mask).logits[:, prompt.shape[0]:]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompt_path_equals_reference_and_zero_prompt_equals_base(family_dirs, name):
    model, tok = _load(family_dirs, name)
    b = _batch(tok)
    m = b.attention_mask.bool()
    base = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    h, _ = text_hidden(model, None, b.input_ids, b.attention_mask)
    assert (logits(model, h)[m] - base[m]).abs().max() < 1e-5
    torch.manual_seed(1)
    prompt = torch.randn(P, model.config.hidden_size) * 0.5
    ref = _reference_logits(model, prompt, b)
    for path in ("auto", "kv", "concat"):
        h, _ = text_hidden(model, prompt, b.input_ids, b.attention_mask, path=path)
        diff = (logits(model, h)[m] - ref[m]).abs().max()
        assert diff < 1e-5 * max(1.0, float(ref[m].abs().max())), (path, float(diff))
    labels = torch.cat([torch.full((len(TEXTS), P), -100), b.targets], 1)
    B = b.input_ids.shape[0]
    hf = model(inputs_embeds=torch.cat([prompt.expand(B, P, -1), model.get_input_embeddings()(b.input_ids)], 1),
               attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), b.attention_mask], 1), labels=labels).loss
    s, n = batch_loss(model, prompt, b)
    assert abs(float(s / n) - float(hf)) < 1e-5 * float(hf)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exported_prompt_gives_peft_the_same_logits(family_dirs, name, tmp_path):
    from peft import PeftModel

    from softprompt.prompts.peft_io import export_peft
    from softprompt.prompts.prompt import SoftPrompt, save_prompt

    model, tok = _load(family_dirs, name)
    torch.manual_seed(2)
    prompt = SoftPrompt(torch.randn(P, model.config.hidden_size) * 0.5)
    save_prompt(prompt, tmp_path / "p", {"model": str(family_dirs[name])})
    export_peft(tmp_path / "p", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(model, tmp_path / "peft")
    b = _batch(tok)
    m = b.attention_mask.bool()
    with torch.no_grad():
        theirs = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, P:]
        h, _ = text_hidden(peft_model.get_base_model(), prompt.embeds, b.input_ids, b.attention_mask)
        ours = logits(peft_model.get_base_model(), h)
    assert (ours[m] - theirs[m]).abs().max() < 1e-5 * max(1.0, float(theirs[m].abs().max()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mixed_prompt_generation_equals_one_at_a_time(family_dirs, name):
    model, tok = _load(family_dirs, name)
    torch.manual_seed(3)
    Hd = model.config.hidden_size
    prompts = [None, torch.randn(P, Hd) * 0.5, torch.randn(2, Hd) * 0.5]
    rows = [(p, tok(t).input_ids) for p in prompts for t in TEXTS]
    cfg = GenerateConfig(max_new_tokens=6)
    batched = generate_batch(model, tok, rows, cfg)
    alone = [generate_batch(model, tok, [r], cfg)[0] for r in rows]
    assert batched == alone
    assert len({tuple(o) for o in alone}) > 2  # premise: the prompts change what the model writes


def _reference_label_logprob(model, prompt, ids: list[int], cand: list[int]) -> float:
    """log p(cand | prompt, ids) from one plain forward of the model over [prompt ; ids ; cand]: a soft
    prompt as input embeddings, a prefix as the past keys and values PEFT gives the model."""
    from transformers import DynamicCache

    from softprompt.prompts.prefix import PrefixPrompt

    seq = torch.tensor([ids + cand])
    if isinstance(prompt, PrefixPrompt):
        P = prompt.length
        out = model(input_ids=seq, attention_mask=torch.ones(1, P + seq.shape[1], dtype=torch.long),
                    cache=DynamicCache(ddp_cache_data=prompt.past_key_values(model)))
        z = out.logits[0]
    else:
        P = 0 if prompt is None else prompt.shape[0]
        x = model.get_input_embeddings()(seq)
        z = model(inputs_embeds=x if prompt is None else torch.cat([prompt[None], x], 1)).logits[0, P:]
    lp = torch.log_softmax(z.double(), -1)
    return float(sum(lp[len(ids) - 1 + t, c] for t, c in enumerate(cand)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_multi_token_label_scores_equal_one_forward_per_candidate(family_dirs, name):
    """Label words of several tokens are scored with each row run once and its candidates over that
    row's cache: the same log-probabilities as a plain forward over [prompt ; row ; candidate] for each
    candidate, for rows with no prompt, a soft prompt and a prefix side by side in one call."""
    from softprompt.forward.classify import label_scores
    from softprompt.prompts.prefix import PrefixPrompt, prefix_meta, prompt_key_values

    model, tok = _load(family_dirs, name)
    torch.manual_seed(4)
    soft = torch.randn(P, model.config.hidden_size) * 0.5
    prefix = PrefixPrompt(prompt_key_values(model, torch.randn(3, model.config.hidden_size) * 0.5), prefix_meta(model))
    words = [tok(w, add_special_tokens=False).input_ids for w in (" not entailment", " yes", " maybe so, yes")]
    assert len({len(w) for w in words}) == 3 and min(map(len, words)) >= 1
    rows = [(p, tok(t).input_ids) for p in (None, soft, prefix) for t in TEXTS]
    cands = [words[: 2 + k % 2] for k in range(len(rows))]  # rows with 2 and with 3 candidates
    with torch.no_grad():
        got = label_scores(model, rows, cands, tok.pad_token_id, batch_size=4)
        ref = [[_reference_label_logprob(model, p, ids, c) for c in cs] for (p, ids), cs in zip(rows, cands)]
    for i, r in enumerate(ref):
        assert got[i, :len(r)].tolist() == pytest.approx(r, abs=1e-4, rel=1e-5), (i, got[i].tolist(), r)
        assert len(r) == 3 or got[i, 2] == -torch.inf


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_left_padded_row_reads_as_it_does_alone(family_dirs, name):
    """Hunt 16: SoftPromptModel.forward (the Trainer path) on a left-padded batch numbered positions by
    index, so the pads between the prompt and a row's text moved the text away from the prompt, and a
    row's logits and loss changed with its batch (by 3.0 on the built-in model). Every family, soft
    prompt and prefix: a left-padded row's logits and loss are its own alone."""
    from softprompt.model import SoftPromptModel
    from softprompt.prompts.prefix import PrefixPrompt, prefix_meta, prompt_key_values
    from softprompt.prompts.prompt import SoftPrompt

    model, tok = _load(family_dirs, name)
    torch.manual_seed(3)
    soft = torch.randn(P, model.config.hidden_size) * 0.2
    rows = [tok(t).input_ids for t in (TEXTS[0], TEXTS[2])]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    right_ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    real = mask[1].bool()
    assert not real.all()  # the premise: row 1 is left-padded
    for prompt in (SoftPrompt(soft), PrefixPrompt(prompt_key_values(model, soft), prefix_meta(model))):
        sp = SoftPromptModel(model, prompt, tokenizer=tok)
        with torch.no_grad():
            both = sp(input_ids=ids, attention_mask=mask, labels=ids, return_logits=True)
            alone = sp(input_ids=ids[1:, real], labels=ids[1:, real], return_logits=True)
            right = sp(input_ids=right_ids, attention_mask=right_mask, labels=right_ids)
        assert torch.allclose(both.logits[1, real], alone.logits[0], atol=1e-4, rtol=1e-4), \
            (type(prompt).__name__, (both.logits[1, real] - alone.logits[0]).abs().max())
        assert float(both.loss) == pytest.approx(float(right.loss), rel=1e-5)  # as the batch right-padded
