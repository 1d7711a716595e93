"""Every figure in the README's tables links to a committed result file that records where it came
from, and shows that file's value as rounded; a figure linked from prose must show its value too
(bench/readme_figures.py holds the convention)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from readme_figures import check, shows  # noqa: E402


def test_every_readme_table_figure_is_backed_by_its_result_file():
    problems = check((ROOT / "README.md").read_text(), ROOT)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("text,value", [
    ("1.76x", 1.7612), ("0.171 s", 0.1712), ("86.12%", 0.8612), ("1.3e-16", 1.2846e-16), ("0", 0.0),
    ("7152 tok/s", 7151.6), ("10.3", 10.25), ("2.9e-6", 2.877e-6)])
def test_a_figure_shows_its_value_rounded_as_displayed(text, value):
    assert shows(text, value) == ""


@pytest.mark.parametrize("text,value", [
    ("1.77x", 1.7612), ("0.17 s", 0.1712 * 1.1), ("86.12%", 0.8622), ("1.4e-16", 1.2846e-16), ("1 of 2", 1.0)])
def test_a_wrong_or_ambiguous_figure_is_refused(text, value):
    assert shows(text, value) != ""


def fake_results(root: Path, **extra) -> None:
    doc = {"command": "python bench/x.py", "commit": "abc", "machine": {"cpu": "x86_64"},
           "tasks": [{"speedup": 1.7612, "peft": {"s": 2.0}, "softprompt": {"s": 0.5}}], **extra}
    (root / "bench" / "results").mkdir(parents=True)
    (root / "bench" / "results" / "x.json").write_text(json.dumps(doc))


def test_the_check_reports_an_unlinked_figure_and_a_wrong_value(tmp_path):
    fake_results(tmp_path)
    readme = "\n".join([
        "# t", "",
        "| setting (batch 8, P=20) | figure |",
        "| --- | --- |",
        "| linked and right | [1.76x](bench/results/x.json#tasks.0.speedup) |",
        "| a quotient | [4.0x](bench/results/x.json#tasks.0.peft.s/tasks.0.softprompt.s) in bf16 |",
        "| unlinked | 2.70x |",
        "| wrong value | [1.80x](bench/results/x.json#tasks.0.speedup) |",
        "| missing key | [1.76x](bench/results/x.json#tasks.1.speedup) |",
        "| not measured | |", ""])
    problems = check(readme, tmp_path)
    assert len(problems) == 3, problems
    assert problems[0].startswith("line 7: unlinked figure in '2.70x'")
    assert problems[1].startswith("line 8: '1.80x' does not show 1.7612")
    assert problems[2].startswith("line 9: bench/results/x.json: no key '1'")


def test_the_check_reads_figure_links_in_prose_too(tmp_path):
    fake_results(tmp_path)
    readme = ("Step time fell to [1.76x](bench/results/x.json#tasks.0.speedup) the recipe's, and\n"
              "then to [1.90x](bench/results/x.json#tasks.0.speedup); 3 runs, unlinked prose numbers are fine.\n"
              "See [the file](bench/results/x.json) for more.\n")
    assert check(readme, tmp_path) == ["line 2: '1.90x' does not show 1.7612 (bench/results/x.json#tasks.0.speedup)"]


def test_the_check_wants_the_files_provenance(tmp_path):
    fake_results(tmp_path)
    doc = json.loads((tmp_path / "bench/results/x.json").read_text())
    del doc["commit"]
    (tmp_path / "bench/results/x.json").write_text(json.dumps(doc))
    readme = "| a | b |\n| --- | --- |\n| x | [1.76x](bench/results/x.json#tasks.0.speedup) |\n"
    assert check(readme, tmp_path) == ["line 3: bench/results/x.json records no command and commit "
                                       "(nor a provenance_note)"]
    doc["provenance_note"] = "written before results recorded their commit"
    (tmp_path / "bench/results/x.json").write_text(json.dumps(doc))
    assert check(readme, tmp_path) == []


@pytest.mark.parametrize("script", ["methods.py", "transfer.py"])
def test_a_bench_script_says_a_bad_input_in_one_line(script, run_bench, tmp_path):
    """The benches that run softprompt in their own process ended a SoftpromptError (a missing model,
    too many positions) in a traceback; common.entry prints the one line the commands print."""
    r = run_bench(script, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"softprompt: error: missing model path: {tmp_path / 'none'}"
