"""The scheduler without HTTP, over both decode engines (the growing cache a CPU server runs, and
the static slots a GPU server runs as CUDA graphs, here eagerly): jobs that arrive while a long
one decodes join it, each with its own settings, and every result equals the job run alone."""
from __future__ import annotations

import pytest
import torch

from softprompt.generation.sampling import Sampling
from softprompt.generation.decode import DecodeBatch
from softprompt.generation.generate import generate_batch
from softprompt.generation.static_decode import StaticDecodeBatch
from softprompt.serve.jobs import GenJob
from softprompt.serve.scheduler import LiveBatch, Scheduler
from serve_helpers import held_step, wait_until


def alone(model, tok, job: GenJob) -> list[int]:
    """The job's tokens when it is the only row of a fresh engine (EOS dropped, as jobs do)."""
    if not job.sampling.sample:
        return generate_batch(model, tok, [(job.prompt, job.ids)], job.config())[0]
    engine = DecodeBatch(model, tok)
    (i,) = engine.add([(job.prompt, job.ids)], job.config(), seeds=[job.seed])
    while not engine.finished:
        engine.step()
    return [t for t in engine.pop(i).new if t not in engine.eos]


@pytest.mark.parametrize("engine", ["growing", "static"])
def test_jobs_joining_a_running_decode_equal_each_job_alone(llama_dir, monkeypatch, engine):
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    sched = Scheduler(model, tok, max_batch=8)
    if engine == "static":
        sched.batch = LiveBatch(StaticDecodeBatch(model, tok, sched.kv, graphs=False), tok, sched.stats)
    gen = torch.Generator().manual_seed(3)
    p4, p7 = (torch.randn(n, model.config.hidden_size, generator=gen) * 0.5 for n in (4, 7))
    ids = [tok(t).input_ids for t in ("Country: France\nFacts:", "Review: a dull", "Act as", "Country: Peru")]
    first = GenJob(p4, ids[0], max_new=60)
    later = [GenJob(None, ids[1], max_new=5), GenJob(p7, ids[2], max_new=9, sampling=Sampling(True, temperature=1.3), seed=11),
             GenJob(p4, ids[3], max_new=12, sampling=Sampling(repetition_penalty=3.0)),
             GenJob(p7, ids[1], max_new=7, sampling=Sampling(True, top_p=0.8), seed=5)]
    stepped, go, sizes = held_step(sched, monkeypatch)
    sched.start()
    try:
        sched.submit([first])
        assert stepped.wait(20)  # the first job is decoding; the others arrive now
        sched.submit(later)
        go.set()
        wait_until(lambda: all(j.finished for j in [first, *later]), "every job ends", limit=60)
    finally:
        sched.close()
    for j in [first, *later]:
        assert j.future.result()["tokens"] == alone(model, tok, j)
    assert len(first.tokens) == 60  # premise: it decoded throughout
    assert sizes[:2] == [1, 5]  # all four joined the running row at its second step...
    assert sizes[-1] == 1 and sched.stats["decode_rows"] > sched.stats["decode_steps"]  # ...and left before it
    assert sched.batch.finished and not sched.batch.jobs  # every row handed back and forgotten


def test_close_ends_every_job_it_holds(llama_dir, monkeypatch):
    """Closing with rows decoding and jobs queued: each job ends (an error, or 'cancelled' for one
    whose client left), none is left waiting."""
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    sched = Scheduler(model, tok, max_batch=2)
    ids = tok("Country: Peru").input_ids
    jobs = [GenJob(None, ids, max_new=200) for _ in range(4)]  # two decode, two wait for room
    stepped, go, _ = held_step(sched, monkeypatch)
    sched.start()
    sched.submit(jobs)
    assert stepped.wait(20)
    jobs[1].cancelled = True
    sched.close(timeout=0)  # while the worker is inside its step: the queued jobs end now...
    assert jobs[2].finished and jobs[3].finished and not jobs[0].finished
    go.set()
    sched.close()  # ...and the decoding ones once the step returns
    assert not sched.alive and all(j.finished for j in jobs)
    assert jobs[1].future.result()["finish_reason"] == "cancelled"
    for j in (jobs[0], jobs[2], jobs[3]):
        with pytest.raises(RuntimeError, match="shutting down"):
            j.future.result()


def test_greedy_requests_that_differ_only_in_ignored_fields_share_a_batch_key():
    """A greedy request's temperature-less top_p is ignored by decoding, so its job must key (and so
    batch) with a plain greedy one; a sampled request keeps its top_p."""
    from softprompt.core.config import ServeConfig
    from softprompt.serve.context import ServerContext
    from softprompt.serve.protocol import CompletionRequest

    ctx = ServerContext(None, None, ServeConfig(), "base", None, None, None, None)
    plain = ctx.gen_params(CompletionRequest(model="m", prompt="x"))
    top_p = ctx.gen_params(CompletionRequest(model="m", prompt="x", top_p=0.5, temperature=0))
    sampled = ctx.gen_params(CompletionRequest(model="m", prompt="x", top_p=0.5, temperature=0.7))
    assert plain["sampling"] == top_p["sampling"] == Sampling()
    assert sampled["sampling"] == Sampling(True, 0.7, 0.5)
    jobs = [GenJob(None, [1], max_new=4, sampling=p["sampling"], seed=p["seed"]) for p in (plain, top_p, sampled)]
    assert jobs[0].key() == jobs[1].key() != jobs[2].key()
