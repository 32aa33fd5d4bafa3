"""``--set key=value``: any config field by dotted key, the value read as YAML and checked exactly
as a YAML config's is; a resumed run refuses overrides that would change its config."""

import h5py
import pytest
import torch
from test_cli import TINY_YAML

from stt_model.cli import main
from stt_model.config import ConfigError, apply_overrides, load_config, parse_override
from stt_model.data import synthetic_volume


def _yaml_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text("base: tiny-cpu\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_overrides_set_fields_by_dotted_key():
    base = load_config("tiny-cpu")
    config = apply_overrides(
        base,
        [
            "train.lr=3e-4",
            "model.channels=[8,16]",
            "model.heads=[2,2]",
            "model.sst_levels=[false,true]",
            "data.intensity=[10, 200]",
            "loss.adversarial_objective=minimax",
            "train.amp=false",
            "name=mine",
        ],
    )
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.model.channels == [8, 16] and config.model.heads == [2, 2]
    assert config.model.sst_levels == [False, True] and config.data.intensity == [10.0, 200.0]
    assert config.loss.adversarial_objective == "minimax" and config.train.amp is False and config.name == "mine"
    assert base == load_config("tiny-cpu"), "the config given is left as it was"
    # The last of two overrides of one key wins; a mapping value sets several fields of a section.
    assert apply_overrides(base, ["train.seed=1", "train.seed=2"]).train.seed == 2
    assert apply_overrides(base, ["train={seed: 5, warmup: 0}"]).train.warmup == 0


def test_parse_override_reads_yaml_values():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override(" model.channels = [4, 8]") == (["model", "channels"], [4, 8])
    assert parse_override("name=a=b") == (["name"], "a=b")
    assert parse_override("train.lr=") == (["train", "lr"], None)


@pytest.mark.parametrize(
    "override, yaml_text",
    [
        ("train.lrr=1", "train:\n  lrr: 1\n"),
        ("trian.lr=1", "trian:\n  lr: 1\n"),
        ("train.lr=fast", "train:\n  lr: fast\n"),
        ("train.batch_size=2.5", "train:\n  batch_size: 2.5\n"),
        ("model.fusion=sum", "model:\n  fusion: sum\n"),
        ("model.channels=[8,x]", "model:\n  channels: [8, x]\n"),
        ("model.heads=[1,2,3]", "model:\n  heads: [1, 2, 3]\n"),
        ("train.lr=-1e-3", "train:\n  lr: -1.0e-3\n"),
        ("train.lr=.nan", "train:\n  lr: .nan\n"),
        ("model=3", "model: 3\n"),
    ],
)
def test_bad_overrides_fail_as_the_same_yaml_does(tmp_path, override, yaml_text):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(load_config("tiny-cpu"), [override])
    assert str(caught.value) == _yaml_error(tmp_path, yaml_text)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "--set expects key=value with a dotted config key (train.lr=3e-4); got 'train.lr'"),
        ("=3", "got '=3'"),
        ("train..lr=3", "got 'train..lr=3'"),
        ("train.lr=[1,", "--set train.lr: the value '[1,' is not valid YAML"),
        ("train.lr.x=1", "train.lr must be a number; got {'x': 1}"),
    ],
)
def test_malformed_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(load_config("tiny-cpu"), [override])


def test_yaml_files_read_exponents_as_numbers(tmp_path):
    """PyYAML alone reads 3e-4 as a string (YAML 1.1 wants 3.0e-4); configs read it as YAML 1.2 does."""
    path = tmp_path / "c.yaml"
    path.write_text("base: tiny-cpu\ntrain:\n  lr: 3e-4\n  iterations: 1e3\n")
    with pytest.raises(ConfigError, match="train.iterations must be an integer; got 1000.0"):
        load_config(path)
    path.write_text("base: tiny-cpu\ntrain:\n  lr: 3e-4\n")
    assert load_config(path).train.lr == 3e-4


# -- stt train --set -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "vol.h5"
    data = synthetic_volume((8, 32, 32), seed=4)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = data.image, data.labels
    return path


def _train(tmp_path, volume, *extra):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    return main(
        [
            "train",
            "--config",
            str(config),
            "--image",
            f"{volume}:image",
            "--label",
            f"{volume}:label",
            "--out",
            str(tmp_path / "run"),
            *extra,
        ]
    )


def _stt_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("stt ")]


def test_stt_train_set_reaches_the_checkpoint(tmp_path, volume):
    assert (
        _train(
            tmp_path, volume, "--set", "train.iterations=1", "--set", "model.channels=[4,16]", "--set", "train.lr=2e-3"
        )
        == 0
    )
    config = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]
    assert config["train"]["iterations"] == 1 and config["model"]["channels"] == [4, 16]
    assert config["train"]["lr"] == 2e-3 and config["model"]["heads"] == [1, 2]  # the rest from --config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key in train: train.lrr; known: amp,"),
        ("model.heads=[1,3]", "model.heads[1] (3) must divide model.channels[1] (8)"),
        ("train.lr", "--set expects key=value"),
    ],
)
def test_stt_train_bad_set_is_one_line_before_any_work(tmp_path, volume, capsys, override, message):
    assert _train(tmp_path, volume, "--set", override) == 2
    (line,) = _stt_lines(capsys)
    assert line.startswith("stt train: error: ") and message in line
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_set_that_changes_the_config(tmp_path, volume, capsys):
    assert _train(tmp_path, volume) == 0
    run, checkpoint = tmp_path / "run", tmp_path / "run" / "last.pt"
    before = checkpoint.read_bytes()
    common = [
        "train",
        "--image",
        f"{volume}:image",
        "--label",
        f"{volume}:label",
        "--out",
        str(run),
        "--resume",
        str(checkpoint),
    ]
    capsys.readouterr()
    assert main([*common, "--set", "train.lr=0.5"]) == 2
    (line,) = _stt_lines(capsys)
    assert line == (
        f"stt train: error: --set train.lr=0.5 differs from the config stored in {checkpoint} (train.lr); "
        "a resumed run keeps its checkpoint's config: drop --set, or start a new run"
    )
    assert main([*common, "--set", "train.iterations=4"]) == 2
    assert (
        "(train.iterations); a resumed run keeps its checkpoint's config (to train further, give --iterations)"
        in _stt_lines(capsys)[0]
    )
    assert checkpoint.read_bytes() == before
    # An override that agrees with the checkpoint changes nothing and is let through.
    stored = torch.load(checkpoint, weights_only=True)["config"]["train"]["lr"]
    assert main([*common, "--set", f"train.lr={stored!r}", "--iterations", "3"]) == 0
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
