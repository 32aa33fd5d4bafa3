"""lucchi_recipe: the three training runs, the choice of test-time augmentation and mask
threshold on the validation runs, and a card the registry loads; at toy scale (2 steps)."""

import json

import h5py
import numpy as np
import pytest

from stt_model import lucchi_recipe, pretrained
from stt_model.data import synthetic_volume
from stt_model.pretrained import list_models, load_pretrained
from stt_model.tune import read_sidecar, sidecar_path

TOY = [
    "train.iterations=2",
    "train.warmup=1",
    "train.lr_steps=[1]",
    "train.val_every=2",
    "train.checkpoint_every=2",
    "data.patch=[16,64,64]",
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lucchi")
    volume = synthetic_volume((40, 64, 64), seed=3)
    data = folder / "lucchi.h5"
    with h5py.File(data, "w") as f:
        f["image"], f["label"] = volume.image, (volume.labels > 0).astype("uint8")
    out = folder / "out"
    args = ["--data", str(data), "--out", str(out), "--val-z", "24:40", "--jobs", "3"]
    lucchi_recipe.main([*args, "--notes", "a toy run", *(a for o in TOY for a in ("--set", o))])
    return data, out, args


def test_the_card_reports_both_seeds_and_the_choice_it_made(made):
    _, out, _ = made
    card = json.loads((out / "lucchi-tiny.card.json").read_text())
    held = card["held_out"]
    assert sorted(held["seeds"]) == ["0", "1"] and card["steps"] == 2
    assert all(run["steps"] == 2 and run["training_seconds"] > 0 for run in held["seeds"].values())
    table = held["jaccard_by_tta_and_mask"]
    tta, mask = held["prediction"]["tta"], held["thresholds"]["mask"]
    assert sorted(map(int, table)) == list(lucchi_recipe.TTA_CHOICES)
    assert table[str(tta)][str(mask)] == max(v for row in table.values() for v in row.values())
    assert held["scores"]["jaccard"] == pytest.approx(table[str(tta)][str(mask)], abs=1e-4)
    mean = sum(run["scores"]["jaccard"] for run in held["seeds"].values()) / 2
    assert held["scores"]["jaccard"] == pytest.approx(mean)
    assert card["notes"] == "a toy run"
    assert "Lucchi" in card["citation"] and "Casser" in card["citation"] and "research use" in card["license"]
    assert read_sidecar(sidecar_path(out / "lucchi-tiny.pt"))["thresholds"]["mask"] == mask


def test_the_registry_loads_the_packaged_model(made):
    _, out, _ = made
    (card,) = list_models(out)
    model = load_pretrained("lucchi-tiny", folder=out)
    assert model.thresholds.mask == card["held_out"]["thresholds"]["mask"] and model.config.model.out_channels == 1
    assert model.config.train.seed == 0 and model.config.data.patch == [16, 64, 64]


def test_nothing_is_replaced_without_overwrite(made, tmp_path, monkeypatch):
    _, out, args = made
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit, match="already holds a packaged lucchi-tiny .* --overwrite replaces it"):
        lucchi_recipe.main(args)
    installed = tmp_path / "models"
    installed.mkdir()
    (installed / "lucchi-tiny.card.json").write_text("a user's")
    monkeypatch.setattr(pretrained, "MODELS_DIR", installed)
    with pytest.raises(SystemExit, match="already holds lucchi-tiny; --overwrite replaces it"):
        lucchi_recipe.main([*args, "--install"])
    other_slices = [a if a != "24:40" else "20:40" for a in args]
    with pytest.raises(SystemExit, match="val.h5 holds other slices than --val-z 20:40 .* use another --out"):
        lucchi_recipe.main([*other_slices, "--overwrite"])
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (installed / "lucchi-tiny.card.json").read_text() == "a user's"


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--data .* is not a file"):
        lucchi_recipe.main(["--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o")])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["image"] = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(SystemExit, match="has no dataset label"):
        lucchi_recipe.main(["--data", str(other), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        lucchi_recipe.main(["--data", "x.h5", "--val-z", "9:3"])
    with pytest.raises(SystemExit, match=r"data.patch must have H = W \(tta 16 swaps y and x"):
        lucchi_recipe.main(["--data", str(other), "--out", str(tmp_path / "o"), "--set", "data.patch=[16,64,48]"])
    assert "--val-z must satisfy 0 <= z0 < z1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--jobs", "--threads"])
def test_jobs_and_threads_must_be_positive(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        lucchi_recipe.main(["--data", str(tmp_path / "x.h5"), flag, "0"])
    assert f"{flag} must be >= 1; got 0" in capsys.readouterr().err


def test_each_run_gets_the_threads_asked_for(tmp_path, monkeypatch):
    seen = []

    class Finished:
        returncode = 0

        def __init__(self, args, env, **_):
            seen.append(env["OMP_NUM_THREADS"])

        def poll(self):
            return 0

    monkeypatch.setattr(lucchi_recipe.subprocess, "Popen", Finished)
    monkeypatch.setattr(lucchi_recipe.time, "sleep", lambda _: None)
    runs = {name: ["train", "--out", str(tmp_path / name)] for name in ("a", "b")}
    lucchi_recipe._train(runs, jobs=1, threads=2)
    assert seen == ["2", "2"]


def test_a_validation_only_trial_scores_the_two_seeds_and_packages_nothing(made, tmp_path):
    data, _, _ = made
    out = tmp_path / "trial"
    args = ["--data", str(data), "--out", str(out), "--val-z", "24:40", "--jobs", "2", "--validation-only"]
    args += [a for o in TOY for a in ("--set", o)]
    report = lucchi_recipe.main(args)
    assert report == 0
    written = json.loads((out / "validation.json").read_text())
    assert sorted(written["seeds"]) == ["0", "1"] and written["tta"] in lucchi_recipe.TTA_CHOICES
    assert written["jaccard_by_tta_and_mask"][str(written["tta"])][str(written["mask"])] == pytest.approx(
        written["scores"]["jaccard"], abs=1e-4
    )
    assert not (out / "all").exists() and not (out / "lucchi-tiny.pt").exists()
    with pytest.raises(SystemExit, match="already holds the validation.json of an earlier trial; --overwrite"):
        lucchi_recipe.main(args)
    with pytest.raises(SystemExit, match="--install needs the shipped run; --validation-only trains none"):
        lucchi_recipe.main([*args, "--install"])
