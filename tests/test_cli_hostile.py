"""Issue 27, the command line's half: hostile input gets one error line and a non-zero exit, and
never costs the user a file. Each test is named after the defect it pins (N1, N8, ..., L12)."""
import json
import shutil

import pytest
import torch

from softprompt.cli import main
from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.core.utils import SoftpromptError, SoftpromptWarning
from softprompt.prompts.prompt import SoftPrompt, load_prompt, save_prompt
from softprompt.training.rundir import saved_checkpoint
from softprompt.training.train import train


def one_error_line(capsys, *needles: str) -> str:
    """The last command ended on one stderr line, softprompt's error, holding every needle (progress
    bars of a model load may come before it; no traceback does)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("softprompt: error: "), err
    assert not any(l.startswith(("Traceback", "softprompt: error")) for l in err[:-1]), err
    for n in needles:
        assert n in err[-1], (n, err[-1])
    return err[-1]


def tree(folder):
    """Every file under `folder` with its bytes: what must survive a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    import csv

    from conftest import EXAMPLES

    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()]
    p = tmp_path_factory.mktemp("data") / "c.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["country", "capital", "europe"])
        w.writerows([r["country"], r["capital"], int(r["continent"] == "Europe")] for r in rows)
    return p


CLS = ["--template", "Country: {country}\\nEurope:", "--labels", "no,yes", "--label-col", "europe"]


def train_argv(llama_dir, data, out, *extra):
    return ["train", "--model", str(llama_dir), "--device", "cpu", "--data", str(data), *CLS, "--virtual-tokens",
            "3", "--max-steps", "2", "--batch-size", "4", "--eval-every", "0", "--no-eval-untuned", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def run_dir(llama_dir, data_csv, tmp_path_factory):
    """A finished tiny run: prompt, records, metrics, checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(ModelConfig(model=str(llama_dir), device="cpu"),
          DataConfig(data=str(data_csv), template="Country: {country}\\nEurope:", labels="no,yes", label_col="europe"),
          PromptConfig(virtual_tokens=3, init="labels"),
          TrainConfig(out=str(out), max_steps=2, batch_size=4, eval_every=2, save_every=2), quiet=True)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the finished run that a test may damage."""
    return shutil.copytree(run_dir, tmp_path / "run")


# ---------------------------------------------------------------- N1, D10, L10: output folders

def test_N1_export_peft_refuses_non_empty_out(run_dir, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "t.txt").write_text("x")
    assert main(["export-peft", str(run_dir), str(keep)]) == 2
    one_error_line(capsys, str(keep), "already holds files", "--overwrite")
    assert (keep / "t.txt").read_text() == "x"
    # --overwrite replaces a previous export, but never a file export does not write.
    assert main(["export-peft", str(run_dir), str(keep), "--overwrite"]) == 2
    one_error_line(capsys, "t.txt", "not deleting it")
    assert tree(keep) == {"t.txt": b"x"}
    peft = tmp_path / "peft"
    assert main(["export-peft", str(run_dir), str(peft)]) == 0
    assert main(["export-peft", str(run_dir), str(peft)]) == 2
    capsys.readouterr()
    assert main(["export-peft", str(run_dir), str(peft), "--overwrite"]) == 0
    assert (peft / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "peft"]  # nothing left beside them


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_N1_export_peft_refuses_out_at_the_source(run_copy, where, capsys):
    before = tree(run_copy.parent)
    out = {"same": run_copy, "inside": run_copy / "peft", "parent": run_copy.parent}[where]
    assert main(["export-peft", str(run_copy), str(out), "--overwrite"]) == 2
    one_error_line(capsys, "the source", str(run_copy))
    assert tree(run_copy.parent) == before


@pytest.mark.parametrize("flags", [["--init-from"], ["--method", "prompt", "--init", "file", "--init-file"]])
def test_train_refuses_an_out_at_the_prompt_it_starts_from(llama_dir, data_csv, run_copy, flags, capsys):
    """`train --init-from SRC --out SRC --overwrite` deleted the prompt it started from, and its record
    then named itself as its source (hunt 8); an --out inside the source, or around it, is refused too."""
    before = tree(run_copy.parent)
    for out in (run_copy, run_copy / "sub", run_copy.parent):
        assert main(train_argv(llama_dir, data_csv, out, "--overwrite", *flags, str(run_copy))) == 2
        one_error_line(capsys, f"--out {out}", "the source", str(run_copy))
    assert tree(run_copy.parent) == before


def test_N1_import_peft_refuses_a_finished_run_and_the_source(run_dir, run_copy, tmp_path, capsys):
    peft = tmp_path / "peft"
    assert main(["export-peft", str(run_dir), str(peft)]) == 0
    before = tree(run_copy)
    assert main(["import-peft", str(peft), str(run_copy)]) == 2
    one_error_line(capsys, "already holds files")
    assert main(["import-peft", str(peft), str(run_copy), "--overwrite"]) == 2  # metrics.jsonl, checkpoint...
    one_error_line(capsys, "not deleting it")
    assert tree(run_copy) == before
    adapter = tree(peft)
    for out in (peft, peft / "sub"):
        assert main(["import-peft", str(peft), str(out), "--overwrite"]) == 2
        one_error_line(capsys, "the source")
    assert tree(peft) == adapter
    back = tmp_path / "back"
    assert main(["import-peft", str(peft), str(back)]) == 0
    assert main(["import-peft", str(peft), str(back), "--overwrite"]) == 0
    assert torch.equal(load_prompt(back).embeds, load_prompt(run_dir).embeds)


def test_N1_push_local_dir_refuses_non_empty_and_the_run(run_dir, run_copy, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "t.txt").write_text("x")
    assert main(["push", str(run_dir), "me/x", "--local-dir", str(keep)]) == 2
    one_error_line(capsys, "--local-dir", "already holds files")
    before = tree(run_copy)
    assert main(["push", str(run_copy), "me/x", "--local-dir", str(run_copy), "--overwrite"]) == 2
    one_error_line(capsys, "the source")
    assert tree(run_copy) == before and tree(keep) == {"t.txt": b"x"}
    up = tmp_path / "up"
    assert main(["push", str(run_dir), "me/x", "--local-dir", str(up)]) == 0
    assert main(["push", str(run_dir), "me/x", "--local-dir", str(up), "--overwrite"]) == 0
    assert (up / "README.md").is_file()


def test_D10_compare_refuses_an_out_holding_other_files(llama_dir, data_csv, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "t.txt").write_text("x")
    assert main(["compare", "--model", str(llama_dir), "--device", "cpu", "--data", str(data_csv), *CLS,
                 "--methods", "untuned", "--out", str(keep)]) == 2
    one_error_line(capsys, "t.txt", "not deleting it")
    assert tree(keep) == {"t.txt": b"x"}


def test_compare_checks_its_data_before_the_model_loads(data_csv, tmp_path, capsys):
    """A missing file, a missing column or no --data at all: one line before any model loads (here a
    --model that does not exist, which would be named first otherwise). compare loaded the base first."""
    cmd = ["compare", "--model", str(tmp_path / "no-model"), *CLS, "--out", str(tmp_path / "cmp")]
    for data, words in ((["--data", str(tmp_path / "nope.csv")], "missing data file"),
                        (["--data", str(data_csv), "--template", "{nocol}"], "column 'nocol' not found"),
                        ([], "no data given")):
        assert main([*cmd, *data]) == 2
        one_error_line(capsys, words)
    assert not (tmp_path / "cmp").exists()


def test_data_read_no_way_names_its_columns_before_the_model_loads(data_csv, tmp_path, capsys):
    """`train --data FILE` alone loaded the model, then said "say how to read each row" without the
    file's columns; it is now said first, with them. A data folder (read only when loaded) and a file
    with a `label` column are said the same way, the latter with --labels."""
    from softprompt.data.formatting import load_splits

    argv = ["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"), "--data"]
    assert main([*argv, str(data_csv)]) == 2
    one_error_line(capsys, f"say how to read each row of {data_csv} (columns: 'country', 'capital', 'europe'): "
                           "--template 'text with {column}', --text-col COLUMN or --messages-col COLUMN")
    labelled = tmp_path / "l.csv"
    labelled.write_text("sentence,label\ngood,1\n")
    assert main([*argv, str(labelled)]) == 2
    one_error_line(capsys, "(columns: 'sentence', 'label')", "--labels WORD,WORD to classify by its 'label' column")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(data_csv, folder / "train.csv")
    with pytest.raises(SoftpromptError, match=f"say how to read each row of {folder} .columns: 'country', "):
        load_splits(DataConfig(data=str(folder)), tok=None)
    assert not (tmp_path / "run").exists()


def test_L10_export_peft_refuses_a_file_and_leaves_nothing_behind(run_dir, tmp_path, capsys):
    f = tmp_path / "existing_file"
    f.write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["export-peft", str(run_dir), str(f), *extra]) == 2
        one_error_line(capsys, "is a file, not a folder")
    assert f.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["existing_file"]
    # The library's atomic folder itself refuses a file and leaves no hidden sibling.
    from softprompt.core.utils import atomic_dir

    with pytest.raises(SoftpromptError, match="is a file"):
        with atomic_dir(f) as tmp:
            (tmp / "x").write_text("y")
    d = tmp_path / "d"
    d.mkdir()
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "existing_file"] and tree(d) == {"x": b"y"}


def test_export_and_import_write_through_a_linked_folder(run_dir, tmp_path, capsys):
    """OUT may be a link to a folder, as `train --out` may: the folder it names is written and the link
    stays. It was "Is a directory: OUT", and each try left an empty .OUT.old-* folder beside it. Under a
    file, OUT is refused in words that say so."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert main(["export-peft", str(run_dir), str(tmp_path / "link")]) == 0
    (tmp_path / "real2").mkdir()
    (tmp_path / "link2").symlink_to("real2")
    assert main(["import-peft", str(tmp_path / "link"), str(tmp_path / "link2")]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "adapter_config.json").is_file()
    assert (tmp_path / "link2").is_symlink() and (tmp_path / "real2" / "prompt.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "link2", "real", "real2"]
    (tmp_path / "afile").write_text("x")
    assert main(["export-peft", str(run_dir), str(tmp_path / "afile" / "sub")]) == 2  # was "File exists: afile"
    one_error_line(capsys, f"cannot write {tmp_path / 'afile' / 'sub'}: a file stands where a folder of its path goes")


# ---------------------------------------------------------------- N8: --resume with other settings

@pytest.fixture
def half_run(llama_dir, data_csv, tmp_path):
    """A run interrupted after step 2 of 4, its checkpoint at step 2."""
    out = tmp_path / "half"
    s = train(ModelConfig(model=str(llama_dir), device="cpu"),
              DataConfig(data=str(data_csv), template="Country: {country}\\nEurope:", labels="no,yes",
                         label_col="europe"),
              PromptConfig(virtual_tokens=3, init="labels"),
              TrainConfig(out=str(out), max_steps=4, batch_size=4, eval_every=0, save_every=2, eval_untuned=False),
              stop_after=3, quiet=True)
    assert s == {"interrupted_at": 3}
    return out


def test_a_run_stopped_before_its_first_prompt_is_named_so_where_a_prompt_goes(half_run, capsys):
    """eval, generate, inspect and export-peft said "missing prompt file" of a run stopped before it
    saved a prompt, though its checkpoint resumes it (hunt 8)."""
    assert not (half_run / "prompt.safetensors").exists() and (half_run / "checkpoint").is_dir()
    for argv in (["inspect", str(half_run)], ["export-peft", str(half_run), str(half_run.parent / "x")]):
        assert main(argv) == 2
        one_error_line(capsys, f"{half_run} is a train run stopped before it saved a prompt: `softprompt train "
                               f"--config {half_run / 'run_config.json'} --resume --out {half_run}` continues it")


def test_N8_resume_refuses_changed_settings(llama_dir, data_csv, half_run, capsys):
    before = tree(half_run)
    base = ["train", "--model", str(llama_dir), "--device", "cpu", "--data", str(data_csv), "--virtual-tokens", "3",
            "--init", "labels", "--max-steps", "4", "--batch-size", "4", "--eval-every", "0", "--save-every", "2",
            "--no-eval-untuned", "--out", str(half_run), "--resume"]
    swapped = ["--template", "Is {country} in Europe?", "--labels", "yes,no", "--label-col", "europe", "--lr", "0.5"]
    assert main(base + swapped) == 2
    line = one_error_line(capsys, "--resume", "--labels", "--template", "--lr 0.5")
    assert "--max-steps" not in line and "--device" not in line
    assert main(base + ["--text-col", "country"]) == 2  # was: KeyError 'accuracy' after rewriting the records
    one_error_line(capsys, "--text-col 'country'", "--labels")
    assert tree(half_run) == before
    # The run's own settings (and a new --log-every, which only says how it is carried out) still resume.
    assert main(base + ["--log-every", "1", *CLS]) == 0
    assert json.loads((half_run / "summary.json").read_text())["steps"] == 4


# ---------------------------------------------------------------- N9: two runs on one --out

def test_N9_second_train_on_a_held_out_fails(llama_dir, data_csv, tmp_path, capsys):
    from softprompt.training.rundir import RunLock

    out = tmp_path / "run"
    held = RunLock(out)  # what a first run holds while it trains
    assert main(train_argv(llama_dir, data_csv, out)) == 2
    one_error_line(capsys, str(out), "in use by another train run")
    assert tree(out) == {}
    # ... once it has written files too: it said "pass --overwrite to replace it" of a live run (hunt 14).
    (out / "run_config.json").write_text("{}")
    assert main(train_argv(llama_dir, data_csv, out)) == 2
    one_error_line(capsys, str(out), "in use by another train run")
    (out / "run_config.json").unlink()
    held.release()
    assert main(train_argv(llama_dir, data_csv, out)) == 0
    assert (out / "prompt.safetensors").is_file()
    # A run that fails on its input leaves no folder behind the lock made.
    assert main(train_argv(llama_dir, data_csv, tmp_path / "bad", "--label-col", "nope")) == 2
    one_error_line(capsys, "column 'nope' not found")
    assert not (tmp_path / "bad").exists()


def test_an_out_inside_a_folder_another_run_replaces_is_refused(llama_dir, data_csv, tmp_path, capsys):
    """Hunt 14: `train --out A/checkpoint/sub` was accepted, and run A's next checkpoint (a folder
    replaced whole) deleted it without a word; so would A's --overwrite. Refused before any work."""
    assert main(train_argv(llama_dir, data_csv, tmp_path / "A", "--save-every", "1")) == 0
    for inside in ("checkpoint/sub", "checkpoint", "tensorboard/x/y"):
        assert main(train_argv(llama_dir, data_csv, tmp_path / "A" / inside)) == 2, inside
        line = one_error_line(capsys, f"lies inside {tmp_path / 'A' / inside.split('/')[0]}, which the run in "
                                      f"{tmp_path / 'A'} replaces")
        assert "choose an --out outside it" in line
    assert not (tmp_path / "A" / "checkpoint" / "sub").exists() and not (tmp_path / "A" / "tensorboard").exists()
    assert main(train_argv(llama_dir, data_csv, tmp_path / "A" / "beside")) == 0  # a folder of its own is fine


def test_an_out_that_takes_no_file_is_refused_before_the_model_loads(data_csv, tmp_path, capsys, monkeypatch):
    """Hunt 14: an existing read-only --out (a mount) opened, and the run failed only after the model had
    loaded, naming a temporary file. The folder is tried with a file first."""
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    (tmp_path / "ro").mkdir()
    assert main(train_argv(tmp_path / "no-model", data_csv, tmp_path / "ro")) == 2
    one_error_line(capsys, f"--out {tmp_path / 'ro'}: cannot write into the folder (Read-only file system)")


def test_a_log_file_gets_lines_not_progress_bars(llama_dir, data_csv, tmp_path, capsys, monkeypatch):
    """Hunt 14: with stderr in a file (nohup, a batch job), every redraw of tqdm's bars was kept: carriage
    returns and cursor moves, the held-out lines glued behind them. Off a terminal there are no bars,
    and a plain progress line stands for the training bar (every PROGRESS_EVERY_S; here every step)."""
    import softprompt.training.train as train_module

    monkeypatch.setattr(train_module, "PROGRESS_EVERY_S", 0)
    assert main(train_argv(llama_dir, data_csv, tmp_path / "run", "--eval-every", "1", "--eval-untuned")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err, repr(err[:500])
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("step 1/2:")] == ["step 1/2"], err
    assert any(line.startswith("untuned model held-out:") for line in err.splitlines()), err


def test_a_reader_that_leaves_ends_the_command_quietly(llama_dir, capsys, monkeypatch):
    """Hunt 14: `softprompt generate ... | head -c1` said "softprompt: error: Broken pipe" and exited 2;
    a Unix filter whose reader left ends quietly, with SIGPIPE's status (128 + 13)."""
    import errno
    import io
    import sys

    class Gone(io.TextIOBase):
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["generate", "--model", str(llama_dir), "--device", "cpu", "--max-new-tokens", "2", "Chile"]) == 141
    assert "error" not in capsys.readouterr().err


def test_a_pipe_given_as_a_file_is_named_a_pipe(llama_dir, tmp_path, capsys):
    """Hunt 14: `--data <(head dev.tsv)` or `--messages /dev/stdin` said "missing file" of a path that is
    there: a pipe, which softprompt cannot read twice (its check, then the run). Said so."""
    import os

    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    for argv, what in ((["eval", "--data", str(fifo), "--text-col", "t"], "data file"),
                       (["generate", "--messages", str(fifo)], "--messages file")):
        assert main([*argv, "--model", str(llama_dir), "--device", "cpu"]) == 2
        one_error_line(capsys, f"{what} {fifo} is a pipe or a device, not a file", "write it to a file first")


def test_N9_two_installed_commands_on_one_out(llama_dir, data_csv, tmp_path):
    """Started together, exactly one of two `softprompt train` processes on one --out succeeds; the
    other exits 2 with one line, whichever way they interleave."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "softprompt", *train_argv(llama_dir, data_csv, out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert err[-1].startswith("softprompt: error: --out ") and not any("Traceback" in l for l in err), err
    assert ("in use by another train run" in err[-1]) or ("already holds files" in err[-1])
    assert load_prompt(out).length == 3


def test_sigterm_stops_a_run_as_ctrl_c_does(llama_dir, data_csv, tmp_path):
    """SIGTERM (timeout, Slurm, docker stop) ended `softprompt train` with no word and none of the
    cleanup Ctrl-C runs (hunt 8): now one line, exit 143, and a whole checkpoint to resume from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "softprompt", *train_argv(llama_dir, data_csv, out)]
    argv[argv.index("--max-steps") + 1] = "100000"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([*argv, "--save-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc, err = proc.wait(timeout=300), proc.stderr.read().strip().splitlines()
    assert rc == 143 and err[-1] == "softprompt: interrupted (SIGTERM)", err[-3:]
    assert not any("Traceback" in line for line in err)
    assert saved_checkpoint(out) is not None  # whole: what --resume reads
    # A save the signal stopped may leave its temporary checkpoint folder, as a kill does: --resume tidies it.
    assert all(p.name.startswith(".checkpoint.") for p in (*out.iterdir(), *tmp_path.iterdir()) if p.name[0] == ".")


# ---------------------------------------------------------------- N10: prompts longer than the model

@pytest.mark.parametrize("virtual", ["100000", "256", "250"])
def test_N10_train_checks_the_position_limit(llama_dir, data_csv, tmp_path, virtual, capsys):
    """The tiny Llama has 256 positions; every example here is longer than 6 tokens."""
    argv = train_argv(llama_dir, data_csv, tmp_path / "run")
    argv[argv.index("--virtual-tokens") + 1] = virtual
    assert main(argv) == 2
    one_error_line(capsys, f"--virtual-tokens {virtual} + ", "exceed the model's 256 positions")
    assert not (tmp_path / "run").exists()


def test_N10_compare_checks_the_position_limit(llama_dir, data_csv, tmp_path, capsys):
    assert main(["compare", "--model", str(llama_dir), "--device", "cpu", "--data", str(data_csv), *CLS,
                 "--methods", "untuned,prompt", "--virtual-tokens", "8200", "--max-steps", "1",
                 "--out", str(tmp_path / "cmp")]) == 2
    one_error_line(capsys, "--virtual-tokens 8200 + ", "exceed the model's 256 positions")
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------- N11: YAML alias bombs

def alias_bomb(levels: int, width: int = 9) -> str:
    """Each level a list of `width` aliases of the one before: width**levels strings once expanded."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nTrainConfig: {{lr: *l{levels - 1}}}\n"


@pytest.mark.parametrize("levels", [3, 9])
def test_N11_yaml_alias_bomb_is_refused_in_one_short_line(llama_dir, data_csv, tmp_path, levels, capsys):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(alias_bomb(levels))
    assert main([*train_argv(llama_dir, data_csv, tmp_path / "run"), "--config", str(cfg)]) == 2
    # 9**3 strings are few enough to read, and refused as the wrong type; 9**9 are refused unread.
    line = one_error_line(capsys, str(cfg), "expected float" if levels == 3 else "aliases expand to more than")
    assert len(line) < 600
    assert not (tmp_path / "run").exists()


def test_N11_plain_aliases_still_work(tmp_path):
    from softprompt.configfile import read_config

    cfg = tmp_path / "ok.yaml"
    cfg.write_text("base: &b {lr: 0.01, batch_size: 4}\nTrainConfig: *b\nDataConfig: {labels: &w 'no,yes'}\n")
    assert read_config(cfg)["TrainConfig"] == {"lr": 0.01, "batch_size": 4}
    cfg.write_text("a: &a [1, *a]\n")  # an alias inside its own anchor: infinite
    from softprompt.core.utils import SoftpromptError

    with pytest.raises(SoftpromptError, match="aliases expand"):
        read_config(cfg)


# ---------------------------------------------------------------- D3/L1: tracebacks instead of one line

@pytest.mark.parametrize("seed", ["-1", str(2 ** 40), str(2 ** 64 - 1)])
def test_D3_train_seed_out_of_range_is_one_line(llama_dir, data_csv, tmp_path, seed, capsys):
    assert main(train_argv(llama_dir, data_csv, tmp_path / "run", "--seed", seed)) == 2
    one_error_line(capsys, f"--seed {seed}", "4294967295")
    assert not (tmp_path / "run").exists()


def test_D3_generate_64_bit_seed_is_one_line(llama_dir, run_dir, capsys):
    assert main(["generate", "--model", str(llama_dir), "--device", "cpu", "--prompt", str(run_dir), "--sample",
                 "--seed", str(2 ** 64 - 1), "--max-new-tokens", "2", "Country: Chile", "Country: Peru"]) == 2
    one_error_line(capsys, f"--seed {2 ** 64 - 1}", "4294967295")


@pytest.mark.parametrize("device,words", [("tpu", "is not a device name"), ("meta", "holds no values"),
                                          ("cuda:99", "CUDA device")])  # none here; not 100 on a GPU machine
def test_D3_a_device_this_machine_lacks_is_one_line(llama_dir, data_csv, tmp_path, device, words, capsys):
    assert main(train_argv(llama_dir, data_csv, tmp_path / "run", "--device", device)) == 2
    one_error_line(capsys, f"--device {device}", words)
    assert main(["eval", "--model", str(llama_dir), "--device", device, "--data", str(data_csv), *CLS]) == 2
    one_error_line(capsys, f"--device {device}", words)


def test_D3_full_fine_tuning_of_a_quantized_base_is_one_line(llama_dir, data_csv, tmp_path, capsys):
    assert main(train_argv(llama_dir, data_csv, tmp_path / "run", "--method", "full", "--quantize", "8bit")) == 2
    one_error_line(capsys, "--method full trains every weight, and a --quantize 8bit base")
    assert not (tmp_path / "run").exists()


def test_D3_train_huge_lr_is_one_line(llama_dir, data_csv, tmp_path, capsys):
    assert main(train_argv(llama_dir, data_csv, tmp_path / "run", "--lr", "1e308")) == 2
    one_error_line(capsys, "--lr")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_D3_train_unwritable_out_is_one_line(llama_dir, data_csv, tmp_path, where, capsys):
    """Tests run as root, so a chmod'ed folder would be writable: a path under a regular file
    (NotADirectoryError) and one under /proc (refused to everyone) stand for a read-only --out."""
    f = tmp_path / "file"
    f.write_text("x")
    out = f / "run" if where == "under_a_file" else "/proc/softprompt-test/run"
    assert main(train_argv(llama_dir, data_csv, out)) == 2
    one_error_line(capsys, f"--out {out}")
    assert f.read_text() == "x"


def test_D3_full_disk_is_one_line(llama_dir, data_csv, tmp_path, monkeypatch, capsys):
    import errno

    import softprompt.training.train

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(softprompt.training.train, "append_metrics", full)
    assert main(train_argv(llama_dir, data_csv, tmp_path / "run", "--log-every", "1")) == 2
    one_error_line(capsys, "No space left on device", "metrics.jsonl")


@pytest.fixture
def file_size_limit():
    """Writes past 4 KB fail as on a full disk (RLIMIT_FSIZE: EFBIG, its SIGXFSZ ignored); restored after."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def big_prompt(tmp_path):
    return save_prompt(SoftPrompt(torch.randn(64, 32)), tmp_path / "src", {})  # 8 KB of weights


def test_a_failed_tensor_write_is_one_line(tmp_path, big_prompt, file_size_limit, capsys):
    """Hunt 14: a full disk during a checkpoint (torch.save: RuntimeError "unexpected pos") or a prompt
    or PEFT export (safetensors: SafetensorError "I/O error") ended in a traceback: only an OSError was
    one line. Each is now the one line, naming what was written, and leaves no temporary file."""
    from softprompt.core.utils import atomic_dir

    assert main(["export-peft", str(big_prompt), str(tmp_path / "peft")]) == 2
    one_error_line(capsys, f"cannot write {tmp_path / 'peft'} (is the disk full?): ", "I/O error")
    with pytest.raises(SoftpromptError, match=r"prompt.safetensors \(is the disk full\?\): .*I/O error"):
        save_prompt(SoftPrompt(torch.randn(64, 32)), tmp_path / "again", {})
    with pytest.raises(SoftpromptError, match=r"checkpoint \(is the disk full\?\): "):
        with atomic_dir(tmp_path / "checkpoint") as tmp:
            torch.save({"w": torch.randn(64, 32)}, tmp / "optimizer.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "src"]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == []


def test_D3_import_peft_of_a_list_config_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[1, 2]")
    save_file({"prompt_embeddings": torch.zeros(3, 32)}, str(adapter / "adapter_model.safetensors"))
    assert main(["import-peft", str(adapter), str(tmp_path / "out")]) == 2
    one_error_line(capsys, "adapter_config.json must hold a JSON object")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- D9/L6: every command checks a prompt's config

def prompt_with(root, name, config, H=32):
    """A prompt folder whose prompt_config.json is `config` (written as JSON unless a str)."""
    d = save_prompt(SoftPrompt(torch.randn(3, H) * 0.05), root / name, {})
    (d / "prompt_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def generate_argv(llama_dir, prompt):
    return ["generate", "--model", str(llama_dir), "--device", "cpu", "--prompt", str(prompt), "--max-new-tokens",
            "2", "Country: Chile"]


@pytest.mark.parametrize("config,words", [({"labels": 3}, "labels in its"), ({"labels": ["x"]}, "labels in its"),
                                          ({"chat": "false"}, "chat in its"), ({"task": ["a"]}, "task in its"),
                                          ("[1, 2]", "must hold a JSON object")])
def test_D9_cli_runs_the_servers_prompt_config_checks(llama_dir, tmp_path, config, words, capsys):
    p = prompt_with(tmp_path, "p", config)
    assert main(generate_argv(llama_dir, p)) == 2
    one_error_line(capsys, words)
    assert main(["export-peft", str(p), str(tmp_path / "peft")]) == 2
    one_error_line(capsys, words)
    assert not (tmp_path / "peft").exists()


def test_D9_lm_prompt_with_empty_labels_loads(llama_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "lm"
    argv = train_argv(llama_dir, data_csv, out)
    i = argv.index("--template")
    argv[i:i + 6] = ["--text-col", "country"]
    assert main(argv) == 0
    assert json.loads((out / "prompt_config.json").read_text())["labels"] == []
    capsys.readouterr()
    assert main(generate_argv(llama_dir, out)) == 0
    assert "warning" not in capsys.readouterr().err


def test_D9_prompt_of_another_base_warns_once(llama_dir, run_dir, tmp_path, capsys):
    p = prompt_with(tmp_path, "other", {"model": "someone/other-model-with-32-dims"})
    assert main(generate_argv(llama_dir, p)) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
    assert len(warnings) == 1 and "trained for 'someone/other-model-with-32-dims'" in warnings[0], warnings
    assert main(generate_argv(llama_dir, run_dir)) == 0  # its own base: no warning but a classifier's own
    warnings = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
    assert len(warnings) == 1 and "was trained to choose among its label words" in warnings[0], warnings


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_D9_prompt_config_that_is_a_fifo_or_folder_is_an_error(llama_dir, tmp_path, kind, capsys):
    import os

    d = save_prompt(SoftPrompt(torch.randn(3, 32)), tmp_path / "p", {})
    (d / "prompt_config.json").unlink()
    os.mkfifo(d / "prompt_config.json") if kind == "fifo" else (d / "prompt_config.json").mkdir()
    assert main(generate_argv(llama_dir, d)) == 2
    one_error_line(capsys, "prompt_config.json is not a regular file")


# ---------------------------------------------------------------- L7, L8: data files

def test_L7_csv_with_a_utf8_bom_reads_its_first_column(llama_dir, data_csv, tmp_path, capsys):
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + data_csv.read_bytes())
    assert main(train_argv(llama_dir, bom, tmp_path / "run")) == 0  # the template reads {country}, column 1
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"country": c, "europe": i % 2}).encode() + b"\n"
                                                 for i, c in enumerate(["Peru", "Chile", "France", "Spain"] * 3)))
    assert main(train_argv(llama_dir, jsonl, tmp_path / "run2")) == 0


def test_L8_null_text_is_skipped_with_a_warning(llama_dir, tmp_path, capsys):
    from softprompt.data.formatting import load_splits
    from softprompt.base.models import load_model

    rows = [{"sentence": None if i in (2, 6) else f"text {i}", "label": i % 2} for i in range(12)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, tok = load_model(str(llama_dir))
    for how in ({"text_col": "sentence"}, {"template": "Review: {sentence}\\nSentiment:", "labels": "no,yes"}):
        with pytest.warns(SoftpromptWarning) as seen:
            _, train_ex, eval_ex = load_splits(DataConfig(data=str(p), eval_fraction=0, **how), tok, seed=0)
        assert len(train_ex) == 10 and not any("None" in e.text for e in train_ex)
        assert len(seen) == 1 and str(seen[0].message).startswith("skipped 2 row(s) of ")
        assert "null in sentence (rows [3, 7])" in str(seen[0].message)
    p.write_text("".join(json.dumps({"sentence": None}) + "\n" for _ in range(3)))
    assert main(["train", "--model", str(llama_dir), "--data", str(p), "--text-col", "sentence", "--eval-fraction",
                 "0", "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "every row holds null in sentence")


# ---------------------------------------------------------------- L9: templates name plain columns

@pytest.mark.parametrize("template", ["{country.__class__}", "{country:>100000000}", "{country!r}",
                                      "{country[0]}", "Country: {country:{europe}}"])
def test_L9_template_allows_plain_field_names_only(llama_dir, data_csv, tmp_path, template, capsys):
    argv = train_argv(llama_dir, data_csv, tmp_path / "run")
    argv[argv.index("--template") + 1] = template
    assert main(argv) == 2
    one_error_line(capsys, f"--template {template!r}", "plain {name}")
    assert not (tmp_path / "run").exists()
    assert main(["eval", "--model", str(llama_dir), "--device", "cpu", "--data", str(data_csv), "--text-col",
                 "country", "--target", template]) == 2
    one_error_line(capsys, f"--target {template!r}", "plain {name}")


# ---------------------------------------------------------------- L12: adapters no causal prompt stands for

@pytest.mark.parametrize("fields,rows,words", [
    ({"num_virtual_tokens": 3, "num_transformer_submodules": 2}, 6, "num_transformer_submodules is 2"),
    ({"num_virtual_tokens": -3, "num_transformer_submodules": -1}, 3, "num_transformer_submodules is -1"),
    ({"num_virtual_tokens": -3}, 3, "num_virtual_tokens must be a positive integer, got -3"),
    ({"num_virtual_tokens": 3.0}, 3, "num_virtual_tokens must be a positive integer, got 3.0"),
])
def test_L12_import_peft_refuses_encoder_decoder_and_negative_counts(tmp_path, fields, rows, words, capsys):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", **fields}))
    save_file({"prompt_embeddings": torch.randn(rows, 32)}, str(adapter / "adapter_model.safetensors"))
    assert main(["import-peft", str(adapter), str(tmp_path / "out")]) == 2
    one_error_line(capsys, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_D9_config_file_that_is_a_fifo_or_folder_is_an_error(llama_dir, data_csv, tmp_path, kind, capsys):
    import os

    cfg = tmp_path / "c.yaml"
    os.mkfifo(cfg) if kind == "fifo" else cfg.mkdir()
    assert main([*train_argv(llama_dir, data_csv, tmp_path / "run"), "--config", str(cfg)]) == 2
    one_error_line(capsys, f"--config {cfg} is not a regular file")


@pytest.mark.parametrize("init", ["vocab", "labels"])
def test_an_init_a_prefix_cannot_start_from_fails_before_the_model_loads(init, data_csv, tmp_path, capsys):
    # A model path that does not exist: the error must be the --init one, so nothing was loaded
    argv = train_argv(tmp_path / "no-such-model", data_csv, tmp_path / "out", "--method", "prefix", "--init", init)
    assert main(argv) != 0
    one_error_line(capsys, "--method prefix starts from --init text, random, file (or auto)", f"not --init {init}")
    assert not (tmp_path / "out").exists()


def test_a_new_prefix_from_python_refuses_an_init_it_cannot_make(llama_dir):
    from softprompt import get_softprompt_model
    from softprompt.base.models import load_model

    base, tok = load_model(str(llama_dir))
    with pytest.raises(ValueError, match="init='vocab': a new prefix starts from text .* or random"):
        get_softprompt_model(base, method="prefix", init="vocab", virtual_tokens=4, tokenizer=tok)


def test_scoring_rows_past_a_learnt_position_table_is_one_line(tok_dir, tmp_path, capsys):
    """GPT-2 learns a table of 32 positions: train refused a prompt and rows past it, while eval and
    ensemble (and the API's evaluate) indexed past the table, a torch IndexError. They refuse too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import softprompt
    from families import tiny_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok), tok.pad_token_id, tok.eos_token_id,
                                                 n_positions=32)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    for path, words in ((short, 2), (long, 40)):
        path.write_text("".join(json.dumps({"country": "land " * words, "europe": i % 2}) + "\n" for i in range(8)))
    assert main(train_argv(gpt2, short, tmp_path / "p", "--method", "prompt")) == 0
    capsys.readouterr()
    for argv in (["eval", "--model", str(gpt2), "--prompt", str(tmp_path / "p"), "--data", str(long)],
                 ["ensemble", "--model", str(gpt2), "--data", str(long), str(tmp_path / "p"), str(tmp_path / "p")]):
        assert main(argv) == 2
        one_error_line(capsys, "the prompt's 3 virtual token(s) + ", "exceed the model's 32 positions: use a smaller "
                                                                    "--max-length")
    assert main(["eval", "--model", str(gpt2), "--prompt", str(tmp_path / "p"), "--data", str(long),
                 "--max-length", "24"]) == 0  # cut to fit: 3 + 24 + a label token
    with pytest.raises(ValueError, match="exceed the model's 32 positions: use a smaller max_length$"):
        softprompt.evaluate(str(tmp_path / "p"), model=str(gpt2), data=str(long))
