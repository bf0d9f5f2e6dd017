"""NEFTune (train.neftune_noise_alpha) where it acts: on the input embeddings of the trainer the train stage builds.

transformers hooks the input embeddings when `train()` starts and unhooks them when it ends; the hook adds uniform
noise of at most alpha / sqrt(tokens x hidden size) to their output, in training mode only. The tests record what
the embeddings hand on during a real (tiny) training run with an evaluation step, and compare it with a plain
embedding lookup of the same ids.
"""

from __future__ import annotations

import math

import pytest
from test_train_labels import make_project


def record_embeddings(records: list):
    """A callback that, once training has begun (after transformers hooked NEFTune in), records each forward pass
    of the input embeddings: (training mode, ids, output)."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, inputs, output):
                records.append((module.training, inputs[0].detach().clone(), output.detach().clone()))

            self.handle = model.get_input_embeddings().register_forward_hook(hook)

        def on_train_end(self, args, state, control, **kwargs):
            self.handle.remove()

    return Record()


def train_and_record(tmp_path, monkeypatch, **train):
    """The stage's trainer (build_trainer) on the tiny project, trained 2 steps with an evaluation after each."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, "bpe", "chatml", max_steps=2, eval_steps=1, **train)
    from stages.lib.core.params import load_params
    from stages.train import build_trainer, resolved_config

    params = load_params()
    records: list = []
    trainer = build_trainer(params, tmp_path / "out", [record_embeddings(records)])
    result = trainer.train()
    return trainer, records, resolved_config(params, trainer, result)


def noise(trainer, ids, output):
    import torch

    return output - torch.nn.functional.embedding(ids, trainer.model.get_input_embeddings().weight)


@pytest.mark.parametrize("packing", [False, True])
def test_neftune_noises_the_embeddings_in_training_steps_only(packing, tmp_path, monkeypatch):
    alpha = 5.0
    trainer, records, config = train_and_record(tmp_path, monkeypatch, neftune_noise_alpha=alpha, packing=packing)
    assert trainer.args.neftune_noise_alpha == alpha
    assert config["params"]["train"]["neftune_noise_alpha"] == alpha  # train_config.json's record
    training = [(ids, out) for mode, ids, out in records if mode]
    evaluation = [(ids, out) for mode, ids, out in records if not mode]
    assert len(training) == 2 and evaluation  # two steps, and validation after each
    for ids, out in training:
        assert out.shape[0] == (1 if packing else 3)  # padding-free packing: the micro-batch is one row
        tokens, width = out.shape[1], out.shape[2]
        bound = alpha / math.sqrt(tokens * width)  # transformers scales by the batch's (padded or packed) length
        found = noise(trainer, ids, out).abs()
        assert 0 < found.max() <= bound * (1 + 1e-6)
        assert found.mean() > bound / 4  # uniform on [-bound, bound]: mean |noise| is bound / 2
    for ids, out in evaluation:
        assert noise(trainer, ids, out).abs().max() == 0
    # once train() returns the hook is gone: a forward in training mode (as merge or a later run would) is plain
    embeddings = trainer.model.get_input_embeddings()
    assert not hasattr(embeddings, "neftune_noise_alpha")
    embeddings.train()
    ids = training[0][0]
    assert noise(trainer, ids, embeddings(ids)).abs().max() == 0


def test_without_neftune_the_training_embeddings_are_plain(tmp_path, monkeypatch):
    trainer, records, config = train_and_record(tmp_path, monkeypatch)
    assert config["params"]["train"]["neftune_noise_alpha"] is None
    training = [(ids, out) for mode, ids, out in records if mode]
    assert training and all(noise(trainer, ids, out).abs().max() == 0 for ids, out in training)
