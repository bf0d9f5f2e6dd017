"""What the train stage's trainer actually trains on: labels in its own batches, and the loss it reports.

A small project per tokenizer kind: the tokenize stage's main(), then the train stage's build_trainer(). Every
sample in every batch (padded rows, or packed rows split at their position restarts) must carry labels on its
assistant answers alone, and compute_loss must equal cross-entropy over exactly those tokens, computed here per
sample with a plain forward pass. Independent of the tokenized columns: the expectation comes from the records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizer_kinds as kinds
import yaml
from conftest import ROOT, SHARED_DATA, default_params, write_raw


def make_project(folder: Path, kind: str, template: str | None, layers: int = 1, **train) -> Path:
    """params.yaml, data/raw and models/base (a tiny random Llama of `layers` decoder layers sized to the
    tokenizer), then tokenize."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages import tokenize

    tokenizer = kinds.build(kind, folder / "tok")
    (folder / "recipes").symlink_to(ROOT / "recipes")
    raw = default_params()
    raw["tokenize"] |= {"template": template}
    raw["train"] |= {"batch_size": 3, "epochs": 1, "logging_steps": 1} | train
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    rows = [r["messages"] for r in kinds.records(with_system=template in ("chatml", "tokenizer"))]
    write_raw(folder, rows[2:], rows[:2])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "models" / "base")
    tokenizer.save_pretrained(folder / "models" / "base")
    tokenize.main()  # cwd is `folder`
    return folder


def samples(batch) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per sample: padded rows cut at the attention mask, packed rows at position restarts."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        if "attention_mask" in batch:
            n = int(batch["attention_mask"][row].sum())
            out.append((ids[:n], labels[:n]))
            continue
        pos = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def labelled_runs(tokenizer, labels: list[int]) -> list[str]:
    runs, current = [], []
    for t in labels + [-100]:
        if t != -100:
            current.append(t)
        elif current:
            runs, current = runs + [tokenizer.decode(current, skip_special_tokens=True).strip()], []
    return runs


def manual_loss(model, batch_samples) -> float:
    """Mean cross-entropy over the labelled tokens, each sample through the model on its own."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in batch_samples:
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
            target = torch.tensor(labels[1:], device=model.device)
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


CASES = [  # kind, template, packing, token_metrics
    ("bpe", "chatml", False, False),
    ("bpe", "chatml", True, False),
    ("bpe", "seed", True, True),
    ("sp_eos", "tokenizer", False, True),
    ("sp_bos", "chatml", True, False),
    ("chatglm2", "chatglm2", False, False),
    ("qwen2", "tokenizer", True, False),
    ("llama2", "tokenizer", False, False),
]


@pytest.mark.parametrize("kind, template, packing, token_metrics", CASES)
def test_the_trainer_trains_exactly_the_answers(kind, template, packing, token_metrics, tmp_path, monkeypatch):
    import torch
    from datasets import load_from_disk

    if kind in kinds.SHARED and not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, kind, template, packing=packing, token_metrics=token_metrics)
    from stages.lib.core.params import load_params
    from stages.train import build_trainer

    trainer = build_trainer(load_params(), tmp_path / "out", [])
    tokenizer = trainer.processing_class
    expected = [[a.strip() for a in kinds.answers(r)] for r in kinds.records()]
    seen = 0
    model = trainer.model.eval()
    for batch in trainer.get_train_dataloader():
        found = samples(batch)
        for ids, labels in found:
            assert labelled_runs(tokenizer, labels) in expected, tokenizer.decode(ids)
            seen += 1
        with torch.no_grad():
            reported = trainer.compute_loss(model, batch).item()
        assert reported == pytest.approx(manual_loss(model, found), rel=1e-4)
    assert seen == len(load_from_disk("data/tokenized")["train"])  # every sample, once
