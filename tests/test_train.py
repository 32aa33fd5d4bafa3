"""Training: steps run and learn, checkpoints are atomic and resume bit-exactly, DDP on
two CPU processes matches one process with the doubled batch."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stt_model.checkpoint import atomic_save, load_checkpoint
from stt_model.config import load_config
from stt_model.train import TrainOptions, lr_factor, train

TINY = {
    "base": "tiny-cpu",
    "model": {"channels": [4, 8], "heads": [1, 2], "sst_levels": [False, True]},
    "data": {"patch": [2, 16, 16]},
    "loss": {"discriminator_channels": 4},
    "train": {"batch_size": 1, "iterations": 6, "warmup": 2, "lr_steps": [4], "val_every": 3, "checkpoint_every": 100},
}


class RandomBlobs:
    """Batches of noisy bright squares on a dark background, with their masks; seeded, resumable."""

    def __init__(self, seed: int, batch: int = 1, shape=(2, 16, 16), rank: int = 0):
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self.batch, self.shape = batch, shape

    def __iter__(self):
        while True:
            t, h, w = self.shape
            corner = torch.randint(0, h // 2, (self.batch, 2), generator=self.generator)
            mask = torch.zeros(self.batch, 1, t, h, w)
            for i, (y, x) in enumerate(corner.tolist()):
                mask[i, :, :, y : y + h // 2, x : x + w // 2] = 1
            image = mask * 0.6 + 0.2 + 0.05 * torch.randn(mask.shape, generator=self.generator)
            contour = torch.zeros_like(mask)
            yield image, torch.cat([mask, contour], dim=1)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def test_adversarial_weight_ramps_up_over_its_warmup(tmp_path):
    """The logged loss of every step is seg + lambda_t * adv with lambda_t = 0.5 * min(1, t / 4)."""
    import csv

    cfg = load_config({**TINY, "loss": {**TINY["loss"], "adversarial_warmup": 4}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert len(rows) == 6
    for row in rows:
        step, seg, adv, loss = int(row["step"]), float(row["seg"]), float(row["adv"]), float(row["loss"])
        assert loss == pytest.approx(seg + 0.5 * min(1.0, step / 4) * adv, rel=1e-5, abs=1e-6), step
    with pytest.raises(ValueError, match="loss.adversarial_warmup must be >= 0"):
        load_config({**TINY, "loss": {**TINY["loss"], "adversarial_warmup": -1}})


@pytest.mark.parametrize(
    "objective,binary,output",
    [("minimax", False, "volume"), ("non_saturating", True, "volume"), ("non_saturating", True, "patch")],
)
def test_adversarial_variants_train_and_log_their_generator_loss(tmp_path, objective, binary, output):
    """The logged adv is what the network minimised: with a binarised prediction the
    discriminator still gets the gradient of every voxel through the straight-through path."""
    import csv

    loss = {
        **TINY["loss"],
        "adversarial_objective": objective,
        "discriminator_binary": binary,
        "discriminator_output": output,
    }
    cfg = load_config({**TINY, "loss": loss, "train": {**TINY["train"], "iterations": 3}})
    result = train(cfg, RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    advs = [float(row["adv"]) for row in rows]
    if objective == "non_saturating":
        assert all(a > -1.0 for a in advs)  # -log D - lambda1 D >= -lambda1 = -1
    with pytest.raises(ValueError, match="loss.adversarial_objective must be one of"):
        load_config({**TINY, "loss": {**TINY["loss"], "adversarial_objective": "wgan"}})


def test_lr_schedule():
    assert lr_factor(0, 4, [10], 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, [10], 0.1) == 1.0
    assert lr_factor(10, 4, [10], 0.1) == pytest.approx(0.1)


def test_loss_goes_down_and_logs(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 40, "lr": 3e-3}})
    result = train(cfg, RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    assert result.step == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    header = (tmp_path / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "seg", "adv", "d_loss", "lr"} <= set(header)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 40 and load_config(state["config"]) == cfg


def test_resume_is_bit_exact(tmp_path):
    cfg = load_config(TINY)
    straight = train(cfg, RandomBlobs(1), TrainOptions(tmp_path / "a", progress=False))
    first = train(cfg, RandomBlobs(1), TrainOptions(tmp_path / "b", max_steps=3, progress=False))
    # A fresh source (as after a crash): its state comes back from the checkpoint.
    second = train(cfg, RandomBlobs(99), TrainOptions(tmp_path / "b", resume=first.checkpoint, progress=False))
    assert first.losses + second.losses == straight.losses
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_with_another_model_config_is_refused(tmp_path):
    first = train(load_config(TINY), RandomBlobs(1), TrainOptions(tmp_path, max_steps=1, progress=False))
    other = load_config({**TINY, "model": {**TINY["model"], "channels": [4, 12]}})
    with pytest.raises(ValueError, match="trained with another model config"):
        train(other, RandomBlobs(1), TrainOptions(tmp_path, resume=first.checkpoint, progress=False))


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 10_000}})
    result = train(cfg, RandomBlobs(0), TrainOptions(tmp_path, time_budget=0.0, progress=False))
    assert result.step == 1 and result.checkpoint is not None


def test_validation_is_called(tmp_path):
    calls = []

    def validate(model):
        calls.append(model.training)
        return {"jaccard": 0.5}

    result = train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, validate=validate, progress=False))
    assert calls == [False, False] and result.metrics == {"jaccard": 0.5}
    assert "val_jaccard" in (tmp_path / "train_log.csv").read_text().splitlines()[0]


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_save({"model": {}, "config": {}}, target)
    before = target.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Unpicklable()}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_bad_checkpoints_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable stt checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.slow
def test_ddp_two_processes_match_one_with_double_batch(tmp_path):
    """Two gloo ranks with batch 1 each take the same step as one process with both samples."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import RandomBlobs, TINY
        from stt_model.config import load_config
        from stt_model.train import Trainer, TrainOptions
        cfg = load_config({{**TINY, "loss": {{**TINY["loss"], "adversarial_weight": 0.0}}}})
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        sources = [iter(RandomBlobs(5, rank=r)) for r in range(2)]
        trainer = Trainer(cfg, RandomBlobs(5), TrainOptions({str(tmp_path)!r} + f"/{{world}}", progress=False))
        if world == 1:
            pairs = [next(s) for s in sources]
            image, target = (torch.cat(x) for x in zip(*pairs))
        else:
            image, target = next(sources[rank])
        trainer.train_step(image, target)
        if rank == 0:
            torch.save(trainer.model.state_dict(), {str(tmp_path)!r} + f"/weights{{world}}.pt")
    """)
    path = tmp_path / "ddp_step.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"weights{w}.pt", weights_only=True) for w in (1, 2))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
