"""Decoding thresholds tuned on validation (stt tune), kept in a sidecar beside the checkpoint,
and the precedence flags > sidecar > defaults in stt predict and stt evaluate."""

import json
import sys

import h5py
import numpy as np
import pytest

from stt_model.cli import main
from stt_model.data import synthetic_volume
from stt_model.data.targets import instance_contour
from stt_model.metrics import instance_ap
from stt_model.segment import Thresholds, instances
from stt_model.tune import TuneError, file_sha256, search_thresholds, sidecar_path, sidecar_thresholds

TINY_YAML = """base: tiny-cpu
model:
  channels: [4, 8]
  heads: [1, 2]
  sst_levels: [false, true]
data:
  patch: [4, 32, 32]
  augment: false
loss:
  adversarial_weight: 0.0
train:
  iterations: 2
  batch_size: 1
  warmup: 1
  val_every: 2
  checkpoint_every: 2
"""


def _unsure_probabilities(gt):
    """What an under-confident model predicts: mask 0.7 inside objects (below the default
    foreground threshold 0.85, so the defaults find nothing), contour 0.6 on instance borders."""
    mask = np.where(gt > 0, 0.7, 0.05)
    contour = np.where(instance_contour(gt) > 0, 0.6, 0.05)
    return np.rint(np.stack([mask, contour]) * 255).astype(np.uint8)


def test_the_search_finds_thresholds_that_decode_the_instances():
    gt = synthetic_volume((8, 96, 96), seed=4, artefacts=False).labels
    probs = _unsure_probabilities(gt)
    assert instance_ap(instances(probs, Thresholds()), gt)["ap75"] == 0.0
    result = search_thresholds(probs, gt, points=4)
    assert result.metric == "ap75" and result.before["ap75"] == 0.0 and result.after["ap75"] > 0.5
    t = result.thresholds
    assert t.foreground < 0.7 and t.seed < 0.7 and t.contour < 0.6, t
    assert result.after["ap75"] == instance_ap(instances(probs, t), gt)["ap75"]  # the score is the thresholds'
    assert result.after["jaccard"] == pytest.approx(1.0) and t.mask < 0.7


def test_touching_instances_without_an_interface_are_split_by_the_distance_decoder():
    """Two capsules that overlap, a contour channel that marks only their outer border (as a
    model does when the image shows no membrane between them): the seeded watershed sees one
    object, the distance transform's two peaks split it, and the search picks that decoder."""
    from stt_model.postprocess import distance_watershed

    z, y, x = np.mgrid[:24, :64, :96]
    a = (z - 12) ** 2 + (y - 32) ** 2 + (x - 30) ** 2 < 14**2
    b = ((z - 12) ** 2 + (y - 32) ** 2 + (x - 56) ** 2 < 14**2) & ~a
    gt = (a * 1 + b * 2).astype(np.uint32)
    outer = instance_contour((gt > 0).astype(np.uint32))
    probs = np.rint(np.stack([(gt > 0) * 0.95 + 0.02, outer * 0.9 + 0.02]) * 255).astype(np.uint8)
    assert instances(probs, Thresholds()).max() == 1
    split = distance_watershed(probs[0], probs[1], t_fg=0.5, t_contour=0.5, peak_height=2, min_size=10)
    assert split.max() == 2 and instance_ap(split, gt)["ap75"] == 1.0
    result = search_thresholds(probs, gt, Thresholds(min_size=10), points=3)
    assert result.thresholds.decoder == "distance" and result.after["ap75"] == 1.0 > result.before["ap75"]
    with pytest.raises(ValueError, match="anisotropy must be > 0"):
        distance_watershed(probs[0], probs[1], anisotropy=0)


def test_a_semantic_model_tunes_its_mask_by_jaccard():
    gt = synthetic_volume((6, 64, 64), seed=5, artefacts=False).labels
    mask = np.where(gt > 0, 0.4, 0.1)[None].astype(np.float32)  # one channel, under-confident
    result = search_thresholds(mask, gt)
    assert result.metric == "jaccard" and result.before["jaccard"] == 0.0
    assert result.after["jaccard"] == pytest.approx(1.0)
    assert 0.1 <= result.thresholds.mask < 0.4 and result.thresholds.foreground == result.thresholds.mask


def test_the_start_is_kept_when_nothing_beats_it():
    gt = synthetic_volume((8, 96, 96), seed=4, artefacts=False).labels
    probs = np.rint(np.stack([(gt > 0) * 1.0, instance_contour(gt) * 1.0]) * 255).astype(np.uint8)
    result = search_thresholds(probs, gt, points=3)
    assert result.after["ap75"] >= result.before["ap75"] == pytest.approx(1.0)
    assert result.thresholds == Thresholds()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    volume = synthetic_volume((8, 48, 48), seed=3)
    data = folder / "vol.h5"
    with h5py.File(data, "w") as f:
        f["image"], f["label"] = volume.image, volume.labels
    (folder / "tiny.yaml").write_text(TINY_YAML)
    assert (
        main(
            [
                "train",
                "--config",
                str(folder / "tiny.yaml"),
                "--image",
                f"{data}:image",
                "--label",
                f"{data}:label",
                "--out",
                str(folder / "run"),
            ]
        )
        == 0
    )
    return folder / "run" / "last.pt", data


def test_tune_writes_a_sidecar_that_predict_uses_and_flags_override(tiny_run, tmp_path, capsys):
    checkpoint, data = tiny_run
    sidecar = sidecar_path(checkpoint)
    sidecar.unlink(missing_ok=True)
    args = [
        "tune",
        "--checkpoint",
        str(checkpoint),
        "--image",
        f"{data}:image",
        "--label",
        f"{data}:label",
        "--points",
        "2",
        "--tta",
        "4",
    ]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "before: ap75" in out and "after:  ap75" in out and f"thresholds -> {sidecar}" in out
    saved = json.loads(sidecar.read_text())
    assert saved["checkpoint_sha256"] == file_sha256(checkpoint) and saved["prediction"]["tta"] == 4
    assert saved["after"]["ap75"] >= saved["before"]["ap75"]

    # An existing sidecar is refused before any work, and left as it was.
    before = sidecar.read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stt tune: error: --out {sidecar} exists; --overwrite replaces it"
    assert sidecar.read_bytes() == before

    # predict picks the sidecar up and says so; a flag overrides one field of it.
    saved["thresholds"].update(foreground=0.55, seed=0.65, contour=0.45, decoder="watershed")
    sidecar.write_text(json.dumps(saved))
    probs, inst = tmp_path / "p.h5", tmp_path / "i.h5"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--image",
                f"{data}:image",
                "--out",
                str(probs),
                "--instances",
                str(inst),
                "--seed-threshold",
                "0.7",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"thresholds from {sidecar} (decoder=watershed, foreground=0.55, seed=0.65, contour=0.45" in err
    assert "overridden by --seed-threshold 0.7" in err
    with h5py.File(probs) as f, h5py.File(inst) as g:
        expected = instances(f["main"][:], Thresholds(foreground=0.55, seed=0.7, contour=0.45))
        np.testing.assert_array_equal(g["main"][:], expected)

    # stt evaluate decodes probabilities with a thresholds file and flags, as predict does.
    assert (
        main(
            [
                "evaluate",
                "--pred",
                f"{probs}:main",
                "--gt",
                f"{data}:label",
                "--json",
                "--thresholds",
                str(sidecar),
                "--seed-threshold",
                "0.7",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    scores = json.loads(captured.out)
    with h5py.File(data) as f:
        assert scores["ap75"] == instance_ap(expected, f["label"][:])["ap75"]
    assert "overridden by --seed-threshold 0.7" in captured.err


def test_a_sidecar_of_other_weights_is_not_used(tiny_run, tmp_path):
    checkpoint, _ = tiny_run
    copy = tmp_path / "other.pt"
    copy.write_bytes(checkpoint.read_bytes() + b"")
    sidecar_path(copy).write_text(
        json.dumps({"format": "stt-thresholds/1", "checkpoint_sha256": "0" * 64, "thresholds": {"foreground": 0.5}})
    )
    found, line = sidecar_thresholds(copy)
    assert found is None and "was tuned for other weights" in line and "not used" in line
    sidecar_path(copy).write_text(
        json.dumps(
            {"format": "stt-thresholds/1", "checkpoint_sha256": file_sha256(copy), "thresholds": {"foreground": 0.5}}
        )
    )
    found, line = sidecar_thresholds(copy)
    assert found == Thresholds(foreground=0.5) and line.startswith(f"thresholds from {sidecar_path(copy)}")


def test_bad_thresholds_are_one_line_errors(tiny_run, tmp_path, capsys):
    checkpoint, data = tiny_run
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--image",
                f"{data}:image",
                "--out",
                str(tmp_path / "p.h5"),
                "--fg-threshold",
                "1.5",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        "stt predict: error: --fg-threshold must be a probability in [0, 1]; got 1.5"
    )
    assert not (tmp_path / "p.h5").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "stt-thresholds/1", "thresholds": {"foregrund": 0.5}}))
    with h5py.File(tmp_path / "probs.h5", "w") as f:
        f["main"] = np.zeros((2, 8, 48, 48), np.uint8)
    assert (
        main(["evaluate", "--pred", f"{tmp_path / 'probs.h5'}:main", "--gt", f"{data}:label", "--thresholds", str(bad)])
        == 2
    )
    assert "unknown threshold 'foregrund'" in capsys.readouterr().err
    assert main(["evaluate", "--pred", f"{data}:label", "--gt", f"{data}:label", "--fg-threshold", "0.5"]) == 2
    assert "the thresholds decode probabilities (C, Z, Y, X)" in capsys.readouterr().err


class _FakeOptuna:
    """What stt tune uses of optuna: a study that asks for the enqueued trial, then seeded draws."""

    class logging:
        WARNING = 30

        @staticmethod
        def set_verbosity(level):
            pass

    class samplers:
        class TPESampler:
            def __init__(self, seed):
                self.rng = np.random.default_rng(seed)

    class _Trial:
        def __init__(self, fixed, rng):
            self.fixed, self.rng = fixed, rng

        def suggest_float(self, name, low, high):
            return self.fixed[name] if self.fixed else float(self.rng.uniform(low, high))

    class _Study:
        def __init__(self, sampler):
            self.sampler, self.queue = sampler, []

        def enqueue_trial(self, params):
            self.queue.append(params)

        def optimize(self, objective, n_trials):
            for _ in range(n_trials):
                objective(_FakeOptuna._Trial(self.queue.pop(0) if self.queue else None, self.sampler.rng))

    @staticmethod
    def create_study(direction, sampler):
        assert direction == "maximize"
        return _FakeOptuna._Study(sampler)


def test_optuna_search_uses_its_trials_and_is_refused_without_optuna(monkeypatch):
    gt = synthetic_volume((6, 64, 64), seed=5, artefacts=False).labels
    mask = np.where(gt > 0, 0.4, 0.1)[None].astype(np.float32)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(TuneError, match=r"--search optuna needs optuna \(pip install optuna\)"):
        search_thresholds(mask, gt, search="optuna")
    monkeypatch.setitem(sys.modules, "optuna", _FakeOptuna)
    result = search_thresholds(mask, gt, search="optuna", trials=20)
    assert result.search == "optuna" and result.after["jaccard"] == pytest.approx(1.0) and result.thresholds.mask < 0.4


def test_stt_tune_improves_ap75_of_the_shipped_tiny_model(tmp_path, capsys):
    """The real thing at small scale: the shipped synthetic-demo model (tiny-cpu) on a small
    synthetic validation volume it never saw; the tuned thresholds beat the defaults."""
    from stt_model.pretrained import verified_weights

    volume = synthetic_volume((12, 128, 128), seed=21)
    data = tmp_path / "val.h5"
    with h5py.File(data, "w") as f:
        f["image"], f["label"] = volume.image, volume.labels
    out = tmp_path / "t.json"
    assert (
        main(
            [
                "tune",
                "--checkpoint",
                str(verified_weights("synthetic-demo")),
                "--image",
                f"{data}:image",
                "--label",
                f"{data}:label",
                "--points",
                "3",
                "--anisotropy",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    assert saved["after"]["ap75"] > saved["before"]["ap75"] + 0.1, (saved["before"], saved["after"])
    assert "before: ap75" in capsys.readouterr().out
