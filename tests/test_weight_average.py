"""The weight average (train.ema_decay): its arithmetic, what checkpoints hold, exact resume."""

import pytest
import torch
from test_train import TINY, RandomBlobs
from torch import nn

from stt_model.checkpoint import load_checkpoint
from stt_model.config import ConfigError, load_config
from stt_model.train import TrainOptions, train
from stt_model.weight_average import WeightAverage

EMA = {**TINY, "train": {**TINY["train"], "ema_decay": 0.9}}


def test_average_follows_its_recurrence_and_copies_integer_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    average = WeightAverage(net, decay=0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(25):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(4, 3))  # moves the BatchNorm statistics and its counter
        keep = min(0.9, (1 + average.updates) / (10 + average.updates))
        for name, value in net.state_dict().items():
            expected[name] = keep * expected[name] + (1 - keep) * value if value.is_floating_point() else value.clone()
        average.update(net)
    for name, value in average.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert average.model.state_dict()["1.num_batches_tracked"] == 25
    assert not any(p.requires_grad for p in average.model.parameters())


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay_is_refused_naming_the_key(decay):
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \[0, 1\)"):
        load_config({**TINY, "train": {**TINY["train"], "ema_decay": decay}})


def test_checkpoint_holds_the_average_as_model_and_resumes_bit_exactly(tmp_path):
    cfg = load_config(EMA)
    scored = []
    straight = train(
        cfg,
        RandomBlobs(1),
        TrainOptions(tmp_path / "a", progress=False, validate=lambda m: scored.append(m) or {"jaccard": 0.0}),
    )
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    assert a["weight_average"] == {"updates": 6, "decay": 0.9}
    assert set(a["model"]) == set(a["training_model"])
    moved = [
        k
        for k in a["model"]
        if a["model"][k].is_floating_point() and not torch.equal(a["model"][k], a["training_model"][k])
    ]
    assert moved, "the average equals the trained weights"
    # Validation scored the average, not the network being trained.
    assert all(not m.training for m in scored)
    for name, value in scored[-1].state_dict().items():
        assert torch.equal(value, a["model"][name]), name

    first = train(cfg, RandomBlobs(1), TrainOptions(tmp_path / "b", max_steps=4, progress=False))
    second = train(cfg, RandomBlobs(7), TrainOptions(tmp_path / "b", resume=first.checkpoint, progress=False))
    assert first.losses + second.losses == straight.losses
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    for key in ("model", "training_model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


def test_resuming_a_run_without_an_average_starts_one_from_its_weights(tmp_path):
    first = train(load_config(TINY), RandomBlobs(1), TrainOptions(tmp_path, max_steps=3, progress=False))
    train(load_config(EMA), RandomBlobs(1), TrainOptions(tmp_path, resume=first.checkpoint, progress=False))
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 6 and state["weight_average"]["updates"] == 3
