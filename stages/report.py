"""Results at a glance, in a terminal: `python -m stages.report` (this workspace's base vs tuned model) and
`python -m stages.report --exps` (every experiment, one row each).

    python -m stages.report               # base vs tuned: every score, per benchmark, train and validation loss
    python -m stages.report --exps        # experiments: changed params, tuned scores (DVC: `dvc exp show --json`)
    python -m stages.report --exps -A     # ... of every commit too (other arguments go to `dvc exp show`)

Tables fit the terminal (120 columns when it is not one, or `--width`): columns that do not fit are dropped, least
useful first, and the table says how many. It reads the files the stages wrote and what DVC records; it writes
nothing. `dvc metrics show` prints the headline scores (metrics/base.json, metrics/tuned.json, metrics/train.json),
`dvc metrics diff <a> <b>` their changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from stages import eval as eval_stage
from stages.lib.core.errors import UserError, run_stage
from stages.lib.report import experiments
from stages.lib.report.table import Column, change, number, render

METRICS = Path("metrics")
# rows of the workspace table: metrics/eval.json key, what it is
SCORES = (
    ("loss", "answer loss on the validation rows (answer tokens only)"),
    ("perplexity", "exp(answer loss)"),
    ("exact_match", "answers equal to the reference"),
    ("rouge_l", "character ROUGE-L of the answers"),
    ("bleu", "BLEU, 0-100 (sacrebleu)"),
    ("chrf", "chrF, 0-100 (sacrebleu)"),
    ("cut_by_cap", "answers that reached the generation cap"),
    ("empty", "answers that are empty (stop tokens or <unk> only)"),
    ("accuracy", "multiple-choice accuracy, all benchmarks"),
)
HEADLINE = tuple(f"tuned.{k}" for k in eval_stage.HEADLINE)  # the experiment table's scores: the DVC metrics


def width(asked: int | None) -> int:
    """Columns to fit: --width, else the terminal's, else 120 (output to a file or a pipe)."""
    if asked:
        return asked
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return shutil.get_terminal_size((120, 24)).columns
    return 120


def read(name: str) -> dict | None:
    """metrics/<name>.json, or None when the stage that writes it has not run."""
    path = METRICS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}): run `dvc repro` to write it again") from None


def workspace(columns: int) -> list[str]:
    """The workspace's results: base vs tuned per score and benchmark, then training, data, merge and speed."""
    scores = read("eval")
    if scores is None:
        raise UserError("metrics/eval.json does not exist yet: run `dvc repro` (the eval stage writes it)")
    base, tuned = scores["base"], scores["tuned"]
    names, about = [], []
    for key, text in SCORES:
        if key in base or key in tuned:
            names.append(key)
            about.append(text)
    for bench in tuned.get("accuracy_by_benchmark", {}):
        names.append(f"  {bench}")
        about.append("accuracy on this benchmark")
    pairs = [(base.get(k), tuned.get(k)) for k in names if not k.startswith("  ")]
    pairs += [(base["accuracy_by_benchmark"].get(b.strip()), tuned["accuracy_by_benchmark"][b.strip()])
              for b in names if b.startswith("  ")]  # fmt: skip
    train = read("train") or {}
    for key, text in (("train_loss", "last logged training loss"), ("validation_loss", "last validation loss in training")):
        if train.get(key) is not None:
            names.append(key)
            about.append(text)
            pairs.append((None, train[key]))
    table = [Column(("metric",), names, align="<"), Column(("base",), [number(b) for b, _ in pairs]),
             Column(("tuned",), [number(t) for _, t in pairs]), Column(("change",), [change(b, t) for b, t in pairs]),
             Column(("what it is",), about, priority=1, align="<", shortenable=True)]  # fmt: skip
    lines = wrapped(f"base (models/base) vs tuned (models/merged), {scores['samples']} validation samples, "
                    f"generation cap {scores['generation_cap_tokens']} tokens", columns) + [""]
    lines += render(table, columns)
    lines += [""] + [w for line in notes() for w in wrapped(line, columns)]
    return lines


def wrapped(text: str, columns: int) -> list[str]:
    """`text` in lines of at most `columns` characters, continuation lines indented."""
    return textwrap.wrap(text, width=columns, subsequent_indent="  ", break_on_hyphens=False) or [""]


def notes() -> list[str]:
    """One line each for the data, the merge check and the speed, where their files exist."""
    out = []
    data = read("tokenize")
    if data and "train_records" in data:
        out.append(f"data: {data['train_records']} train / {data['validation_records']} validation rows, "
                   f"{data['trained_tokens']} trained tokens, template {data.get('template')} (metrics/tokenize.json)")
    merge = read("merge")
    if merge and merge.get("max_abs_logit_diff") is not None:
        out.append(f"merge: largest logit difference of merged vs base + adapter {number(merge['max_abs_logit_diff'])} "
                   f"(tolerance {number(merge['tolerance'])}; metrics/merge.json)")
    speed = read("train_speed")
    if speed and speed.get("tokens_per_s"):
        out.append(f"speed: {number(speed['tokens_per_s'])} tokens/s in training (metrics/train_speed.json, this "
                   "machine's last run; not versioned)")
    return out


def exps(columns: int, dvc_args: list[str]) -> list[str]:
    """The experiments table: one row per commit and experiment, the params that differ, the tuned scores."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *dvc_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        message = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"`dvc exp show --json {' '.join(dvc_args)}`: {message}")
    rows = experiments.rows(json.loads(proc.stdout or "[]"))
    if not rows:
        return ["no experiments yet: `dvc exp run -S train.learning_rate=1e-4` makes one"]
    # the params that tell experiments apart first (they stay when columns must go), then those of other commits
    mine = [r for r in rows if r.label.startswith("├")]
    params = experiments.changed(rows, "params")
    if len(mine) > 1:
        first = set(experiments.changed(mine, "params"))
        params = [k for k in params if k in first] + [k for k in params if k not in first]
    headers = experiments.short_names(params)
    varying = set(experiments.changed(rows, "metrics"))
    metrics = [k for k in HEADLINE if any(k in r.metrics for r in rows)]
    metrics += [k for k in ("train.train_loss", "train.validation_loss") if k in varying]
    metrics += [k for k in (h.replace("tuned.", "base.") for h in HEADLINE) if k in varying]  # the base changed
    table = [Column(("", "experiment"), [r.label + (f" ({r.state})" if r.state else "") for r in rows], align="<",
                    shortenable=True)]  # fmt: skip
    param_columns = [Column(("params" if i == 0 else "", headers[key]), [number(r.params.get(key)) for r in rows],
                            priority=10 + i, align="<", shortenable=True) for i, key in enumerate(params)]  # fmt: skip
    table += param_columns
    for i, key in enumerate(metrics):
        group, name = key.split(".", 1)
        table.append(Column((group if i == 0 or not metrics[i - 1].startswith(group + ".") else "", name),
                            [number(r.metrics.get(key)) for r in rows], priority=0 if i < 3 else 100 + i))  # fmt: skip
    lines = render(table, columns)
    hidden = [k for k, c in zip(params, param_columns) if not c.width]
    if hidden:
        lines += wrapped(f"changed params not shown: {', '.join(hidden)}", columns)
    full = [f"{headers[k]} = {k}" for k, c in zip(params, param_columns) if c.width and headers[k] != k]
    if full:
        lines += wrapped("params: " + ", ".join(full), columns)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exps", action="store_true", help="one row per experiment (dvc exp show)")
    parser.add_argument("--width", type=int, default=None, help="columns to fit (default: the terminal's, or 120)")
    args, rest = parser.parse_known_args(argv)
    if rest and not args.exps:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (arguments for dvc exp show go with --exps)")
    columns = width(args.width)
    lines = exps(columns, rest) if args.exps else workspace(columns)
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted; no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    run_stage(main)
