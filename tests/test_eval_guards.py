"""eval's guard rails: generation caps within the model's positions, the toy benchmark only with the toy data,
a line when answers are empty."""

from __future__ import annotations

import pytest
from conftest import default_params

from stages.eval import benchmark_tasks, empty_answers, generation_cap
from stages.lib.core.params import validate

ROWS = [{"assistant_masks": [0] * 30 + [1] * 110, "prompt_length": 30},
        {"assistant_masks": [0] * 12 + [1] * 20, "prompt_length": 12}]  # fmt: skip


def test_the_generation_cap_stays_within_the_models_positions():
    assert generation_cap(ROWS, None, None) == (220, None)  # twice the longest answer
    assert generation_cap(ROWS, None, 4096) == (220, None)
    cap, line = generation_cap(ROWS, None, 128)
    assert cap == 98 and line == ("the generation cap (220: twice the longest answer) is lowered to 98: the model has "
                                  "128 positions and the longest prompt takes 30")  # fmt: skip
    cap, line = generation_cap(ROWS, 500, 128)
    assert cap == 98 and line.startswith("eval.max_new_tokens (500) is lowered to 98")


def params_with_sources(sources: list[dict]):
    raw = default_params()
    raw["data"]["sources"] = sources
    return validate(raw)


def test_the_toy_benchmark_runs_with_the_toy_data_only(tmp_path, capsys):
    toy = params_with_sources(default_params()["data"]["sources"])
    assert [t["task"] for t in benchmark_tasks(toy, tmp_path)] == ["toy-choice"]
    mine = params_with_sources([{"kind": "local", "path": "data/sources/mine.jsonl"}])
    assert benchmark_tasks(mine, tmp_path) == []
    assert "eval.benchmarks[0] (toy-choice) skipped: it asks about the built-in toy task's words" in capsys.readouterr().out


@pytest.mark.parametrize("tuned_empty, says", [(0.0, False), (1.0, True)])
def test_empty_answers_are_named(tuned_empty, says):
    metrics = {"samples": 24, "base": {"empty": 0.0}, "tuned": {"empty": tuned_empty}}
    lines = empty_answers(metrics)
    assert bool(lines) == says
    if says:
        assert lines[0].startswith("100% of the tuned model's 24 answers are empty (only stop tokens or <unk>)")
