"""Generation: cached prompt KV and mixed-prompt batches give the same tokens as one request alone,
and the no-prompt path equals transformers' own greedy generate."""
import torch

from softprompt.core.config import GenerateConfig
from softprompt.forward.prefill import PromptKV
from softprompt.generation.generate import generate_batch


def test_mixed_batch_equals_one_at_a_time_and_reference(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    H = model.config.hidden_size
    prompts = [None, torch.randn(4, H) * 0.5, torch.randn(7, H) * 0.5]
    texts = ["Country: France\nFacts:", "Review: a dull", "Act as"]
    rows = [(p, tok(t).input_ids) for p in prompts for t in texts]
    cfg = GenerateConfig(max_new_tokens=10)
    kv = PromptKV(model)
    batched = generate_batch(model, tok, rows, cfg, kv)
    single = [generate_batch(model, tok, [r], cfg, kv)[0] for r in rows]
    assert batched == single
    assert len({tuple(b) for b in batched}) > 3  # prompts really change the output
    # Reference: transformers' generate on the hand-built inputs_embeds, one row at a time.
    for p, ids in rows:
        ids_t = torch.tensor([ids])
        emb = model.get_input_embeddings()(ids_t)
        if p is not None:
            emb = torch.cat([p[None], emb], 1)
        ref = model.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                             max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)[0].tolist()
        assert generate_batch(model, tok, [(p, ids)], cfg, kv)[0] == [t for t in ref if t != tok.eos_token_id]


def test_prompt_kv_is_computed_once(tiny):
    model, tok = tiny
    p = torch.randn(3, model.config.hidden_size)
    kv = PromptKV(model)
    generate_batch(model, tok, [(p, tok("a").input_ids)] * 2, GenerateConfig(max_new_tokens=2), kv)
    first = kv.store[id(p)]
    generate_batch(model, tok, [(p, tok("b").input_ids)], GenerateConfig(max_new_tokens=2), kv)
    assert len(kv.store) == 1 and kv.store[id(p)] is first


def test_sampling_is_seeded_and_penalty_changes_output(tiny):
    model, tok = tiny
    rows = [(None, tok("Country: Peru\nFacts:").input_ids)]
    s1 = generate_batch(model, tok, rows, GenerateConfig(max_new_tokens=12, sample=True, seed=5))
    s2 = generate_batch(model, tok, rows, GenerateConfig(max_new_tokens=12, sample=True, seed=5))
    assert s1 == s2
    g = generate_batch(model, tok, rows, GenerateConfig(max_new_tokens=12))[0]
    r = generate_batch(model, tok, rows, GenerateConfig(max_new_tokens=12, repetition_penalty=5.0))[0]
    assert len(set(g)) < len(g)  # the tiny random model's greedy output repeats itself...
    assert len(set(r)) > len(set(g))  # ...and a strong penalty makes it repeat less


def test_step_wise_decoding_per_row_budgets_seeds_and_early_stop(tiny):
    from softprompt.generation.decode import DecodeBatch

    def run(rows, cfg, **kw):
        dec = DecodeBatch(model, tok)
        ids = dec.add(rows, cfg, **kw)
        steps = []
        while not dec.finished:
            steps.append(dec.step())
        return dec, ids, steps

    model, tok = tiny
    torch.manual_seed(1)
    p = torch.randn(4, model.config.hidden_size) * 0.5
    rows = [(None, tok("Country: Peru\nFacts:").input_ids), (p, tok("Act as").input_ids)]
    greedy = GenerateConfig(max_new_tokens=9)
    alone = [generate_batch(model, tok, [r], GenerateConfig(max_new_tokens=n))[0] for r, n in zip(rows, (3, 9))]
    dec, ids, steps = run(rows, greedy, max_new=[3, 9])
    new = [dec.pop(i).new for i in ids]
    assert [t for t in new[0] if t not in dec.eos] == alone[0] and len(new[0]) <= 3
    assert [t for t in new[1] if t not in dec.eos] == alone[1]
    assert all(ids[0] not in s for s in steps[3:])  # row 0 finished after its own budget
    # Per-row seeds: a sampled row draws the same tokens whatever else shares its batch.
    samp = GenerateConfig(max_new_tokens=8, sample=True, temperature=1.5, top_p=1.0)
    solo, (s1,), _ = run(rows[1:], samp, seeds=[7])
    pair, (_, s2), _ = run(rows, samp, seeds=[3, 7])
    assert solo.pop(s1).new == pair.pop(s2).new
    # stop(id) ends one row at once and leaves the others running to the same result.
    dec = DecodeBatch(model, tok)
    ids = dec.add(rows, greedy)
    dec.step()
    dec.stop(ids[0])
    while not dec.finished:
        dec.step()
    assert len(dec.pop(ids[0]).new) == 1 and [t for t in dec.pop(ids[1]).new if t not in dec.eos] == alone[1]
