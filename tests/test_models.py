"""The shipped-model registry: cards, SHA-256-verified weights, ``stt models``, ``stt predict
--model`` and ``stt_model.load_pretrained``."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import stt_model
from stt_model import pretrained
from stt_model.cli import main
from stt_model.pretrained import ModelRegistryError, list_models, load_pretrained, verified_weights
from stt_model.tune import file_sha256


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """A copy of the shipped registry that a test may damage; the CLI reads it."""
    folder = tmp_path / "models"
    shutil.copytree(pretrained.MODELS_DIR, folder)
    monkeypatch.setattr(pretrained, "MODELS_DIR", folder)
    return folder


SHIPPED = ("lucchi-tiny", "synthetic-demo")


def test_the_registry_ships_its_models():
    assert [card["name"] for card in list_models()] == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_matches_its_card_and_predicts(name):
    card = {card["name"]: card for card in list_models()}[name]
    weights = pretrained.MODELS_DIR / card["weights"]["file"]
    assert file_sha256(weights) == card["weights"]["sha256"] and weights.stat().st_size == card["weights"]["bytes"]
    assert card["weights"]["bytes"] < 1_000_000, "small enough to ship in the wheel"
    for key in ("data", "recipe", "command", "steps", "training_seconds", "held_out"):
        assert card[key], key
    assert (pretrained.MODELS_DIR.parent.parent / card["recipe"]).is_file()
    shipped = stt_model.load_pretrained(name)
    assert not shipped.model.training and shipped.thresholds.__dict__ == {
        **shipped.thresholds.__dict__,
        **card["held_out"]["thresholds"],
    }
    with torch.no_grad():
        logits = shipped.model(torch.rand(1, 1, *shipped.config.data.patch))
    assert logits.shape == (1, shipped.config.model.out_channels, *shipped.config.data.patch)


def test_a_damaged_or_replaced_model_is_refused(registry, tmp_path, capsys):
    weights = registry / "synthetic-demo.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelRegistryError, match="does not match its card .* is not loaded"):
        load_pretrained("synthetic-demo", folder=registry)
    image = tmp_path / "v.h5"
    with h5py.File(image, "w") as f:
        f["image"] = np.zeros((8, 64, 64), np.uint8)
    assert (
        main(["predict", "--model", "synthetic-demo", "--image", f"{image}:image", "--out", str(tmp_path / "p.h5")])
        == 2
    )
    assert "does not match its card" in capsys.readouterr().err and not (tmp_path / "p.h5").exists()
    weights.unlink()
    with pytest.raises(ModelRegistryError, match="its weights .* are missing"):
        verified_weights("synthetic-demo", folder=registry)
    with pytest.raises(
        ModelRegistryError, match="no shipped model named 'nope'; the models are: lucchi-tiny, synthetic-demo"
    ):
        load_pretrained("nope", folder=registry)


def test_a_card_without_its_fields_is_refused(registry):
    card = json.loads((registry / "synthetic-demo.card.json").read_text())
    del card["weights"]
    (registry / "synthetic-demo.card.json").write_text(json.dumps(card))
    with pytest.raises(ModelRegistryError, match="is not an stt-model-card/1 card \\(missing weights\\)"):
        list_models(registry)


def test_stt_models_lists_the_cards(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lucchi-tiny  v") and "\nsynthetic-demo  v" in out and "held out: ap75" in out
    assert "made by: make model-synthetic-demo" in out and "made by: make model-lucchi-tiny" in out
    assert main(["models", "synthetic-demo"]) == 0
    assert '"sha256"' in capsys.readouterr().out
    assert main(["models", "nope"]) == 2
    assert "stt models: error: no shipped model named 'nope'" in capsys.readouterr().err


def test_predict_with_a_shipped_model_uses_its_thresholds(tmp_path, capsys):
    from stt_model.data import synthetic_volume

    volume = synthetic_volume((8, 64, 64), seed=9)
    image = tmp_path / "v.h5"
    with h5py.File(image, "w") as f:
        f["image"] = volume.image
    assert (
        main(
            [
                "predict",
                "--model",
                "synthetic-demo",
                "--image",
                f"{image}:image",
                "--out",
                str(tmp_path / "p.h5"),
                "--instances",
                str(tmp_path / "i.h5"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "thresholds from" in err and "synthetic-demo.thresholds.json" in err


def test_the_demo_montage_marks_true_and_false_positives(tmp_path):
    from stt_model.demo import _montage, instance_colours, matched

    gt = np.zeros((4, 32, 32), np.uint32)
    gt[:, 2:12, 2:12], gt[:, 20:30, 20:30] = 1, 2
    pred = np.zeros_like(gt)
    pred[:, 2:12, 2:12] = 5  # exact: a true positive
    pred[:, 20:30, 20:24] = 7  # a sliver of object 2: a false positive at IoU 0.75
    tp, found = matched(pred, gt)
    assert tp.tolist() == [5] and found.tolist() == [1]
    colours = instance_colours(np.array([0, 1, 2, 3]))
    assert (colours[0] == 0).all() and len({tuple(c) for c in colours[1:].round(3)}) == 3
    probs = np.zeros((2, 4, 32, 32), np.uint8)
    _montage(tmp_path / "m.png", gt.astype(np.uint8), probs, pred, gt)
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_with_a_shipped_model_uses_its_test_time_augmentation(registry, tmp_path, capsys):
    card_path = registry / "synthetic-demo.card.json"
    card = json.loads(card_path.read_text())
    card["held_out"]["prediction"]["tta"] = 4
    card_path.write_text(json.dumps(card))
    image = tmp_path / "v.h5"
    with h5py.File(image, "w") as f:
        f["image"] = np.random.default_rng(0).integers(0, 255, (8, 64, 64), dtype=np.uint8)
    args = ["predict", "--model", "synthetic-demo", "--image", f"{image}:image"]
    assert main([*args, "--out", str(tmp_path / "a.h5")]) == 0
    assert "test-time augmentation 4 (as synthetic-demo's card; --tta 1 for none)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.h5"), "--tta", "1"]) == 0
    assert "test-time augmentation" not in capsys.readouterr().err
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert not np.array_equal(a["main"][:], b["main"][:])  # the four flips were averaged in one
