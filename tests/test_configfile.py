"""Config files (`--config FILE.yaml|json`): a run's run_config.json replays it bit for bit, flags
override the file, a command's own flags sit under its name, and a bad file is one error line."""
import json

import pytest
import torch
from safetensors.torch import load_file

from softprompt.cli import main


def _train_argv(llama_dir, data, out):
    return ["train", "--model", str(llama_dir), "--device", "cpu", "--data", str(data),
            "--template", "Country: {country}\\nEurope:", "--labels", "no,yes", "--label-col", "europe",
            "--virtual-tokens", "3", "--max-steps", "3", "--batch-size", "4", "--eval-every", "2", "--lr", "0.05",
            "--seed", "3", "--out", str(out)]


def test_run_config_replays_the_run_bit_for_bit(llama_dir, countries_csv, tmp_path):
    assert main(_train_argv(llama_dir, countries_csv, tmp_path / "a")) == 0
    cfg = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert cfg["forward_path_taken"] and cfg["device"] == "cpu"  # top-level records, ignored on replay
    assert main(["train", "--config", str(tmp_path / "a" / "run_config.json"), "--out", str(tmp_path / "b")]) == 0
    a, b = (load_file(tmp_path / run / "prompt.safetensors") for run in "ab")  # the default: a prefix's one tensor
    assert a.keys() == b.keys() and len(a) == 1 and cfg["TrainConfig"]["method"] == "prefix"
    a, b = next(iter(a.values())), next(iter(b.values()))
    assert a.numpy().tobytes() == b.numpy().tobytes()
    # The replay's own record is the original's but for where it was written.
    again = json.loads((tmp_path / "b" / "run_config.json").read_text())
    again["TrainConfig"]["out"] = cfg["TrainConfig"]["out"]
    # The original resolved --method auto; the replay's config names that method.
    assert cfg["method_reason"].startswith("auto:") and again.pop("method_reason") == "as requested"
    cfg.pop("method_reason")
    assert again == cfg
    # Without --out the replay would write into the original's folder: refused, nothing lost.
    assert main(["train", "--config", str(tmp_path / "a" / "run_config.json")]) == 2
    assert torch.equal(next(iter(load_file(tmp_path / "a" / "prompt.safetensors").values())), a)


def test_yaml_sections_command_flags_and_overrides(llama_dir, countries_csv, tmp_path, capsys):
    f = tmp_path / "eval.yaml"
    f.write_text(f"""
ModelConfig: {{model: {llama_dir}, device: cpu}}
DataConfig:
  data: {countries_csv}
  template: "Country: {{country}}\\nEurope:"
  labels: no,yes
  label_col: europe
  limit: 20
TrainConfig: {{lr: 0.5}}     # a section eval does not take: ignored
eval: {{json: true, batch_size: 7}}
notes: anything at the top level is ignored
""")
    assert main(["eval", "--config", str(f)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 20 and m["data"] == str(countries_csv)
    assert main(["eval", "--config", str(f), "--limit", "5"]) == 0  # the flag wins
    assert json.loads(capsys.readouterr().out)["n"] == 5


def test_a_data_source_typed_over_the_file_drops_the_file_s_split_of_its_own(llama_dir, countries_csv, tmp_path,
                                                                             capsys):
    """A file's split, config and eval split describe its own data source (examples/sst2.yaml: a Hub
    dataset's validation split). `--data`/`--eval-data` typed over it read their own rows: the documented
    offline override of local files is not refused for a split they do not have. The same flags typed,
    or set in one file beside a local file, are refused: a local file is read whole."""
    hub = tmp_path / "hub.yaml"
    hub.write_text(f"""
ModelConfig: {{model: {llama_dir}, device: cpu}}
DataConfig: {{data: someone/dataset, data_config: cfg, split: "train[:90%]", eval_split: validation,
              template: "{{country}}"}}
PromptConfig: {{virtual_tokens: 3}}
TrainConfig: {{out: {tmp_path / "run"}, max_steps: 1, batch_size: 2, method: prompt, eval_untuned: false}}
""")
    local = ["--data", str(countries_csv), "--eval-data", str(countries_csv), "--eval-limit", "2"]
    assert main(["train", "--config", str(hub), *local]) == 0
    data = json.loads((tmp_path / "run" / "run_config.json").read_text())["DataConfig"]
    assert (data["split"], data["data_config"], data["eval_split"]) == ("train", "", "")
    for extra, flag in ((["--eval-split", "validation"], "--eval-split validation: --eval-data"),
                        (["--split", "train[:90%]"], "--split train[:90%]: --data")):
        capsys.readouterr()
        assert main(["train", "--config", str(hub), *local, *extra, "--out", str(tmp_path / "x")]) == 2
        assert f"{flag} {countries_csv} is a local file, read whole" in capsys.readouterr().err
    both = tmp_path / "both.yaml"
    both.write_text(f"DataConfig: {{data: {countries_csv}, eval_data: {countries_csv}, eval_split: test}}\n")
    assert main(["train", "--config", str(both), "--model", str(llama_dir), "--template", "{country}",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--eval-split test: --eval-data" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_mix_typed_over_a_file_s_mixture_replaces_it(llama_dir, countries_csv, tmp_path):
    """Flags override the file: a --mix typed is the mixture, where argparse appended it to the file's."""
    task = {"data": str(countries_csv), "template": "{capital}", "labels": "no,yes", "label_col": "europe"}
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"DataConfig": {"mix": [task, task]}}))
    argv = _train_argv(llama_dir, countries_csv, tmp_path / "run")
    argv[argv.index("--max-steps") + 1] = "1"
    assert main([*argv, "--config", str(f), "--mix", json.dumps({**task, "template": "{country}"})]) == 0
    mix = json.loads((tmp_path / "run" / "run_config.json").read_text())["DataConfig"]["mix"]
    assert [t["template"] for t in mix] == ["{country}"]


@pytest.mark.parametrize("text,msg", [
    ('{"DataConfig": {"dataa": "x.csv"}}', "--config {f}: DataConfig: unknown key 'dataa' (known: "),
    ('{"DataConfig": {"max_length": "many"}}', "--config {f}: DataConfig.max_length: expected int, got 'many'"),
    ('{"DataConfig": {"max_length": 2.5}}', "--config {f}: DataConfig.max_length: expected int, got float 2.5"),
    ('{"DataConfig": {"chat": "false"}}', "--config {f}: DataConfig.chat: expected bool, got str 'false'"),
    ('{"DataConfig": {"mix": {"data": "x.csv"}}}', "--config {f}: DataConfig.mix: expected list, got dict {{'data': "),
    ('{"DataConfig": [1]}', "--config {f}: DataConfig: expected a mapping"),
    ('{"TrainingConfig": {}}', "--config {f}: unknown section 'TrainingConfig' (known: ModelConfig, "),
    # spelt otherwise, a section was ignored without a word and its values (max_length: 3) unused
    ('{"data_config": {"max_length": 3}}', "--config {f}: unknown section 'data_config' (DataConfig? known: "),
    ('{"Data": {"max_length": 3}}', "--config {f}: unknown section 'Data' (DataConfig? known: "),
    ('{"modelconfig": {}}', "--config {f}: unknown section 'modelconfig' (ModelConfig? known: "),
    ('{"eval": {"promt": "x"}}', "--config {f}: eval: unknown key 'promt'"),
    # A misspelt command section was ignored, and eval scored the untuned model; notes stay free.
    ('{"evaluate": {"prompt": "x"}, "notes": {"by": "me"}}', "--config {f}: unknown section 'evaluate' (a "
     "command's flags sit under its name: train, eval, generate"),
    ('[1, 2]', "--config {f}: expected a mapping of sections"),
    ('{"DataConfig": ', "--config: corrupt JSON in {f}"),
])
def test_a_bad_file_is_one_error_line(tmp_path, capsys, text, msg):
    f = tmp_path / "c.json"
    f.write_text(text)
    assert main(["eval", "--config", str(f), "--text-col", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softprompt: error: " + msg.format(f=f)), err


def test_a_second_config_file_is_refused(tmp_path, capsys):
    """argparse kept the last --config alone: the first file's values were dropped without a word."""
    f = tmp_path / "c.yaml"
    f.write_text("DataConfig: {max_length: 3}\n")
    assert main(["eval", "--config", str(f), f"--config={f}", "--text-col", "t"]) == 2
    assert capsys.readouterr().err.strip() == "softprompt: error: eval: give --config once (the second file " \
                                              "replaced the first)"


def test_missing_and_unsupported_files(tmp_path, capsys):
    assert main(["eval", "--config", str(tmp_path / "no.yaml")]) == 2
    assert "--config: missing file" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text("")
    assert main(["eval", "--config", str(tmp_path / "c.toml")]) == 2
    assert "expected a .yaml, .yml or .json file" in capsys.readouterr().err


@pytest.mark.parametrize("command,section,message", [
    ("eval", "eval:\n  prompt: 5\n", "eval.prompt: expected str, got int 5"),
    ("generate", "generate:\n  compare: 'no'\n", "generate.compare: expected bool, got str 'no'"),
    ("serve", "serve:\n  prompt: a=runs/a\n", "serve.prompt: expected a list, got str 'a=runs/a'"),
    ("serve", "serve:\n  prompt: [a=runs/a, {b: runs/b}]\n", "serve.prompt.1: expected str, got dict {'b': 'runs/b'}"),
    ("eval", "eval:\n  batch_size: many\n", "eval.batch_size: expected int, got 'many'"),
    ("serve", "serve:\n  version: true\n", "serve: unknown key 'version' (flags of serve that no config section "
                                              "holds: prompt)"),
])
def test_a_command_section_s_values_are_checked_like_its_flags(command, section, message, tmp_path, capsys):
    """A command's own section once passed any value on: an int where a path goes was a traceback, the
    string 'no' turned a switch on, and a string where a list goes was read letter by letter."""
    f = tmp_path / "c.yaml"
    f.write_text(section)
    assert main([command, "--config", str(f), *(["hi"] if command == "generate" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"--config {f}: {message}") and len(err) == 1, err


@pytest.mark.parametrize("command,section,message", [
    ("ensemble", "ensemble:\n  prompts: [runs/a, runs/b]\n",
     "missing prompt file: runs/a/prompt.safetensors (no folder runs/a)"),
    ("inspect", "inspect:\n  prompt_dir: runs/a\n", "missing prompt file: runs/a/prompt.safetensors (no folder runs/a)"),
    ("ensemble", "ensemble:\n  json: true\n", "ensemble: the following arguments are required: DIR"),
])
def test_a_config_file_gives_what_a_command_requires(command, section, message, tmp_path, capsys):
    """A flag or argument the command requires (ensemble's DIRs, inspect's DIR, lm-eval's --tasks)
    comes from the file too: argparse asked for it before the file was read. Still asked for where
    neither gives it."""
    f = tmp_path / "c.yaml"
    f.write_text(section)
    assert main([command, "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message) and len(err) == 1, err


def test_lm_eval_tasks_from_a_config_file(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    f = tmp_path / "c.yaml"
    f.write_text("lm-eval:\n  tasks: no_such_task\n  model_args: prompt=none\n")
    assert main(["lm-eval", "--config", str(f)]) == 2
    assert "--tasks: unknown lm_eval task(s) no_such_task" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sst2.yaml", "awesome-chatgpt-prompts.yaml", "bloomz-560m-classic.yaml"])
def test_shipped_example_configs_are_valid_train_configs(name):
    """Every key of the examples is a flag of `train`, of its type, and the configs pass their checks."""
    from conftest import ROOT

    from softprompt.cli import build_parsers
    from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig, from_args
    from softprompt.configfile import apply_config, read_config

    path = ROOT / "examples" / name
    ap, parsers = build_parsers("train")
    argv = ["train", "--config", str(path)]
    apply_config(parsers["train"], "train", ap.parse_args(argv))
    args = ap.parse_args(argv)
    for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig):
        cfg = from_args(cls, args)
        for key, value in read_config(path).get(cls.__name__, {}).items():
            assert getattr(cfg, key) == value, (cls.__name__, key)
    if name != "sst2.yaml":  # PEFT's PromptTuning recipes, whose figures are a soft prompt's: not auto's prefix
        assert from_args(TrainConfig, args).method == "prompt"


def test_a_command_section_key_is_its_flag_s_name(tmp_path, capsys):
    """generate's `template:` is --template (its dest is input_template, which the section took alone);
    `no_chat:` is no key: --no-chat is chat's false, which `chat: false` says."""
    from softprompt.cli import build_parsers
    from softprompt.configfile import apply_config

    f = tmp_path / "g.yaml"
    f.write_text("generate:\n  template: 'Country: {country}'\n  raw: false\n")
    ap, parsers = build_parsers("generate")
    argv = ["generate", "--config", str(f), "Chile"]
    apply_config(parsers["generate"], "generate", ap.parse_args(argv))
    args = ap.parse_args(argv)
    assert (args.input_template, args.raw) == ("Country: {country}", False)
    f.write_text("generate:\n  no_chat: true\n")
    assert main(["generate", "--config", str(f), "Chile"]) == 2
    err = capsys.readouterr().err
    assert "generate: unknown key 'no_chat' (flags of generate that no config section holds: " in err
    assert " template," in err and "input_template" not in err
