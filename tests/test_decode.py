"""Continuous batching: rows that join a running batch between steps, leave it early, or sample with
their own settings give exactly what each gives alone."""
import torch

from softprompt.core.config import GenerateConfig
from softprompt.forward.prefill import PromptKV
from softprompt.generation.decode import DecodeBatch
from softprompt.generation.generate import generate_batch


def _rows(model, tok):
    torch.manual_seed(0)
    H = model.config.hidden_size
    prompts = [None, torch.randn(4, H) * 0.5, torch.randn(7, H) * 0.5]
    texts = ["Country: France\nFacts:", "Review: a dull", "Act as", "Country: Peru"]
    return [(p, tok(t).input_ids) for p in prompts for t in texts]


def test_rows_joining_mid_decode_equal_one_at_a_time(tiny):
    model, tok = tiny
    rows = _rows(model, tok)
    kv = PromptKV(model)
    budgets = [3, 12, 7, 10, 1, 9, 12, 5, 8, 12, 2, 11]
    alone = [generate_batch(model, tok, [r], GenerateConfig(max_new_tokens=n), kv)[0] for r, n in zip(rows, budgets)]
    dec = DecodeBatch(model, tok, kv)
    cfg = GenerateConfig(max_new_tokens=12)
    ids, step, sizes = [], 0, []
    while len(ids) < len(rows) or not dec.finished:
        if step % 2 == 0 and len(ids) < len(rows):  # three rows join every other step
            k = len(ids)
            ids += dec.add(rows[k:k + 3], cfg, max_new=budgets[k:k + 3])
        dec.step()
        sizes.append(dec.live and len(dec.live.rows))
        step += 1
    got = [[t for t in dec.pop(i).new if t not in dec.eos] for i in ids]
    assert got == alone
    assert max(s or 0 for s in sizes) > 3  # rows really overlapped
    assert not dec.results and dec.finished


def test_finished_rows_leave_the_batch_and_their_columns_go(tiny):
    model, tok = tiny
    rows = _rows(model, tok)[:4]
    dec = DecodeBatch(model, tok)
    ids = dec.add(rows, GenerateConfig(max_new_tokens=20), max_new=[1, 20, 20, 20])
    dec.step()
    dec.step()  # row 0 finished after one token: gone before this step's forward
    assert [r.id for r in dec.live.rows] == ids[1:]
    dec.stop(ids[1])
    dec.step()
    assert [r.id for r in dec.live.rows] == ids[2:]
    assert dec.live.mask.any(0).all()  # leading columns no live row attends to were trimmed
    assert dec.live.mask.shape[1] == max(len(r[1]) for r in rows[2:]) + 2
    assert dec.pop(ids[0]).new and len(dec.pop(ids[1]).new) == 2


def test_mixed_sampling_settings_in_one_batch_equal_alone(tiny):
    model, tok = tiny
    rows = _rows(model, tok)[:3]
    cfgs = [GenerateConfig(max_new_tokens=8), GenerateConfig(max_new_tokens=8, sample=True, temperature=1.3, top_p=0.9),
            GenerateConfig(max_new_tokens=8, repetition_penalty=3.0)]
    alone = []
    for r, c, seed in zip(rows, cfgs, (1, 2, 3)):
        d = DecodeBatch(model, tok)
        (i,) = d.add([r], c, seeds=[seed])
        while not d.finished:
            d.step()
        alone.append(d.pop(i).new)
    dec = DecodeBatch(model, tok)
    ids = [dec.add([r], c, seeds=[seed])[0] for r, c, seed in zip(rows, cfgs, (1, 2, 3))]
    while not dec.finished:
        dec.step()
    assert [dec.pop(i).new for i in ids] == alone
    assert alone[1] != alone[0]  # premise: sampling changed the tokens


def test_static_slots_equal_the_growing_cache(llama_dir):
    """The static-slot engine (CUDA-graph replay on GPUs; run eagerly here) gives DecodeBatch's
    tokens, with rows joining mid-decode and the slots and columns growing into larger buckets."""
    from softprompt.base.models import load_model
    from softprompt.generation.static_decode import StaticDecodeBatch, supported

    model, tok = load_model(str(llama_dir))
    assert supported(model)
    rows = _rows(model, tok)
    budgets = [3, 12, 7, 10, 1, 9, 12, 5, 8, 12, 2, 70]  # the last one outgrows the first column bucket
    kv = PromptKV(model)
    cfg = GenerateConfig(max_new_tokens=70)
    results = []
    for engine in (DecodeBatch(model, tok, kv), StaticDecodeBatch(model, tok, kv, graphs=False)):
        ids, step = [], 0
        while len(ids) < len(rows) or not engine.finished:
            if step % 3 == 0 and len(ids) < len(rows):
                k = len(ids)
                ids += engine.add(rows[k:k + 5], cfg, max_new=budgets[k:k + 5])
            engine.step()
            step += 1
        results.append([engine.pop(i).new for i in ids])
    assert results[0] == results[1]
    assert engine.S >= 8 and engine.L >= 70 + len(rows[-1][1]) + 7
    assert len(results[1][-1]) > 1 and sum(map(len, results[1])) > 60


def test_static_step_runs_on_the_meta_device(llama_dir):
    """The captured step has no data-dependent host operations (they fail on meta tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from softprompt.generation.static_decode import StaticDecodeBatch

    cfg = AutoConfig.from_pretrained(llama_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg).requires_grad_(False)
    dec = StaticDecodeBatch(model, AutoTokenizer.from_pretrained(llama_dir), graphs=False)
    dec._allocate(8, 64)
    with torch.no_grad():
        dec._body()
    assert dec.z_out.device.type == "meta" and dec.z_out.shape == (8, cfg.vocab_size)
