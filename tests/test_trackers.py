"""--report-to: TensorBoard's event files land in the run folder and read back the losses that
metrics.jsonl holds (offline); the run config goes in as hyperparameters; a tracker that is not
installed is one error line before any work."""
import json

import pytest
import yaml

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.core.utils import SoftpromptError
from softprompt.training.train import train


def _cfgs(llama_dir, data, out, **tkw):
    return (ModelConfig(model=str(llama_dir), device="cpu"),
            DataConfig(data=str(data), template="Country: {country}\\nFacts:", target=" capital={capital}",
                       eval_fraction=0.1, max_length=32),
            PromptConfig(virtual_tokens=4, init="vocab"),
            TrainConfig(out=str(out), lr=0.05, batch_size=8, max_steps=6, eval_every=3, save_every=0, log_every=1,
                        warmup_steps=1, **tkw))


def test_tensorboard_reads_back_the_logged_metrics(llama_dir, countries_csv, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(*_cfgs(llama_dir, countries_csv, out, report_to="tensorboard"), quiet=True)
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for split, name in (("train", "loss"), ("train", "lr"), ("eval", "loss"), ("eval_untuned", "loss")):
        want = [(r["step"], r[name]) for r in logged if r["split"] == split]
        got = [(e.step, e.value) for e in events.Scalars(f"{split}/{name}")]
        assert len(want) == len(got) > 0 and [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), (split, name)  # float32
    hparams = next((out / "tensorboard").glob("*/hparams.yml"))
    hp = yaml.safe_load(hparams.read_text())
    assert hp["TrainConfig.lr"] == 0.05 and hp["DataConfig.template"] == "Country: {country}\\nFacts:"
    assert hp["forward_path_taken"] == json.loads((out / "run_config.json").read_text())["forward_path_taken"]
    # --overwrite replaces the run, its tracker files included.
    train(*_cfgs(llama_dir, countries_csv, out, report_to="none", overwrite=True), quiet=True)
    assert not (out / "tensorboard").exists()


def test_a_tracker_that_is_not_installed_fails_before_any_work(llama_dir, countries_csv, tmp_path):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(SoftpromptError, match=r"--report-to wandb: wandb is not installed \(pip install 'softprompt\[wandb\]'\)"):
        train(*_cfgs(llama_dir, countries_csv, tmp_path / "run", report_to="tensorboard,wandb"), quiet=True)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SoftpromptError, match="unknown --report-to 'comet'"):
        TrainConfig(report_to="comet")
