"""Data-parallel equivalence: `torchrun --nproc_per_node 2` (Accelerate, gloo on CPU) trains the same
prompt as one process with the same global batch. The 2-process runs are real CLI subprocesses (torchrun
and its workers forked from one interpreter that imported torch: tests/fork_server.py); the one-process
reference runs the same command line in the test's process."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from softprompt.base.models import load_model
from softprompt.core.config import PromptConfig
from softprompt.prompts.prompt import init_prompt, load_prompt

TIMEOUT = 300  # seconds per run: a hung collective must fail the test, not stall the suite
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("ACCELERATE_")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p))
    return env


def torchrun(python: str, *args: str, cwd: Path, stderr: bool = False) -> str | tuple[str, str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`: its stdout (and stderr)."""
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return (r.stdout, r.stderr) if stderr else r.stdout


def one_process(args: list[str], out: Path) -> None:
    """The one-process reference run, in this process: what is compared is the 2-process run's result,
    and a third interpreter start (most of such a run here) adds nothing to that."""
    from softprompt.cli import main

    assert main([*args, "--out", str(out)]) == 0


def test_two_processes_train_the_same_prompt_as_one(fork_python, llama_dir, countries_csv, tmp_path):
    """torchrun's plain command on a CPU machine (--device auto: each process once ran alone as the main
    one, and the two fought over --out); one process prints the summary and each warning."""
    args = ["train", "--model", str(llama_dir), "--data", str(countries_csv),
            "--template", "Country: {country}\nFacts:", "--target", " capital={capital}",
            "--dtype", "float32",
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "0", "--save-every", "0",
            "--virtual-tokens", "3", "--init", "vocab", "--eval-fraction", "0"]
    one, two = tmp_path / "OUT1", tmp_path / "OUT2"
    one_process(args, one)
    # --standalone: a private rendezvous on a free port, so parallel runs cannot collide on 29500.
    printed, said = torchrun(fork_python, "-m", "softprompt", *args, "--out", str(two), cwd=tmp_path, stderr=True)
    assert len([line for line in printed.splitlines() if '"final_eval"' in line]) == 1  # one process prints
    warned = [line for line in said.splitlines() if line.startswith("[softprompt] warning: ")]
    assert len(warned) == 1 and "default warm-up of 10 steps" in warned[0], said[-3000:]  # 4 steps

    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["steps"] == s2["steps"] == 4
    assert s1["base_weights_unchanged"] and s2["base_weights_unchanged"]

    p1, p2 = load_prompt(one).embeds.detach(), load_prompt(two).embeds.detach()
    assert p1.shape == p2.shape == (3, 32)
    diff = (p1 - p2).abs().max().item()
    assert diff <= 1e-5, f"1-process and 2-process prompts differ by {diff:.3g}"

    model, tok = load_model(str(llama_dir))
    init = init_prompt(model, tok, PromptConfig(virtual_tokens=3, init="vocab"), seed=0).embeds.detach()
    moved = (p1 - init).abs().max().item()
    assert moved > 1e-3, f"training barely moved the prompt ({moved:.3g})"
    assert moved > 100 * diff
    assert torch.isfinite(p2).all()


def test_the_python_api_under_torchrun_trains_what_one_process_does(fork_python, llama_dir, countries_csv, tmp_path):
    """`torchrun script.py` calling softprompt.train: each process trains its share of the global batch
    and gets the run's summary (the main process's, which rank 1 once lacked); the script ends its own
    process group, as the README says."""
    import softprompt

    kw = dict(model=str(llama_dir), data=str(countries_csv), template="Country: {country}\nFacts:",
              target=" capital={capital}", device="cpu", dtype="float32", batch_size=4, max_steps=4, eval_every=0,
              save_every=0, virtual_tokens=3, init="vocab", eval_fraction=0.0)
    script = tmp_path / "train_two.py"
    # Each process writes its own file: two ranks printing to one pipe interleave their lines when stdout is
    # unbuffered (PYTHONUNBUFFERED=1 makes print's text and its newline two writes), as CI once saw.
    script.write_text(f"""import json, os, sys
import torch.distributed as dist
import softprompt

summary = softprompt.train(**{kw!r}, out=sys.argv[1])
with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(summary, f)
dist.destroy_process_group()
""")
    torchrun(fork_python, str(script), str(tmp_path / "OUT2"), str(tmp_path), cwd=tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    written = json.loads((tmp_path / "OUT2" / "summary.json").read_text())
    assert got == [written, written] and written["world_size"] == 2 and written["steps"] == 4
    one = softprompt.train(**kw, out=str(tmp_path / "OUT1"))
    assert one["world_size"] == 1 and one["steps"] == 4
    p1, p2 = (load_prompt(tmp_path / out).embeds.detach() for out in ("OUT1", "OUT2"))
    assert (p1 - p2).abs().max().item() <= 1e-5


def test_two_processes_report_to_tensorboard_and_both_exit_cleanly(fork_python, llama_dir, countries_csv, tmp_path):
    """--report-to under torchrun: the main process logs, every process exits 0."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "OUT"
    torchrun(fork_python, "-m", "softprompt", "train", "--model", str(llama_dir), "--data", str(countries_csv),
             "--template", "Country: {country}\nFacts:", "--target", " capital={capital}", "--device", "cpu",
             "--batch-size", "4", "--max-steps", "2", "--eval-every", "0", "--save-every", "0",
             "--virtual-tokens", "3", "--eval-fraction", "0", "--no-eval-untuned", "--report-to", "tensorboard",
             "--out", str(out), cwd=tmp_path)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # events.out.tfevents.TIME.HOST.PID.N (the scalars', and the hparams' in a folder of its own): one process logs
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, events


def test_every_command_ends_the_process_group_it_ran_under(llama_dir, tmp_path, monkeypatch, capsys):
    """Under torchrun each process must destroy its group before exit: gloo's threads freeing tensors
    after Python is gone aborted a rank that had finished (SIGABRT). A one-process group stands in."""
    import torch.distributed as dist

    from softprompt.cli import main

    monkeypatch.chdir(tmp_path)
    for i, (argv, code) in enumerate([(["eval", "--model", str(llama_dir), "--data", "/no/such.csv", "--text-col",
                                        "t"], 2), (["train", "--help"], 0)]):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{i}'}", rank=0, world_size=1)
        try:
            try:
                got = main(argv)
            except SystemExit as e:  # argparse's --help
                got = e.code
            assert got == code, capsys.readouterr().err
            assert not dist.is_initialized(), f"softprompt {' '.join(argv)} left its process group behind"
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def test_a_rank_without_the_lock_does_not_take_the_holders_files_for_another_run(llama_dir, countries_csv,
                                                                                tmp_path, monkeypatch):
    """CI, once: rank 1 re-checked --out while rank 0, the lock's holder, had its write probe in it, and
    refused "--out already holds files". Made certain here: the holder's probe sits in --out when the
    other rank's Accelerator returns."""
    import accelerate

    from softprompt.core.config import DataConfig, ModelConfig, TrainConfig
    from softprompt.training import train as train_mod

    out = tmp_path / "run"

    class OtherRank:  # what accelerate gives rank 1 once rank 0 has taken the lock and probes the folder
        is_main_process = False

        def __init__(self, **kwargs):
            out.mkdir()
            (out / ".run_config.json.probe-x").write_text("")

    class Reached(Exception):
        pass

    def reached(*args):
        raise Reached

    monkeypatch.setattr(accelerate, "Accelerator", OtherRank)
    monkeypatch.setattr(train_mod, "build_run", reached)
    cfgs = (ModelConfig(model=str(llama_dir), device="cpu"), DataConfig(data=str(countries_csv), template="{country}"),
            PromptConfig(), TrainConfig(out=str(out)))
    with pytest.raises(Reached):
        train_mod.setup(*cfgs)
