"""Numerical parity of the prompt path on tiny Llama (RoPE) and BLOOM (ALiBi) models."""
import torch

from softprompt.core.config import DataConfig, PromptConfig
from softprompt.data.batching import collate
from softprompt.data.formatting import Formatter
from softprompt.forward.hidden import batch_loss, next_token_logprobs, text_hidden
from softprompt.prompts.prompt import SoftPrompt, init_prompt


def _batch(tok, texts):
    fmt = Formatter(DataConfig(text_col="t", max_length=64), tok)
    return collate([fmt.encode({"t": t}) for t in texts], tok.pad_token_id)


TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher."]


def test_zero_length_prompt_equals_base_model(tiny):
    model, tok = tiny
    b = _batch(tok, TEXTS)
    ref = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    for p in (None, torch.zeros(0, model.config.hidden_size)):
        h, last = text_hidden(model, p, b.input_ids, b.attention_mask)
        assert last is None
        logits = model.get_output_embeddings()(h)
        m = b.attention_mask.bool()
        assert torch.allclose(logits[m], ref[m], atol=1e-6, rtol=0)


def test_prompt_path_equals_inputs_embeds_reference(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    P, H = 5, model.config.hidden_size
    prompt = torch.randn(P, H) * 0.05
    b = _batch(tok, TEXTS)
    B = b.input_ids.shape[0]
    emb = model.get_input_embeddings()(b.input_ids)
    ref = model(inputs_embeds=torch.cat([prompt.expand(B, P, H), emb], 1),
                attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), b.attention_mask], 1)).logits
    m = b.attention_mask.bool()
    head = model.get_output_embeddings()
    for path in ("concat", "auto"):
        h, last = text_hidden(model, prompt, b.input_ids, b.attention_mask, path=path)
        assert torch.allclose(head(h)[m], ref[:, P:][m], atol=1e-5, rtol=0), path
        assert torch.allclose(head(last).expand(B, -1), ref[:, P - 1], atol=1e-5, rtol=0)


def test_loss_equals_hf_labels_loss(tiny):
    """Our loss (logits only at supervised positions) equals the full-logits HF loss PEFT uses."""
    model, tok = tiny
    torch.manual_seed(2)
    P, H = 4, model.config.hidden_size
    prompt = torch.randn(P, H) * 0.05
    b = _batch(tok, TEXTS)
    B = b.input_ids.shape[0]
    emb = model.get_input_embeddings()(b.input_ids)
    labels = torch.cat([torch.full((B, P), -100), b.targets], 1)
    ref = model(inputs_embeds=torch.cat([prompt.expand(B, P, H), emb], 1),
                attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), b.attention_mask], 1),
                labels=labels).loss
    for path in ("concat", "auto"):
        s, n = batch_loss(model, prompt, b, path=path)
        assert abs(float(s / n) - float(ref)) / float(ref) < 1e-5


def test_trailing_target_is_not_run_and_loss_is_unchanged(tiny):
    """A row's last supervised token (the label word here) is only a target: the decoder never
    sees it, and the loss still equals the full-logits HF loss over the untrimmed batch."""
    from softprompt.forward.hidden import needed_inputs

    model, tok = tiny
    fmt = Formatter(DataConfig(template="Review: {s}\\nSentiment:", labels="negative,positive", label_col="y"), tok)
    b = collate([fmt.encode({"s": s, "y": y}) for s, y in (("a dull film", "negative"), ("a great movie", "positive"),
                                                          ("fine", "positive"))], tok.pad_token_id)
    keep = needed_inputs(b.targets, b.attention_mask)
    lengths = b.attention_mask.sum(1)
    n_label = (b.targets != -100).sum(1)
    assert keep.sum(1).tolist() == (lengths - 1).tolist()  # one label token each: only it is dropped
    assert keep.shape[1] == int(lengths.max()) - 1
    assert n_label.min() >= 1
    torch.manual_seed(4)
    P, H = 3, model.config.hidden_size
    prompt = torch.randn(P, H) * 0.05
    B = b.input_ids.shape[0]
    emb = model.get_input_embeddings()(b.input_ids)
    ref = model(inputs_embeds=torch.cat([prompt.expand(B, P, H), emb], 1),
                attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long), b.attention_mask], 1),
                labels=torch.cat([torch.full((B, P), -100), b.targets], 1)).loss
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(int(i[0].ne(-1).sum())))
    try:
        for path in ("concat", "auto"):
            seen.clear()
            s, n = batch_loss(model, prompt, b, path=path)
            assert int(n) == int(n_label.sum())
            assert abs(float(s / n) - float(ref)) / float(ref) < 1e-5, path
            assert seen == [B * keep.shape[1]]  # embedded ids: trimmed columns only
    finally:
        hook.remove()


def test_shared_prefix_gradient_equals_straightforward(tiny):
    model, tok = tiny
    b = _batch(tok, TEXTS)
    grads = []
    for path in ("concat", "auto"):
        torch.manual_seed(3)
        p = SoftPrompt(torch.randn(6, model.config.hidden_size) * 0.05)
        s, n = batch_loss(model, p(), b, path=path)
        (s / n).backward()
        grads.append(p.embeds.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_gradients_reach_only_the_prompt(tiny):
    model, tok = tiny
    p = init_prompt(model, tok, PromptConfig(virtual_tokens=3, init="vocab"))
    s, n = batch_loss(model, p(), _batch(tok, TEXTS))
    s.backward()
    assert p.embeds.grad is not None and p.embeds.grad.abs().sum() > 0
    assert all(q.grad is None and not q.requires_grad for q in model.parameters())


def test_next_token_logprobs_match_row_logprobs(tiny):
    model, tok = tiny
    prompt = torch.randn(3, model.config.hidden_size) * 0.05
    b = _batch(tok, TEXTS)
    lp = next_token_logprobs(model, prompt, b.input_ids, b.attention_mask)
    ref = torch.log_softmax(model.get_output_embeddings()(text_hidden(model, prompt, b.input_ids,
                                                                      b.attention_mask)[0]), -1)
    lengths = b.attention_mask.sum(1)
    for i in range(len(TEXTS)):
        assert torch.allclose(lp[i], ref[i, lengths[i] - 1], atol=1e-5)


def test_frozen_head_cross_entropy_matches_autograd():
    """The fused output-layer cross-entropy (gradient formed in forward, chunked) gives autograd's
    loss and input gradient, with and without logit soft-capping."""
    import types

    import torch.nn.functional as F

    from softprompt.forward import hidden as forward

    torch.manual_seed(0)
    N, H, V = 37, 16, 50
    head = torch.nn.Linear(H, V, bias=True).requires_grad_(False)
    for cap in (None, 3.0):
        model = types.SimpleNamespace(get_output_embeddings=lambda: head,
                                      config=types.SimpleNamespace(final_logit_softcapping=cap))
        h = torch.randn(N, H, requires_grad=True)
        y = torch.randint(0, V, (N,))
        up = torch.rand(N)  # a non-uniform upstream gradient
        (forward.token_losses(model, h, y, chunk_elements=10 * V) * up).sum().backward()  # 4 chunks
        g_fused, h.grad = h.grad, None
        z = head(h)
        if cap:
            z = torch.tanh(z / cap) * cap
        ref = F.cross_entropy(z, y, reduction="none")
        (ref * up).sum().backward()
        with torch.no_grad():
            assert torch.allclose(forward.token_losses(model, h, y, chunk_elements=10 * V), ref, atol=1e-6)
        assert torch.allclose(g_fused, h.grad, atol=1e-6), (g_fused - h.grad).abs().max()


def _three_paths(model, tok):
    """(hidden states at real tokens, prompt's last state, loss, prompt gradient) of the straightforward,
    packed (where the model packs) and prompt-KV paths on ragged rows."""
    b = _batch(tok, TEXTS + ["x"])
    m = b.attention_mask.bool()
    out = {}
    for name, path in (("straight", "concat"), ("packed", "auto"), ("kv", "kv")):
        torch.manual_seed(4)
        p = SoftPrompt(torch.randn(5, model.config.hidden_size) * 0.05)
        h, last = text_hidden(model, p(), b.input_ids, b.attention_mask, path=path)
        s, n = batch_loss(model, p(), b, path=path)
        (s / n).backward()
        out[name] = (h[m], last[:1], s / n, p.embeds.grad)
    return out


def test_packed_and_prompt_kv_paths_equal_straightforward(tiny):
    from softprompt.forward.packing import packable

    model, tok = tiny
    b = _batch(tok, TEXTS)
    before = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    out = _three_paths(model, tok)
    # Packing routes the attention through its own function, which outside a packed pass is the
    # model's own attention: plain calls give the same logits as before.
    after = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(before, after)
    assert out["straight"][3].abs().sum() > 0
    for name in ("packed", "kv"):
        for got, ref in zip(out[name], out["straight"]):
            assert torch.allclose(got, ref, atol=2e-6, rtol=1e-4), name
    # Llama packs; BLOOM (ALiBi built from the 2D mask) keeps the prompt-KV path.
    assert packable(model, b.attention_mask) == (model.config.model_type == "llama")


def test_packing_refuses_left_padding(tiny):
    from softprompt.forward.packing import packable

    model, _ = tiny
    assert not packable(model, torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_the_forward_paths_take_a_prompt_object_or_its_embeddings_alike(tiny):
    """Read through the Prompt protocol: the same states whether given the prompt or its tensor."""
    from softprompt.forward.hidden import mixed_hidden, text_hidden

    model, tok = tiny
    p = init_prompt(model, tok, PromptConfig(virtual_tokens=3, init="vocab"))
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        for path in ("kv", "concat", "auto"):
            h, last = text_hidden(model, p, ids, mask, path)
            h2, last2 = text_hidden(model, p.embeds, ids, mask, path)
            assert torch.equal(h, h2) and torch.equal(last, last2)
        m, starts = mixed_hidden(model, [p, None], [[5, 6], [7]])
        m2, starts2 = mixed_hidden(model, [p.embeds, None], [[5, 6], [7]])
    assert torch.equal(m, m2) and starts == starts2 == [3, 0]
