"""Results at a glance: every command the README names for reading results fits 120 columns, on the default run and
on an experiment table of four changed params (python -m stages.report, dvc metrics show / diff)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import ROOT, dvc, run

from stages.lib.report.experiments import short_names
from stages.lib.report.table import Column, number, render

CHANGED = {"eval.max_samples": (12, 16), "eval.batch_size": (4, 8), "eval.max_new_tokens": (20, 24),
           "merge.check_samples": (2, 3)}  # fmt: skip  # merge and eval only: two experiments in about a minute
ROWS = ("see the scores", "compare experiments")


def readme_commands() -> list[str]:
    """The commands of the README rows that read results, as a user copies them."""
    text = (ROOT / "README.md").read_text()
    out = []
    for row in ROWS:
        line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
        out += [c for c in re.findall(r"`([^`]+)`", line) if c.startswith(("python -m stages.report", "dvc metrics"))]
    return out


def shell(command: str, repo, names: tuple[str, str]) -> str:
    """`command` run in `repo` with 120 columns; `<a> <b>` become the two experiments."""
    command = command.replace("<a>", names[0]).replace("<b>", names[1])
    args = command.split()
    if args[:2] == ["python", "-m"]:
        args[0] = sys.executable
    elif args[0] == "dvc":
        args = [sys.executable, "-m", "dvc", *args[1:]]
    return run(args, cwd=repo, env={"COLUMNS": "120"}).stdout


def test_every_readme_results_command_fits_120_columns(default_run):
    repo = default_run.repo
    commands = readme_commands()
    assert any(c == "python -m stages.report" for c in commands) and any("--exps" in c for c in commands)
    names = ("narrow-a", "narrow-b")
    for name, i in zip(names, (0, 1)):
        sets = [f"{k}={v[i]}" for k, v in CHANGED.items()]
        dvc("exp", "run", "--temp", "-n", name, *[a for s in sets for a in ("-S", s)], cwd=repo)
    assert not run(["git", "status", "--porcelain", "params.yaml"], cwd=repo).stdout  # --temp: workspace untouched
    outputs = {c: shell(c, repo, names) for c in commands}
    for command, out in outputs.items():
        widest = max(map(len, out.splitlines()))
        assert widest <= 120, f"{command}: {widest} columns\n{out}"
    report = outputs["python -m stages.report"]
    for key in ("loss", "exact_match", "bleu", "accuracy", "  toy-choice", "train_loss", "validation_loss"):
        assert re.search(rf"^{key}\s", report, re.M), key
    exps = next(out for c, out in outputs.items() if "--exps" in c)
    assert all(f"├ {n}" in exps for n in names)
    for header in ("max_samples", "batch_size", "max_new_tokens", "check_samples", "loss", "exact_match", "bleu"):
        assert header in exps, header
    row = next(line for line in exps.splitlines() if "narrow-a" in line).split()
    assert "12" in row and "4" in row and "20" in row  # its own values, in its row
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    files = next(iter(shown.values()))["data"]
    assert set(files) == {"metrics/tuned.json", "metrics/base.json", "metrics/train.json"}
    assert files["metrics/tuned.json"]["data"].keys() == {"loss", "exact_match", "bleu", "accuracy"}


def test_columns_are_dropped_by_priority_and_said_so():
    columns = [Column(("name",), ["a", "b"], align="<"), Column(("x" * 50,), ["1", "2"], priority=2),
               Column(("y" * 50,), ["3", "4"], priority=1)]  # fmt: skip
    lines = render(columns, 80)
    assert max(map(len, lines)) <= 80 and "y" * 50 in lines[0] and "x" * 50 not in lines[0]
    assert lines[-1].startswith("(1 more column")


@pytest.mark.parametrize("value, text", [(0.4294930395678939, "0.4295"), (84.64806351640445, "84.65"), (0.0, "0"),
                                         (6498.008056214093, "6498"), (1.25e-4, "0.000125"), (None, "-"), (8, "8")])
def test_numbers_are_short(value, text):
    assert number(value) == text


def test_param_headers_are_the_last_unambiguous_part():
    keys = ["train.learning_rate", "train.lora.r", "train.lora.alpha", "eval.batch_size", "train.batch_size"]
    assert short_names(keys) == {"train.learning_rate": "learning_rate", "train.lora.r": "lora.r",
                                 "train.lora.alpha": "alpha", "eval.batch_size": "eval.batch_size",
                                 "train.batch_size": "train.batch_size"}  # fmt: skip
