"""Training when things go wrong: a run folder holds one run (refused, replaced, resumed, locked),
Ctrl-C / SIGTERM / kill -9 mid-run, weights-only and mismatched resumes, config values out of
range, non-finite losses, backends and devices that are not there, and the one-line errors of
``stt``."""

import csv
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import pytest
import torch
from test_cli import TINY_YAML
from test_train import TINY, RandomBlobs

from stt_model import cli
from stt_model.checkpoint import load_checkpoint
from stt_model.config import ConfigError, load_config
from stt_model.data import synthetic_volume
from stt_model.run_folder import RunFolder, RunFolderError
from stt_model.train import NonFiniteError, Trainer, TrainOptions, train

# TINY_YAML, but long enough to be interrupted: a checkpoint only at the end or when interrupted.
LONG_YAML = TINY_YAML.replace("iterations: 2", "iterations: 100000").replace(
    "checkpoint_every: 2", "checkpoint_every: 100000"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "vol.h5"
    vol = synthetic_volume((12, 48, 48), seed=3)
    with h5py.File(path, "w") as f:
        f["image"] = vol.image
        f["label"] = vol.labels
    return path


def _config(tmp_path, text=TINY_YAML, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _train_args(volume, run, *extra):
    return ["train", "--image", f"{volume}:image", "--label", f"{volume}:label", "--out", str(run), *extra]


def _error(capsys, command="train"):
    """The one line ``stt <command>`` printed on stderr (progress lines aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("train ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"stt {command}: "), lines[0]
    return lines[0]


def _steps(run):
    with (run / "train_log.csv").open(newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("loss")]


def _leftovers(run):
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == ".lock")


# -- 1. one run per folder -------------------------------------------------------------------


@pytest.mark.parametrize("present", [["last.pt", "train_log.csv"], ["train_log.csv"]])
def test_a_folder_with_a_run_is_refused_before_any_work(tmp_path, capsys, present):
    run = tmp_path / "run"
    run.mkdir()
    for name in present:
        (run / name).write_bytes(b"the earlier run's " + name.encode())
    # A missing --image would be the first thing the work stumbles on: the folder is refused first.
    assert cli.main(_train_args(tmp_path / "missing.h5", run, "--config", str(_config(tmp_path)))) == 2
    line = _error(capsys)
    assert f"{run} already holds a run" in line and "--overwrite" in line
    assert ("--resume" in line) == ("last.pt" in present)
    for name in present:
        assert (run / name).read_bytes() == b"the earlier run's " + name.encode()
    assert sorted(p.name for p in run.iterdir()) == sorted(present)


def test_out_naming_a_file_is_refused(tmp_path, volume, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert cli.main(_train_args(volume, target, "--config", str(_config(tmp_path)))) == 2
    assert "is a file; a run folder is a directory" in _error(capsys)
    assert target.read_text() == "mine"


class Watched(RandomBlobs):
    """RandomBlobs that calls ``before(n)`` ahead of its n-th batch (1-based) and makes the image
    of the steps in ``nan_at`` NaN."""

    def __init__(self, seed, before=None, nan_at=()):
        super().__init__(seed)
        self.before, self.nan_at, self.drawn = before, set(nan_at), 0

    def __iter__(self):
        for image, target in super().__iter__():
            self.drawn += 1
            if self.before is not None:
                self.before(self.drawn)
            if self.drawn in self.nan_at:
                image = image.clone()
                image[0, 0, 0, 3, 4] = float("nan")
            yield image, target


def test_overwrite_replaces_the_old_run_only_at_the_first_new_checkpoint(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 4, "checkpoint_every": 3}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    old_checkpoint, old_log = (tmp_path / "last.pt").read_bytes(), (tmp_path / "train_log.csv").read_bytes()
    assert _steps(tmp_path) == [1, 2, 3, 4]

    seen = []

    def before(n):  # batches 1..3 are drawn before the first new checkpoint (after step 3)
        seen.append(
            (
                (tmp_path / "last.pt").read_bytes() == old_checkpoint,
                (tmp_path / "train_log.csv").read_bytes() == old_log,
            )
        )

    with pytest.raises(RunFolderError, match="already holds a run"):
        train(cfg, RandomBlobs(1), TrainOptions(tmp_path, progress=False))
    result = train(cfg, Watched(1, before), TrainOptions(tmp_path, overwrite=True, progress=False))
    assert seen == [(True, True)] * 3 + [(False, False)]
    assert result.step == 4 and load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert (tmp_path / "last.pt").read_bytes() != old_checkpoint
    assert _steps(tmp_path) == [1, 2, 3, 4]
    assert _leftovers(tmp_path) == []


def test_overwrite_that_fails_before_its_first_checkpoint_leaves_the_old_run(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 4, "checkpoint_every": 3}})
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    old = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "train_log.csv")}
    with pytest.raises(NonFiniteError, match="step 2"):
        train(cfg, Watched(1, nan_at={2}), TrainOptions(tmp_path, overwrite=True, progress=False))
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert _leftovers(tmp_path) == []


def test_a_second_run_in_a_locked_folder_names_the_first_ones_pid(tmp_path, volume, capsys):
    run = tmp_path / "run"
    with RunFolder(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        assert cli.main(_train_args(volume, run, "--config", str(_config(tmp_path)), "--overwrite")) == 2
        line = _error(capsys)
        assert f"in use by another training run (PID {os.getpid()}" in line
    # Released: the lock file is gone and the folder (still empty) with it.
    assert not run.exists()
    assert cli.main(_train_args(volume, run, "--config", str(_config(tmp_path)))) == 0
    assert _leftovers(run) == []


def test_the_next_run_removes_and_names_what_killed_runs_left(tmp_path, volume, capsys):
    run = tmp_path / "run"
    config = _config(tmp_path)
    assert cli.main(_train_args(volume, run, "--config", str(config))) == 0
    for name in (".last.pt.k2x9a1.tmp", ".train_log.csv.replacing.tmp", ".notes.tmp"):
        (run / name).write_bytes(b"partial")
    capsys.readouterr()
    assert cli.main(_train_args(volume, run, "--resume", str(run / "last.pt"), "--iterations", "3")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stt train:")]
    assert notes == [
        f"stt train: removed 2 temporary file(s) a killed run left in {run}: "
        ".last.pt.k2x9a1.tmp, .train_log.csv.replacing.tmp"
    ]
    assert sorted(p.name for p in run.iterdir()) == [".notes.tmp", "last.pt", "train_curves.png", "train_log.csv"]


# -- 2. the log of a resumed run ---------------------------------------------------------------


def test_resume_drops_the_log_rows_of_steps_after_the_checkpoint(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "iterations": 6, "checkpoint_every": 2}})
    # Steps 1-3 run and are logged, step 4 fails: last.pt holds step 2.
    with pytest.raises(NonFiniteError, match="step 4"):
        train(cfg, Watched(1, nan_at={4}), TrainOptions(tmp_path, progress=False))
    assert _steps(tmp_path) == [1, 2, 3]
    with (tmp_path / "train_log.csv").open("a") as handle:
        handle.write("3,0.1")  # a row a kill cut short
    result = train(cfg, RandomBlobs(2), TrainOptions(tmp_path, resume=tmp_path / "last.pt", progress=False))
    assert result.step == 6 and _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert _leftovers(tmp_path) == []


def test_resume_from_another_folder_into_a_run_is_refused(tmp_path):
    cfg = load_config(TINY)
    first = train(cfg, RandomBlobs(0), TrainOptions(tmp_path / "a", max_steps=2, progress=False))
    train(cfg, RandomBlobs(1), TrainOptions(tmp_path / "b", max_steps=2, progress=False))
    log = (tmp_path / "b" / "train_log.csv").read_bytes()
    with pytest.raises(RunFolderError, match="already holds another run"):
        train(cfg, RandomBlobs(0), TrainOptions(tmp_path / "b", resume=first.checkpoint, progress=False))
    assert (tmp_path / "b" / "train_log.csv").read_bytes() == log
    # Into a folder of its own it continues.
    train(cfg, RandomBlobs(0), TrainOptions(tmp_path / "c", resume=first.checkpoint, progress=False))
    assert _steps(tmp_path / "c") == [3, 4, 5, 6]


# -- 3. signals --------------------------------------------------------------------------------


def _sigint_as_in_a_terminal() -> None:
    # A background job (`cmd &` without job control, nohup) starts with SIGINT ignored, and
    # stt respects that; the test's process must get Ctrl-C as a foreground one does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(volume, run, config, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "stt_model.cli", *_train_args(volume, run, "--config", str(config), *extra)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )


def _wait_for_rows(run, rows, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if len(_steps(run)) >= rows:
                return
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {rows} log rows in {run} after {timeout} s")


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_writes_a_final_checkpoint_and_exits_with_one_line(tmp_path, volume, capsys, signum, code, name):
    run = tmp_path / "run"
    process = _start(volume, run, _config(tmp_path, LONG_YAML))
    try:
        _wait_for_rows(run, 2, process)
        # While it trains, a second run into the folder is refused, naming the first's PID.
        assert cli.main(_train_args(volume, run, "--config", str(_config(tmp_path, LONG_YAML)), "--overwrite")) == 2
        assert f"(PID {process.pid}," in _error(capsys)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stt train: interrupted ({name}); checkpoint {run / 'last.pt'} at step "), last
    step = int(last.rsplit(" ", 1)[1])
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == step and "optimizer" in state
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())
    assert _steps(run) == list(range(1, step + 1))
    assert _leftovers(run) == []


def test_sigterm_unwinds_any_command_like_ctrl_c(monkeypatch, capsys):
    cleaned = []

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal's exception interrupts this
        finally:
            cleaned.append(True)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.COMMANDS, "evaluate", command)
    assert cli.main(["evaluate", "--pred", "p.h5", "--gt", "g.h5"]) == 143
    assert _error(capsys, "evaluate") == "stt evaluate: interrupted (SIGTERM)"
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) is before

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "evaluate", ctrl_c)
    assert cli.main(["evaluate", "--pred", "p.h5", "--gt", "g.h5"]) == 130
    assert _error(capsys, "evaluate") == "stt evaluate: interrupted (Ctrl-C)"


def test_kill_9_at_random_moments_leaves_a_resumable_unlocked_folder(tmp_path, volume, capsys):
    run = tmp_path / "run"
    config = _config(tmp_path, LONG_YAML.replace("checkpoint_every: 100000", "checkpoint_every: 1"))
    moments = random.Random(15)
    for attempt in range(3):
        extra = ["--resume", str(run / "last.pt")] if attempt else []
        process = _start(volume, run, config, *extra)
        try:
            _wait_for_rows(run, len(_steps(run)) + 1 if attempt else 1, process)
            time.sleep(moments.uniform(0.0, 0.5))  # mid-step, mid-checkpoint or mid-log-row
        finally:
            process.kill()
            process.communicate()
        assert process.returncode == -signal.SIGKILL
        assert (run / "last.pt").exists()
    step = load_checkpoint(run / "last.pt")["step"]
    assert cli.main(_train_args(volume, run, "--resume", str(run / "last.pt"), "--iterations", str(step + 2))) == 0
    assert load_checkpoint(run / "last.pt")["step"] == step + 2
    assert _steps(run) == list(range(1, step + 3))
    assert _leftovers(run) == []


# -- 4. what --resume accepts ------------------------------------------------------------------


def test_resume_of_a_weights_only_checkpoint_says_what_is_missing(tmp_path, volume, capsys):
    first = train(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path / "a", max_steps=1, progress=False))
    state = load_checkpoint(first.checkpoint)
    torch.save({"config": state["config"], "model": state["model"]}, tmp_path / "weights.pt")
    assert cli.main(_train_args(volume, tmp_path / "b", "--resume", str(tmp_path / "weights.pt"))) == 2
    line = _error(capsys)
    assert "cannot be resumed: it has no step, optimizer, scheduler, rng, source" in line
    assert not (tmp_path / "b").exists()


def test_resume_with_a_different_config_is_refused_and_with_the_same_accepted(tmp_path, volume, capsys):
    config = _config(tmp_path)
    run = tmp_path / "run"
    assert cli.main(_train_args(volume, run, "--config", str(config))) == 0
    checkpoint = (run / "last.pt").read_bytes()
    other = _config(
        tmp_path, TINY_YAML.replace("warmup: 1", "warmup: 3").replace("batch_size: 1", "batch_size: 2"), "other.yaml"
    )
    capsys.readouterr()
    assert (
        cli.main(
            _train_args(volume, run, "--resume", str(run / "last.pt"), "--config", str(other), "--iterations", "4")
        )
        == 2
    )
    line = _error(capsys)
    assert f"--config {other} differs from the config stored in" in line
    assert "train.batch_size, train.warmup" in line and "train.iterations" not in line
    assert (run / "last.pt").read_bytes() == checkpoint
    assert (
        cli.main(
            _train_args(volume, run, "--resume", str(run / "last.pt"), "--config", str(config), "--iterations", "4")
        )
        == 0
    )
    assert load_checkpoint(run / "last.pt")["step"] == 4 and _steps(run) == [1, 2, 3, 4]


# -- 5. values out of range --------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "grad_clip", -1.0, "train.grad_clip must be > 0"),
        ("train", "grad_clip", 0.0, "train.grad_clip must be > 0"),
        ("train", "lr", float("inf"), "train.lr must be a finite number"),
        ("train", "lr", float("nan"), "train.lr must be a finite number"),
        ("train", "lr", 0.0, "train.lr must be positive"),
        ("train", "lr_gamma", -1.0, r"train.lr_gamma must be in \(0, 1\]"),
        ("train", "lr_gamma", 0.0, r"train.lr_gamma must be in \(0, 1\]"),
        ("train", "lr_gamma", 1.5, r"train.lr_gamma must be in \(0, 1\]"),
        ("train", "warmup", -5, "train.warmup must be >= 0"),
        ("train", "lr_steps", [-1], "train.lr_steps must be non-negative steps in increasing order"),
        ("train", "lr_steps", [5, 5], "train.lr_steps must be non-negative steps in increasing order"),
        ("train", "lr_steps", [6, 3], "train.lr_steps must be non-negative steps in increasing order"),
        ("loss", "dice_weight", -5.0, "loss.dice_weight must be >= 0"),
        ("loss", "adversarial_weight", float("nan"), "loss.adversarial_weight must be a finite number"),
        ("loss", "adversarial_weight", -0.5, "loss.adversarial_weight must be >= 0"),
        ("loss", "lambda1", -1.0, "loss.lambda1 must be >= 0"),
        ("loss", "contour_pos_weight", float("inf"), "loss.contour_pos_weight must be a finite number"),
        ("loss", "contour_pos_weight", -2.0, "loss.contour_pos_weight must be >= 0"),
        ("data", "foreground_bias", float("nan"), "data.foreground_bias must be a finite number"),
    ],
)
def test_config_values_out_of_range_name_the_key(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**TINY, section: {**TINY.get(section, {}), key: value}})


def test_config_edges_that_are_in_range():
    cfg = load_config(
        {
            **TINY,
            "train": {**TINY["train"], "lr_gamma": 1.0, "warmup": 0, "lr_steps": [], "grad_clip": 1e-3},
            "loss": {**TINY["loss"], "dice_weight": 0.0, "adversarial_weight": 0.0, "lambda1": 0.0},
        }
    )
    assert cfg.train.lr_gamma == 1.0 and cfg.train.lr_steps == [] and cfg.loss.adversarial_weight == 0.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--minutes", "-1"], "--minutes must be a time budget > 0 minutes; got -1"),
        (["--minutes", "0"], "--minutes must be a time budget > 0 minutes; got 0"),
        (["--minutes", "nan"], "--minutes must be a time budget > 0 minutes; got nan"),
        (["--iterations", "0"], "--iterations must be >= 1; got 0"),
        (["--config", "{lr_inf}"], "train.lr must be a finite number; got inf"),
    ],
)
def test_cli_numbers_out_of_range_are_one_line(tmp_path, volume, capsys, extra, message):
    lr_inf = _config(tmp_path, TINY_YAML + "  lr: .inf\n", "inf.yaml")
    run = tmp_path / "run"
    assert cli.main(_train_args(volume, run, *[a.format(lr_inf=lr_inf) for a in extra])) == 2
    assert _error(capsys) == f"stt train: error: {message}"
    assert not run.exists()


# -- 6. non-finite values ----------------------------------------------------------------------


def test_nan_in_the_image_is_named_and_the_good_checkpoint_kept(tmp_path):
    cfg = load_config({**TINY, "train": {**TINY["train"], "checkpoint_every": 2}})
    with pytest.raises(NonFiniteError) as caught:
        train(cfg, Watched(0, nan_at={3}), TrainOptions(tmp_path, progress=False))
    message = str(caught.value)
    assert message.startswith("step 3: the segmentation loss (seg) is nan; the batch's image holds 1 NaN/Inf voxels")
    assert f"nothing saved after step 2 ({tmp_path / 'last.pt'})" in message and "train.lr" not in message
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def _poison_grad(trainer):
    next(trainer.model.parameters()).register_hook(lambda grad: grad * float("inf"))


def _poison_disc(trainer, when_frozen):
    def hook(module, inputs, output):
        frozen = not next(module.parameters()).requires_grad
        return output * float("nan") if frozen == when_frozen else output

    trainer.disc.register_forward_hook(hook)


@pytest.mark.parametrize(
    "term, poison",
    [
        ("grad_norm", _poison_grad),
        ("d_loss", lambda trainer: _poison_disc(trainer, when_frozen=False)),
        ("adv", lambda trainer: _poison_disc(trainer, when_frozen=True)),
    ],
)
def test_the_term_that_went_non_finite_is_named(tmp_path, term, poison):
    trainer = Trainer(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, progress=False))
    poison(trainer)
    with pytest.raises(
        NonFiniteError,
        match=rf"^step 1: .* \({term}\) is (nan|inf); the image is finite, so "
        r"training diverged .*; no checkpoint of this run was written$",
    ):
        trainer.run()
    assert not (tmp_path / "last.pt").exists()


def test_a_diverging_run_is_one_line_through_the_cli(tmp_path, volume, capsys):
    config = _config(tmp_path, TINY_YAML.replace("iterations: 2", "iterations: 20") + "  lr: 1.0e+30\n")
    assert cli.main(_train_args(volume, tmp_path / "run", "--config", str(config))) == 2
    line = _error(capsys)
    assert line.startswith("stt train: error: step ") and "training diverged" in line


def test_non_finite_weights_are_not_saved_over_a_good_checkpoint(tmp_path):
    trainer = Trainer(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, max_steps=2, progress=False))
    trainer.run()
    good = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with (
        RunFolder(tmp_path, resume=tmp_path / "last.pt") as folder,
        pytest.raises(NonFiniteError, match="holds NaN/Inf; nothing saved after step 2"),
    ):
        trainer.save(folder)
    assert (tmp_path / "last.pt").read_bytes() == good


# -- 7. backends and devices that are not there ------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs where a GPU is visible")
def test_a_backend_that_cannot_run_is_one_line_at_start(tmp_path, volume, capsys):
    config = _config(tmp_path, TINY_YAML.replace("model:\n", "model:\n  backend: cuda\n"))
    run = tmp_path / "run"
    assert cli.main(_train_args(volume, run, "--config", str(config))) == 2
    line = _error(capsys)
    assert "backend 'cuda' cannot run the model's SST attention (model.backend) on cpu tensors" in line
    assert not run.exists()


def test_a_device_that_is_not_there_is_refused(tmp_path):
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        Trainer(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, device="tpu", progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available: no GPU is visible"):
            Trainer(load_config(TINY), RandomBlobs(0), TrainOptions(tmp_path, device="cuda", progress=False))


# -- 8. one-line I/O errors --------------------------------------------------------------------


def test_an_out_below_a_file_names_the_path(tmp_path, volume, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(_train_args(volume, tmp_path / "file" / "run", "--config", str(_config(tmp_path)))) == 2
    assert _error(capsys) == f"stt train: error: {tmp_path / 'file' / 'run'}: Not a directory"


def test_a_folder_that_cannot_be_written_names_the_path(tmp_path, volume, capsys):
    if os.geteuid() == 0:  # root writes into read-only folders, but not into sysfs
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root without a sysfs to be refused by")
        run, restore = "/sys/stt-reliability-run", None
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        run, restore = str(tmp_path / "ro" / "run"), tmp_path / "ro"
    try:
        assert cli.main(_train_args(volume, run, "--config", str(_config(tmp_path)))) == 2
        line = _error(capsys)
        assert line.split(": ")[:3] == ["stt train", "error", run], line
        assert line.rsplit(": ", 1)[1] in ("Permission denied", "Operation not permitted", "Read-only file system")
    finally:
        if restore is not None:
            restore.chmod(0o700)
