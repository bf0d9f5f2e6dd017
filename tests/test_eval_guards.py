"""eval's guard rails: generation caps within the model's positions, the toy benchmark only with the toy data,
a line when answers are empty."""

from __future__ import annotations

import pytest
from conftest import default_params

from stages.eval import benchmark_tasks, empty_answers, generation_caps
from stages.lib.core.params import validate

ROWS = [{"assistant_masks": [0] * 30 + [1] * 110, "prompt_length": 30},
        {"assistant_masks": [0] * 12 + [1] * 20, "prompt_length": 12}]  # fmt: skip


def test_each_answer_is_capped_at_twice_its_reference_and_within_the_models_positions():
    assert generation_caps(ROWS, None, None) == ([220, 40], None)  # twice each row's own answer
    assert generation_caps(ROWS, None, 4096) == ([220, 40], None)
    caps, line = generation_caps(ROWS, None, 128)
    assert caps == [220, 40] and line == ("1 of 2 prompts leave fewer positions than their cap (twice their reference "
                                          "answer): the model has 128 positions, and their answers stop where the "
                                          "positions end")  # fmt: skip
    caps, line = generation_caps(ROWS, 100, 128)
    assert caps == [100, 100] and line.startswith("1 of 2 prompts leave fewer positions than eval.max_new_tokens (100)")


def test_generation_never_asks_for_more_positions_than_the_model_has():
    """A tiny Llama of 40 positions: each batch generates at most what its longest prompt leaves, and a short prompt
    is not held to a long one's room (sorted batches)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.eval import generate
    from stages.lib.data.toy_task import toy_zh_en
    from test_tokenize import encoded, params_with
    from stages.download import train_tokenizer

    tokenizer = train_tokenizer([v for r in toy_zh_en(0) for v in r.values()], 600)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    enc = encoded([{"instruction": "red cat " * 5, "output": "猫"}, {"instruction": "cat", "output": "猫"}],
                  params_with("chatml"), tokenizer)  # fmt: skip
    rows = [{"input_ids": i, "prompt_length": p} for i, p in zip(enc["input_ids"], enc["prompt_length"])]
    caps = [100, 100]
    calls = []
    real = model.generate
    model.generate = lambda **kw: calls.append((kw["input_ids"].shape[1], kw["max_new_tokens"])) or real(**kw)
    answers, cut = generate(model, tokenizer, rows, 1, caps, [tokenizer.eos_token_id], context=40)
    assert len(answers) == 2 and all(p + n <= 40 for p, n in calls) and max(n for _, n in calls) > min(n for _, n in calls)


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
        assert lines[0].startswith("100% of the tuned model's 24 answers are empty (only stop tokens, whitespace or <unk>)")
