"""The ``stt`` command end to end on small files: train -> predict -> evaluate, and the
one-line errors for what users get wrong."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from stt_model.cli import main
from stt_model.data import synthetic_volume

TINY_YAML = """base: tiny-cpu
model:
  channels: [4, 8]
  heads: [1, 2]
  sst_levels: [false, true]
data:
  patch: [4, 32, 32]
  augment: false
loss:
  discriminator_channels: 4
train:
  iterations: 2
  batch_size: 1
  warmup: 1
  val_every: 2
  checkpoint_every: 2
"""


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    volume = synthetic_volume((12, 48, 48), seed=3)
    path = folder / "vol.h5"
    with h5py.File(path, "w") as f:
        f["image"] = volume.image
        f["label"] = volume.labels
    return path, volume


def test_train_predict_evaluate(tmp_path, volume_file, capsys):
    path, volume = volume_file
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--image",
                f"{path}:image",
                "--label",
                f"{path}:label",
                "--val-z",
                "8:12",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (run / "last.pt").exists() and "val_jaccard" in (run / "train_log.csv").read_text()

    probs, labels = tmp_path / "probs.h5", tmp_path / "inst.h5"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "last.pt"),
                "--image",
                f"{path}:image",
                "--out",
                str(probs),
                "--instances",
                str(labels),
            ]
        )
        == 0
    )
    with h5py.File(probs) as f:
        assert f["main"].shape == (2, 12, 48, 48) and f["main"].dtype == np.uint8
    capsys.readouterr()
    assert main(["evaluate", "--pred", f"{labels}:main", "--gt", f"{path}:label", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"ap75", "ap50", "ap", "jaccard", "dsc"} <= set(scores)


def _train_tiny(tmp_path, path):
    """Two steps of a tiny config on ``path``; returns the run folder (``last.pt`` inside)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--image",
                f"{path}:image",
                "--label",
                f"{path}:label",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return run


def test_predict_under_torchrun_matches_one_process(tmp_path, volume_file):
    path, volume = volume_file
    run = _train_tiny(tmp_path, path)
    blank = tmp_path / "blank.h5"
    with h5py.File(blank, "w") as f:
        f["image"] = volume.image
        f["image"][3] = 120  # a missing section: both bridge it, the same way
    common = [
        "predict",
        "--checkpoint",
        str(run / "last.pt"),
        "--image",
        f"{blank}:image",
        "--overlap",
        "0.5",
        "--block",
        "8",
        "24",
        "40",
    ]  # 8 blocks, split between the ranks
    assert main([*common, "--out", str(tmp_path / "one.h5")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "stt_model.cli",
            *common,
            "--out",
            str(tmp_path / "two.zarr"),
            "--instances",
            str(tmp_path / "inst.h5"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2 ranks)" in done.stdout and "bridged 1 blank slice at z=3" in done.stderr
    with h5py.File(tmp_path / "one.h5") as f:
        one = f["main"][:]
    two = zarr.open_group(str(tmp_path / "two.zarr"), mode="r")["main"][:]
    np.testing.assert_array_equal(one, two)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blank.h5",
        "inst.h5",
        "one.h5",
        "run",
        "tiny.yaml",
        "two.zarr",
    ]


def test_evaluate_perfect_prediction_from_tiff(tmp_path, volume_file, capsys):
    path, volume = volume_file
    tifffile.imwrite(tmp_path / "gt.tif", volume.labels)
    assert main(["evaluate", "--pred", f"{path}:label", "--gt", str(tmp_path / "gt.tif"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["jaccard"] == 1.0 and scores["dsc"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "--pred", "missing.h5", "--gt", "missing.h5"], "missing.h5"),
        (["evaluate", "--pred", "{path}:nope", "--gt", "{path}:label"], "nope"),
        (["evaluate", "--pred", "{path}:image", "--gt", "{other}"], "shape"),
        (["evaluate", "--pred", "{txt}", "--gt", "{path}:label"], "notes.txt"),
        (
            ["train", "--image", "{path}:image", "--label", "{path}:label", "--out", "{tmp}/r", "--val-z", "5"],
            "--val-z must look like z0:z1",
        ),
        (
            ["train", "--config", "nope", "--image", "{path}:image", "--label", "{path}:label", "--out", "{tmp}/r"],
            "unknown config 'nope'",
        ),
        (
            ["predict", "--checkpoint", "{txt}", "--image", "{path}:image", "--out", "{tmp}/p.h5"],
            "not a readable stt checkpoint",
        ),
    ],
)
def test_errors_are_one_line(tmp_path, volume_file, capsys, args, message):
    path, _ = volume_file
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["main"] = np.zeros((3, 4, 5), np.uint8)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    filled = [a.format(path=path, other=other, txt=txt, tmp=tmp_path) for a in args]
    assert main(filled) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stt {args[0]}: error:") and message in err and "\n" not in err


def test_checkpoint_that_does_not_fit_the_config(tmp_path, volume_file, capsys):
    import torch

    path, _ = volume_file
    run = _train_tiny(tmp_path, path)
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"]["model"]["channels"] = [4, 12]
    torch.save(state, tmp_path / "bad.pt")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "bad.pt"),
                "--image",
                f"{path}:image",
                "--out",
                str(tmp_path / "p.h5"),
            ]
        )
        == 2
    )
    assert "does not fit this model's config" in capsys.readouterr().err
    assert not (tmp_path / "p.h5").exists()


def test_help_has_examples(capsys):
    for command in ("demo", "train", "predict", "evaluate", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bug", [ValueError("internal shape mix-up"), TypeError("wrong argument order"), IndexError("off by one")]
)
def test_a_bug_keeps_its_traceback(monkeypatch, capsys, bug):
    """Only errors a user can fix (stt_model.errors.UserInputError and the CLI's own) become one
    line; a ValueError/TypeError from our code is a bug and must reach the user whole."""
    import stt_model.cli as cli

    def broken(args):
        raise bug

    monkeypatch.setitem(cli.COMMANDS, "evaluate", broken)
    with pytest.raises(type(bug), match=str(bug)):
        main(["evaluate", "--pred", "p.h5", "--gt", "g.h5"])
    assert "error:" not in capsys.readouterr().err


def test_a_user_error_is_one_line(monkeypatch, capsys):
    import stt_model.cli as cli
    from stt_model.errors import UserInputError

    def refuses(args):
        raise UserInputError("--pred p.h5: no such dataset")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", refuses)
    assert main(["evaluate", "--pred", "p.h5", "--gt", "g.h5"]) == 2
    assert capsys.readouterr().err == "stt evaluate: error: --pred p.h5: no such dataset\n"
