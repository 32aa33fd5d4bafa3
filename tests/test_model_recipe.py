"""model_recipe --retune: steps 4-6 on the weights already in --out, refused without them."""

import pytest

from stt_model import model_recipe


def test_retune_needs_an_earlier_run(tmp_path):
    for name in model_recipe.VOLUMES:  # present already: the recipe must not spend time generating them
        (tmp_path / f"{name}.h5").touch()
    with pytest.raises(
        SystemExit, match=r"--retune needs the weights and card of an earlier run in .*synthetic-demo\.pt"
    ):
        model_recipe.main(["--out", str(tmp_path), "--retune"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.h5" for n in model_recipe.VOLUMES)


def test_retune_replaces_nothing_without_overwrite(tmp_path):
    for name in (*(f"{n}.h5" for n in model_recipe.VOLUMES), "synthetic-demo.pt", "synthetic-demo.card.json"):
        (tmp_path / name).write_text("kept")
    with pytest.raises(SystemExit, match="--retune replaces the card and thresholds .* --overwrite says to"):
        model_recipe.main(["--out", str(tmp_path), "--retune"])
    assert all(p.read_text() == "kept" for p in tmp_path.iterdir())
