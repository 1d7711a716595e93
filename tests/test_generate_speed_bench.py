"""bench/generate_speed.py's dry run on a tiny random Llama: every path runs, rivals are compared at
equal batching, the result file names its provenance and warm-up, and the mixed batch equals
one-at-a-time greedy decoding; the prompts converted into prefixes give the same greedy tokens
at the same batching, and --no-prefix leaves those rows out. (Its timings mean nothing at this size; torch.compile is off: it
compiles for about a minute per shape on a CPU.)"""
from __future__ import annotations

import json

import pytest

from conftest import SHARED

PREFIX_PATHS = {"softprompt-prefix/per-task", "softprompt-prefix/mixed", "softprompt-both/mixed"}
PATHS = {"peft", "hf/per-task", "hf-static/per-task", "softprompt/per-task", "softprompt/mixed", "hf/mixed",
         "hf-static/mixed", "peft/one-adapter", "plain"} | PREFIX_PATHS


def dry_run(run_bench, model_dir, out, repeats: int, *extra: str) -> dict:
    pytest.importorskip("peft")
    if not (SHARED / "awesome-chatgpt-prompts" / "prompts.csv").is_file():
        pytest.skip(f"no {SHARED / 'awesome-chatgpt-prompts'}")
    proc = run_bench("generate_speed.py", "--model", f"random:{model_dir}", "--device", "cpu", "--tasks", "2",
                     "--per-task", "2", "--max-new-tokens", "4", "--virtual-tokens", "4", "--repeats", str(repeats),
                     "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "softprompt / best rival" in proc.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(run_bench, llama_dir, tmp_path_factory) -> dict:
    return dry_run(run_bench, llama_dir, tmp_path_factory.mktemp("gen") / "r.json", repeats=2)


def test_every_path_is_warmed_then_timed_each_round(result):
    assert set(result["paths"]) == PATHS
    passes = [(r["path"], r["pass"]) for r in result["rows"]]
    assert passes[:len(PATHS)] == [(p, "warm-up") for p in result["paths"]]
    for p in PATHS:
        assert [k for name, k in passes if name == p] == ["warm-up", 0, 1]
    assert all(r["same_output_as_warm_up"] for r in result["rows"] if r["pass"] != "warm-up")
    assert "untimed pass of each path's whole workload" in result["warmup"]


def test_rivals_run_at_softprompts_batch_sizes(result):
    p = result["paths"]
    for name in ("softprompt/per-task", "peft", "hf/per-task", "hf-static/per-task", "softprompt-prefix/per-task"):
        assert p[name]["batch_sizes"] == [2, 2], name
    for name in ("softprompt/mixed", "hf/mixed", "hf-static/mixed", "peft/one-adapter", "plain",
                 "softprompt-prefix/mixed", "softprompt-both/mixed"):
        assert p[name]["batch_sizes"] == [4], name


def test_ratios_are_against_the_fastest_rival(result):
    p, r = result["paths"], result["ratios"]
    for batching, ours, rivals in [("per-task", "softprompt/per-task", ["peft", "hf/per-task", "hf-static/per-task"]),
                                   ("mixed", "softprompt/mixed", ["peft/one-adapter", "hf/mixed", "hf-static/mixed"])]:
        best = max(rivals, key=lambda n: p[n]["tok_s_median"])
        assert r[batching]["best_rival"] == best
        assert r[batching]["vs_best"] == pytest.approx(p[ours]["tok_s_median"] / p[best]["tok_s_median"])
        assert r[batching]["vs_plain_peft"] == pytest.approx(p[ours]["tok_s_median"] / p[rivals[0]]["tok_s_median"])
    for key, name, ref in [("per-task", "softprompt-prefix/per-task", "softprompt/per-task"),
                           ("mixed", "softprompt-prefix/mixed", "softprompt/mixed"),
                           ("both_mixed", "softprompt-both/mixed", "softprompt/mixed")]:
        assert r["prefix_vs_prompt"][key] == pytest.approx(p[name]["tok_s_median"] / p[ref]["tok_s_median"])
    for s in p.values():
        assert len(s["tok_s_all"]) == 2 and min(s["tok_s_all"]) <= s["tok_s_median"] <= max(s["tok_s_all"])


def test_provenance_backend_and_identity_are_recorded(result):
    assert {"command", "commit", "machine", "started"} <= set(result)
    assert "generate_speed.py" in result["command"] and result["machine"]["peft"]
    assert result["attn_implementation"] == "sdpa" == result["checks"]["attn_implementation_after"]
    assert result["compile"] is False and "peft_static_error" in result
    # PEFT's first forward takes the prompt and text; the probe says whether the next ones take 1.
    lengths = result["peft_decode_step_lengths"]
    assert len(lengths) == 3 and lengths[0] > 4 and result["peft_refeeds_prompt"] == (max(lengths[1:]) > 1)
    assert result["checks"]["mixed_equals_single"] and result["checks"]["mixed_equals_per_task"]
    # The hand-built inputs_embeds run the same computation as softprompt: the same greedy tokens.
    for name in ("hf/per-task", "hf-static/per-task", "hf/mixed", "hf-static/mixed"):
        assert result["paths"][name]["rows_equal_to_softprompt"] == 1.0, name


def test_converted_prefixes_give_the_prompts_tokens(result):
    """fp32: a prompt converted into a prefix is the same keys and values, so the same greedy tokens,
    alone, mixed with other prefixes, and mixed with prompts in one batch."""
    c = result["checks"]
    assert c["prefix_equals_prompt"] is True and c["prefix_rows_differing"] == 0
    assert set(c["prefix_rows_differing_by_path"]) == PREFIX_PATHS
    for name in PREFIX_PATHS:
        assert result["paths"][name]["rows_equal_to_softprompt"] == 1.0, name
        assert result["paths"][name]["new_tokens"] > 0, name
    assert result["prefix"] is True


def test_a_rival_that_cannot_run_is_recorded_not_fatal(run_bench, bloom_dir, tmp_path):
    """BLOOM has no SDPA (every path runs its eager attention) and PEFT's prompt-tuning generate
    fails on it (peft 0.21.2): the bench still measures the rest and says why PEFT is missing."""
    r = dry_run(run_bench, bloom_dir, tmp_path / "r.json", 1, "--no-prefix")
    assert r["attn_implementation"] == "eager" == r["checks"]["attn_implementation_after"]
    for name in ("peft", "peft/one-adapter"):
        assert (name in r["paths"]) != (name in r.get("failed_paths", {}))
    assert {"softprompt/per-task", "softprompt/mixed", "hf/mixed", "hf-static/per-task", "hf-static/mixed"} <= set(r["paths"])
    assert r["checks"]["mixed_equals_single"]
    # --no-prefix: no prefix rows, ratio or equality flag
    assert not PREFIX_PATHS & set(r["paths"]) and "prefix_vs_prompt" not in r["ratios"]
    assert r["prefix"] is False and r["checks"]["prefix_equals_prompt"] is None
    if "peft" not in r["paths"]:
        assert r["ratios"]["per-task"]["vs_plain_peft"] is None
