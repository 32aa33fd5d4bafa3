"""How the shipped ``synthetic-demo`` model is made, in one command (``make model-synthetic-demo``):

    python -m stt_model.model_recipe --out runs/synthetic-demo [--minutes 35] [--install]

1. generates the synthetic volumes: ``train`` (64 x 384 x 384, seed 1000) to train on,
   ``validation`` (32 x 256 x 256, seed 2) to tune the thresholds and choose the test-time
   augmentation on, and ``test`` (32 x 256 x 256, seed 1: what ``stt demo`` segments) scored
   once at the end; none is the others;
2. trains ``stt_model/models/synthetic-demo.yaml`` on ``train`` for at most ``--minutes``
   (``stt train``; with ``--resume`` a stopped run continues to the end of its schedule);
3. keeps the weights only (config and model: the optimiser state is not shipped);
4. ``stt tune`` on ``validation`` (both decoders) for each test-time augmentation in
   ``TTA_CHOICES``, keeping the one that scores best there (ties: the fewest variants);
5. scores ``test`` with that setting and those thresholds and writes the card;
6. with ``--install``, copies weights, thresholds and card into ``stt_model/models/`` (an
   installed model is replaced only with ``--overwrite``).

``--retune --overwrite`` runs steps 4-6 only, on the weights already in ``--out``
(``synthetic-demo.pt``, with its card there for the training figures), replacing its card and
thresholds: the decoding changed, the weights did not.

Nothing in ``--out`` is replaced without ``--overwrite`` either; the run folder is ``stt
train``'s own, with its lock and refusal.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stt_kernels.atomic_file import atomic_write

NAME = "synthetic-demo"
VERSION = "1.1.0"
RECIPE = Path(__file__).with_name("models") / f"{NAME}.yaml"
VOLUMES = {"train": ((64, 384, 384), 1000), "validation": ((32, 256, 256), 2), "test": ((32, 256, 256), 1)}
# More variants score better but cost their number in time: the demo must stay well under a
# minute on 2 shared cores, where one pass over its volume takes ~25 s.
TTA_CHOICES = (1,)
TUNE_ARGS = ("--points", "4", "--anisotropy", "4")  # the generator's z voxels are 4x its xy voxels


def _volume(folder: Path, name: str) -> Path:
    import h5py

    from .data import synthetic_volume

    path = folder / f"{name}.h5"
    if not path.exists():
        shape, seed = VOLUMES[name]
        volume = synthetic_volume(shape, seed=seed)
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f["image"], f["label"] = volume.image, volume.labels
        tmp.rename(path)
    return path


def training_seconds(log: Path) -> tuple[int, float]:
    """(last step, training seconds) of a ``train_log.csv``, summing the segments of a resumed
    run (each restarts its clock); validation rows carry no time."""
    total, segment, step = 0.0, 0.0, 0
    with open(log) as f:
        for row in csv.DictReader(f):
            if not row["seconds"]:
                continue
            seconds = float(row["seconds"])
            if seconds < segment:
                total += segment
            segment, step = seconds, int(row["step"])
    return step, total + segment


def _cli(argv: Sequence[str]) -> None:
    from .cli import main

    print("$ stt " + " ".join(argv), flush=True)
    status = main(list(argv))
    if status != 0:
        raise SystemExit(f"stt {argv[0]} failed (exit {status})")


def make(
    out: Path,
    minutes: float,
    resume: bool = False,
    overwrite: bool = False,
    install: bool = False,
    skip_training: bool = False,
    retune: bool = False,
) -> dict[str, Any]:
    """Steps 1-6 of the module doc; returns the card."""
    import torch

    from .build import build_model
    from .checkpoint import atomic_save, checkpoint_config, load_checkpoint, load_model_weights
    from .data import open_volume
    from .pretrained import CARD_FORMAT, MODELS_DIR
    from .segment import Thresholds, probabilities, score
    from .tune import file_sha256, read_sidecar, sidecar_path

    targets = [MODELS_DIR / f"{NAME}{suffix}" for suffix in (".pt", ".thresholds.json", ".card.json")]
    if install and not overwrite and any(t.exists() for t in targets):
        raise SystemExit(f"{MODELS_DIR} already holds {NAME}; --overwrite replaces it")
    out.mkdir(parents=True, exist_ok=True)
    data = {name: _volume(out, name) for name in VOLUMES}
    run = out / "run"
    weights = out / f"{NAME}.pt"
    previous = out / f"{NAME}.card.json"
    if retune and not (weights.is_file() and previous.is_file()):
        raise SystemExit(
            f"--retune needs the weights and card of an earlier run in {out} ({weights.name}, {previous.name})"
        )
    if retune and not overwrite:
        raise SystemExit(f"--retune replaces the card and thresholds of the run in {out}; --overwrite says to")
    if not skip_training and not retune:
        args = [
            "train",
            "--config",
            str(RECIPE),
            "--image",
            f"{data['train']}:image",
            "--label",
            f"{data['train']}:label",
            "--out",
            str(run),
            "--minutes",
            f"{minutes:g}",
        ]
        if resume:
            args += ["--resume", str(run / "last.pt")]
        elif overwrite:
            args.append("--overwrite")
        _cli(args)
    if retune:
        earlier = json.loads(previous.read_text())
        steps, seconds = int(earlier["steps"]), float(earlier["training_seconds"])
        state = load_checkpoint(weights)
    else:
        steps, seconds = training_seconds(run / "train_log.csv")
        state = load_checkpoint(run / "last.pt")
        atomic_save({"config": state["config"], "model": state["model"], "step": state.get("step", steps)}, weights)

    trials: dict[int, dict[str, Any]] = {}
    for tta in TTA_CHOICES:
        sidecar = out / f"{NAME}.tta{tta}.thresholds.json"
        _cli(
            [
                "tune",
                "--checkpoint",
                str(weights),
                "--image",
                f"{data['validation']}:image",
                "--label",
                f"{data['validation']}:label",
                "--tta",
                str(tta),
                "--out",
                str(sidecar),
                "--overwrite",
                *TUNE_ARGS,
            ]
        )
        trials[tta] = read_sidecar(sidecar)
    best = max(TTA_CHOICES, key=lambda t: (round(trials[t]["after"]["ap75"], 3), -t))
    shutil.copyfile(out / f"{NAME}.tta{best}.thresholds.json", sidecar_path(weights))

    config = checkpoint_config(state)
    model = build_model(config)
    load_model_weights(model, state, weights)
    thresholds = Thresholds(**trials[best]["thresholds"])
    test = open_volume(f"{data['test']}:image")
    gt = np.asarray(open_volume(f"{data['test']}:label")[:])
    started = time.monotonic()
    with torch.no_grad():
        probs = probabilities(model, config, test, tta=best, progress=False)
    predict_seconds = time.monotonic() - started
    scores = score(probs, gt, thresholds)
    default_scores = score(probs, gt, Thresholds())
    card = {
        "format": CARD_FORMAT,
        "name": NAME,
        "version": VERSION,
        "description": "tiny-cpu STT-UNET (mask + instance contour) for the synthetic EM of stt demo; "
        "not a model of real tissue",
        "data": f"synthetic_volume{VOLUMES['train'][0]} seed {VOLUMES['train'][1]} (stt_model.data.synthetic): "
        "capsule mitochondria, 30 % in touching pairs, section artefacts",
        "recipe": f"stt_model/models/{RECIPE.name}",
        "config": state["config"],
        "command": f"make model-synthetic-demo (= OMP_NUM_THREADS=1 python -m stt_model.model_recipe --out "
        f"runs/{NAME} --minutes {minutes:g} --install)",
        "steps": steps,
        "training_seconds": round(seconds, 1),
        "trained_on": "1 CPU thread (OMP_NUM_THREADS=1) of a 2-core machine shared with other work",
        "held_out": {
            "volume": f"synthetic_volume{VOLUMES['test'][0]} seed {VOLUMES['test'][1]} (what stt demo segments)",
            "prediction": {"tta": best, "tta_reduce": "mean", "overlap": 0.25, "bridge_blank": True},
            "thresholds": trials[best]["thresholds"],
            "scores": scores,
            "scores_default_thresholds_same_tta": default_scores,
            "predict_seconds": round(predict_seconds, 1),
        },
        "validation": {
            "volume": f"synthetic_volume{VOLUMES['validation'][0]} seed {VOLUMES['validation'][1]}",
            "tuned": {
                str(t): {"before": trials[t]["before"]["ap75"], "after": trials[t]["after"]["ap75"]}
                for t in TTA_CHOICES
            },
        },
        "weights": {"file": f"{NAME}.pt", "sha256": file_sha256(weights), "bytes": weights.stat().st_size},
        "thresholds_file": f"{NAME}.thresholds.json",
        "license": "BSD-3-Clause (synthetic training data)",
        "made": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if retune:
        card["notes"] = (
            f"v{VERSION}: the weights of v{earlier['version']} (made {earlier['made']}) unchanged, tuned and scored "
            "again by python -m stt_model.model_recipe --retune --overwrite, with the decoding of this version (blank "
            "input slices bridged from their neighbours; the distance decoder's neck merging, merge_ratio, in the "
            "search). " + earlier.get("notes", "")
        ).strip()
    card_path = out / f"{NAME}.card.json"
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=1) + "\n"))
    print(
        f"{NAME}: {steps} steps, {seconds / 60:.1f} min; tta {best}; held-out "
        + ", ".join(f"{k}={v:.3f}" for k, v in scores.items())
    )
    if install:
        for source, target in zip((weights, sidecar_path(weights), card_path), targets):
            shutil.copyfile(source, target)
        print(f"installed into {MODELS_DIR}")
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stt_model.model_recipe",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs") / NAME)
    parser.add_argument("--minutes", type=float, default=35.0, help="training budget (default 35)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out/run")
    parser.add_argument("--skip-training", action="store_true", help="package the run already in --out/run")
    parser.add_argument(
        "--retune", action="store_true", help="tune and score the weights already in --out again (no training)"
    )
    parser.add_argument("--install", action="store_true", help="copy the model into stt_model/models/")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run / installed model")
    args = parser.parse_args(argv)
    make(
        args.out,
        args.minutes,
        resume=args.resume,
        overwrite=args.overwrite,
        install=args.install,
        skip_training=args.skip_training,
        retune=args.retune,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
