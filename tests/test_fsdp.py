"""A sharded frozen base (`--shard fsdp`): 2 processes (torchrun, gloo on CPU), each holding half of
every decoder layer, train the same prompt as 1 process with the whole model and the same global
batch, on the packed and the prompt-KV paths. The sharded runs are real CLI subprocesses, as in
test_ddp.py; the one-process reference runs in the test's process."""
from __future__ import annotations

import json

import pytest

from softprompt.base.models import load_model
from softprompt.core.config import PromptConfig, TrainConfig
from softprompt.prompts.prompt import init_prompt, load_prompt
from test_ddp import one_process, torchrun


@pytest.mark.parametrize("path", ["packed", "kv"])
def test_two_sharded_processes_train_the_same_prompt_as_one(fork_python, path, llama_dir, countries_csv, tmp_path):
    args = ["train", "--model", str(llama_dir), "--data", str(countries_csv),
            "--template", "Country: {country}\nFacts:", "--target", " capital={capital}", "--forward-path", path,
            "--device", "cpu", "--dtype", "float32",
            "--batch-size", "4", "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
            "--virtual-tokens", "3", "--init", "vocab", "--eval-fraction", "0", "--no-eval-untuned"]
    one, two = tmp_path / "OUT1", tmp_path / "OUT2"
    one_process(args, one)
    torchrun(fork_python, "-m", "softprompt", *args, "--shard", "fsdp", "--out", str(two), cwd=tmp_path)

    c1 = json.loads((one / "run_config.json").read_text())
    c2 = json.loads((two / "run_config.json").read_text())
    assert (c1["world_size"], c2["world_size"], c2["TrainConfig"]["shard"]) == (1, 2, "fsdp")
    assert c2["forward_path_taken"] == path
    # Each process holds half of every decoder layer; the embeddings (here 400 x 32, twice) stay whole.
    layers = c1["base_bytes_per_process"] - 2 * 400 * 32 * 4 - 32 * 4
    assert c2["base_bytes_per_process"] == pytest.approx(c1["base_bytes_per_process"] - layers / 2, abs=64)
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["steps"] == 3 and s2["base_weights_unchanged"]

    p1, p2 = load_prompt(one).embeds.detach(), load_prompt(two).embeds.detach()
    diff = (p1 - p2).abs().max().item()
    assert diff <= 1e-5, f"1-process and 2-process sharded prompts differ by {diff:.3g}"
    model, tok = load_model(str(llama_dir))
    init = init_prompt(model, tok, PromptConfig(virtual_tokens=3, init="vocab"), seed=0).embeds.detach()
    assert (p1 - init).abs().max().item() > 100 * max(diff, 1e-8)  # training moved it: the check can fail


TEXT = "Name the capital."


@pytest.mark.parametrize("method,projection", [("prefix", True), ("prefix", False), ("ptuning", False),
                                               ("residual", False)])
def test_sharded_processes_train_the_same_prefix_or_encoder_as_one(fork_python, method, projection, llama_dir,
                                                                   countries_csv, tmp_path):
    """The other prompt methods under --shard fsdp: what trains (a prefix's keys and values, scaled by
    default, or through its MLP; an encoder) is replicated and its gradient all-reduced, so 2 sharded
    processes train what 1 does."""
    from safetensors.torch import load_file

    args = ["train", "--model", str(llama_dir), "--data", str(countries_csv), "--method", method,
            "--template", "Country: {country}\nFacts:", "--target", " capital={capital}",
            "--device", "cpu", "--dtype", "float32",
            "--batch-size", "4", "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
            "--virtual-tokens", "3", "--init", "text", "--init-text", TEXT, "--eval-fraction", "0", "--no-eval-untuned"]
    if projection:
        args += ["--prefix-projection"]  # the MLP's weights all-reduced too, its buffer broadcast
    one, two = tmp_path / "OUT1", tmp_path / "OUT2"
    one_process(args, one)
    # The command as its console script runs it, with a mark printed at interpreter teardown: a process
    # torchrun started skips teardown (cli.entry), where gloo threads that FSDP's meshes keep alive
    # could abort it after its work is done (pytorch#179291; about one run of this test in six).
    (tmp_path / "command.py").write_text("import atexit\natexit.register(print, 'TEARDOWN', flush=True)\n"
                                         "from softprompt.cli import entry\nentry()\n")
    printed = torchrun(fork_python, str(tmp_path / "command.py"), *args, "--shard", "fsdp", "--out", str(two),
                       cwd=tmp_path)
    assert '"steps": 3' in printed and "TEARDOWN" not in printed

    c2 = json.loads((two / "run_config.json").read_text())
    assert (c2["world_size"], c2["TrainConfig"]["shard"], c2["TrainConfig"]["method"]) == (2, "fsdp", method)
    assert c2["base_bytes_per_process"] < json.loads((one / "run_config.json").read_text())["base_bytes_per_process"]
    assert json.loads((two / "summary.json").read_text())["base_weights_unchanged"]
    t1, t2 = load_file(str(one / "prompt.safetensors")), load_file(str(two / "prompt.safetensors"))
    assert set(t1) == set(t2) == ({"prefix_key_values"} if method == "prefix" else {"prompt_embeddings"})
    (name, a), b = next(iter(t1.items())), next(iter(t2.values()))
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"1-process and 2-process sharded {method} results differ by {diff:.3g}"
    # Training moved the result away from its init (rebuilt here as the run built it), so the check can fail.
    from softprompt.training.methods import METHODS
    model, tok = load_model(str(llama_dir))
    start = METHODS[method].setup(model, tok, PromptConfig(virtual_tokens=3, init="text", init_text=TEXT),
                                  TrainConfig(method=method, prefix_projection=projection), [], TEXT, "")
    start = start.prompt.state_tensors()[name]
    assert (a - start).abs().max().item() > 100 * max(diff, 1e-8)
