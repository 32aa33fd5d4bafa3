"""A run reports itself: train_curves.png beside train_log.csv (redrawn at each validation and at
the end, atomically, the replaced run's kept until the first new checkpoint), TensorBoard events
with --tensorboard, and one clear line when either library is missing."""

import csv
import importlib.util
import sys

import pytest
from PIL import Image
from test_train import TINY, RandomBlobs

import stt_model.train_report as report
from stt_model.config import load_config
from stt_model.train import TrainOptions, train
from stt_model.train_report import CURVES, TensorBoardUnavailable, read_curves


class Scores:
    """A validator whose scores rise by 0.1 at each call, remembering the steps it was called at."""

    def __init__(self, fail_at_call=None):
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("validation crashed")
        return {"jaccard": 0.1 * self.calls, "dsc": 0.2 * self.calls}


def _log_rows(run):
    with (run / "train_log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_read_curves_takes_the_losses_and_scores_of_the_rows_that_have_them(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text(
        "step,seconds,loss,seg,lr,val_jaccard,val_ap75\n"
        "1,0.1,0.9,0.8,0.001,,\n"
        "2,0.2,0.7,0.6,0.001,,\n"
        "2,,,,,0.25,-1.0\n"  # AP undefined: no ground truth instance
        "4,,,,,0.5,0.125\n"
        "3,0.3,0.5"
    )  # a row a kill cut short: no seg, lr
    assert read_curves(log) == {
        "loss": ([1, 2, 3], [0.9, 0.7, 0.5]),
        "seg": ([1, 2], [0.8, 0.6]),
        "val_jaccard": ([2, 4], [0.25, 0.5]),
        "val_ap75": ([4], [0.125]),
    }


def test_curves_are_drawn_at_each_validation_and_at_the_end(tmp_path, monkeypatch):
    drawn = []
    original = report.plot_curves

    def watched(log, out):
        drawn.append(max(int(row["step"]) for row in _log_rows(log.parent)))
        return original(log, out)

    monkeypatch.setattr(report, "plot_curves", watched)
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 7, "val_every": 3}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, validate=Scores(), progress=False))
    assert drawn == [3, 6, 7]  # validations at 3 and 6, the end at 7
    with Image.open(tmp_path / CURVES) as image:
        assert image.format == "PNG" and image.size == (800, 650)  # two panels: losses and scores
    assert not list(tmp_path.glob(".*.tmp"))
    curves = read_curves(tmp_path / "train_log.csv")
    assert curves["val_jaccard"] == ([3, 6], [pytest.approx(0.1), pytest.approx(0.2)])
    assert curves["loss"][0] == list(range(1, 8))


def test_a_run_without_validation_draws_its_losses_alone(tmp_path):
    train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    with Image.open(tmp_path / CURVES) as image:
        assert image.size == (800, 400)


def test_without_matplotlib_the_curves_are_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, validate=Scores(), progress=False))
    assert result.step == 6 and (tmp_path / "last.pt").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert lines == [f"stt train: matplotlib is not installed; {CURVES} is not drawn (pip install matplotlib)"]
    assert not (tmp_path / CURVES).exists()


def test_a_replacing_run_keeps_the_old_curves_until_its_first_checkpoint(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 6, "val_every": 3}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, validate=Scores(), progress=False))
    old = (tmp_path / CURVES).read_bytes()
    # The validation at step 3 runs while the old run is still the folder's; the one at step 6 fails
    # before the first checkpoint: nothing of the old run may have changed.
    with pytest.raises(RuntimeError, match="validation crashed"):
        train(
            cfg, RandomBlobs(1), TrainOptions(tmp_path, overwrite=True, validate=Scores(fail_at_call=2), progress=False)
        )
    assert (tmp_path / CURVES).read_bytes() == old
    train(cfg, RandomBlobs(1), TrainOptions(tmp_path, overwrite=True, validate=Scores(), progress=False))
    assert (tmp_path / CURVES).read_bytes() != old


def test_a_killed_drawing_is_cleaned_up_by_the_next_run(tmp_path):
    tmp_path.joinpath(f".{CURVES}.x1y2z3.tmp").write_bytes(b"half a png")
    train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", CURVES, "train_log.csv"]


# -- TensorBoard ---------------------------------------------------------------------------------


def _scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logs_what_the_csv_log_holds(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 6, "val_every": 3}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, validate=Scores(), progress=False, tensorboard=True))
    scalars = _scalars(tmp_path)
    rows = [row for row in _log_rows(tmp_path) if row["loss"]]
    for column in ("loss", "seg", "adv", "d_loss", "lr", "grad_norm"):
        assert scalars[f"train/{column}"] == [
            (int(r["step"]), pytest.approx(float(r[column]), rel=1e-6)) for r in rows
        ], column
    assert scalars["val/jaccard"] == [(3, pytest.approx(0.1)), (6, pytest.approx(0.2))]


def test_tensorboard_of_a_resumed_run_hides_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 6, "checkpoint_every": 2}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, max_steps=3, progress=False, tensorboard=True))
    # Pretend a crash after step 3: last.pt is step 3's; rewind it to step 2's by rerunning 1-2.
    first = train(cfg, RandomBlobs(0), TrainOptions(tmp_path / "two", max_steps=2, progress=False))
    (tmp_path / "last.pt").write_bytes(first.checkpoint.read_bytes())
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, resume=tmp_path / "last.pt", progress=False, tensorboard=True))
    steps = [step for step, _ in _scalars(tmp_path)["train/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [int(row["step"]) for row in _log_rows(tmp_path) if row["loss"]] == steps


def test_tensorboard_of_a_replaced_run_goes_at_the_first_new_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 4, "checkpoint_every": 3}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, progress=False, tensorboard=True))
    (old_events,) = (tmp_path / "tensorboard").iterdir()
    with pytest.raises(RuntimeError, match="validation crashed"):  # at step 3, before its checkpoint
        train(
            cfg,
            RandomBlobs(1),
            TrainOptions(
                tmp_path,
                overwrite=True,
                progress=False,
                tensorboard=True,
                validate=Scores(fail_at_call=1),
            ),
        )
    assert list((tmp_path / "tensorboard").iterdir()) == [old_events]
    train(cfg, RandomBlobs(1), TrainOptions(tmp_path, overwrite=True, progress=False, tensorboard=True))
    assert old_events not in list((tmp_path / "tensorboard").iterdir())
    new_loss = [float(row["loss"]) for row in _log_rows(tmp_path) if row["loss"]]
    assert [value for _, value in _scalars(tmp_path)["train/loss"]] == pytest.approx(new_loss, rel=1e-6)


def _no_tensorboard(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))


def test_tensorboard_asked_for_without_the_package_is_refused_before_any_work(tmp_path, monkeypatch):
    _no_tensorboard(monkeypatch)
    with pytest.raises(TensorBoardUnavailable, match=r"needs the tensorboard package.*pip install tensorboard"):
        train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path / "run", progress=False, tensorboard=True))
    assert not (tmp_path / "run").exists()
    train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path / "run", progress=False))  # not asked: fine


def test_stt_train_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    from stt_model.cli import main

    _no_tensorboard(monkeypatch)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--image",
            str(tmp_path / "missing.h5"),
            "--label",
            str(tmp_path / "missing.h5"),
            "--out",
            str(run),
            "--tensorboard",
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stt ")]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("stt train: error: --tensorboard: TensorBoard logging needs the tensorboard package")
    assert "pip install 'stt-kernels[tensorboard]'" in lines[0] and not run.exists()
