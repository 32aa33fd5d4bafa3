"""How the shipped ``lucchi-tiny`` model is made, in one command (``make model-lucchi-tiny``):

    python -m stt_model.lucchi_recipe --data lucchi_pp_train.h5 --out runs/lucchi-tiny [--jobs 3] [--install]

1. writes ``val.h5``: slices 130-164 of the Lucchi++ training volume (``--val-z``), the
   validation slices of ``docs/lucchi.md``;
2. trains ``stt_model/models/lucchi-tiny.yaml`` three times (``stt train``, ``--threads`` CPU
   threads each, ``--jobs`` of them at once): seeds 0 and 1 on slices 0-129 only (``val-seed0``, ``val-seed1``:
   the runs that measure the recipe) and seed 0 on all 165 slices (``all``: the shipped weights).
   A finished run is kept, a stopped one resumed;
3. predicts the validation slices with each validation run for each test-time augmentation of
   ``TTA_CHOICES`` and picks the augmentation and mask threshold with the best Jaccard averaged
   over the seeds (ties: the fewest variants, then the threshold nearest 0.5);
4. keeps the ``all`` run's weights only (config and model) as ``lucchi-tiny.pt``, with that
   threshold in its sidecar and the validation runs' scores, at 0.5 and at the chosen
   threshold, on its card;
5. with ``--install``, copies weights, thresholds and card into ``stt_model/models/`` (an
   installed model is replaced only with ``--overwrite``).

``--validation-only`` stops after step 3 for the validation runs, a trial of the recipe (with
``--set``), their scores in ``validation.json``.

The shipped weights saw every slice, so the card's held-out scores are those of the same recipe
trained without slices 130-164, two seeds, and the threshold was chosen on those slices too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stt_kernels.atomic_file import atomic_write

from .model_recipe import training_seconds

NAME = "lucchi-tiny"
VERSION = "1.3.0"
RECIPE = Path(__file__).with_name("models") / f"{NAME}.yaml"
SEEDS = (0, 1)
VALIDATION = "validation.json"  # --validation-only's report
# 16: the 8 flips, each also with y and x swapped (the training patches are); it doubles a
# prediction's time over 8, so ties go to the fewer variants.
TTA_CHOICES = (1, 8, 16)
MASK_THRESHOLDS = tuple(np.round(np.arange(0.2, 0.81, 0.05), 2).tolist())
CITATION = (
    "Lucchi, Smith, Achanta, Knott, Fua: Supervoxel-based segmentation of mitochondria in EM image stacks "
    "with learned shape features, IEEE TMI 2012; labels: Casser, Kang, Pfister, Haehn: Fast mitochondria "
    "detection for connectomics, MIDL 2020"
)


def _z_range(text: str) -> tuple[int, int]:
    try:
        z0, z1 = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--val-z must be z0:z1 (integers); got {text!r}") from None
    if not 0 <= z0 < z1:
        raise argparse.ArgumentTypeError(f"--val-z must satisfy 0 <= z0 < z1; got {text!r}")
    return z0, z1


def _validation_volume(data: Path, out: Path, val_z: tuple[int, int]) -> Path:
    import h5py

    path = out / "val.h5"
    with h5py.File(data, "r") as source:
        missing = [name for name in ("image", "label") if name not in source]
        if missing:
            raise SystemExit(f"--data {data} has no dataset {' or '.join(missing)} (it needs image and label)")
        image, label = source["image"], source["label"]
        if image.shape[0] < val_z[1]:
            raise SystemExit(f"--val-z {val_z[0]}:{val_z[1]} is past the {image.shape[0]} slices of {data}")
        out.mkdir(parents=True, exist_ok=True)
        source_of = {"data": str(data.resolve()), "val_z": list(val_z)}
        if not path.exists():
            tmp = path.with_suffix(".h5.tmp")
            with h5py.File(tmp, "w") as f:
                f["image"], f["label"] = image[val_z[0] : val_z[1]], label[val_z[0] : val_z[1]]
                f.attrs["source"] = json.dumps(source_of)
            tmp.rename(path)
    with h5py.File(path, "r") as f:
        if json.loads(f.attrs.get("source", "{}")) != source_of:
            raise SystemExit(
                f"{path} holds other slices than --val-z {val_z[0]}:{val_z[1]} of {data}; use another --out"
            )
    return path


def _held_out(out: Path, val: Path) -> tuple[int, float, dict, dict[str, Any]]:
    """Step 3: the validation runs' predictions of ``val``; the test-time augmentation and mask
    threshold of best mean Jaccard, the Jaccard of every pair and each seed's scores."""
    from .data import instances_from_binary, open_volume
    from .metrics import jaccard
    from .segment import Thresholds, score

    image = np.asarray(open_volume(f"{val}:image")[:])
    truth = np.asarray(open_volume(f"{val}:label")[:]) > 0
    labels = instances_from_binary(truth)  # Lucchi's labels are a mask: its instances, as training validates
    probs = {(t, s): _probabilities(out / f"val-seed{s}" / "last.pt", image, t) for t in TTA_CHOICES for s in SEEDS}
    unit = {key: p[0].astype(np.float32) / 255.0 for key, p in probs.items()}  # as score() thresholds
    mean = {
        (t, m): float(np.mean([jaccard(unit[t, s] >= m, truth) for s in SEEDS]))
        for t in TTA_CHOICES
        for m in MASK_THRESHOLDS
    }
    tta, mask = max(mean, key=lambda k: (round(mean[k], 3), -k[0], -abs(k[1] - 0.5)))
    per_seed = {}
    for s in SEEDS:
        steps, seconds = training_seconds(out / f"val-seed{s}" / "train_log.csv")
        per_seed[str(s)] = {
            "steps": steps,
            "training_seconds": round(seconds, 1),
            "scores_tta1_mask0.5": score(probs[1, s], labels, Thresholds(mask=0.5, foreground=0.5)),
            "scores": score(probs[tta, s], labels, Thresholds(mask=mask, foreground=mask)),
        }
    return tta, mask, mean, per_seed


def _finished(run: Path, iterations: int) -> bool:
    log = run / "train_log.csv"
    return (run / "last.pt").is_file() and log.is_file() and training_seconds(log)[0] >= iterations


def _train(runs: dict[str, list[str]], jobs: int, threads: int) -> None:
    """Run the ``stt train`` argument lists of ``runs`` as processes, ``jobs`` at a time,
    ``threads`` threads each (jobs x threads at most the cores, or they slow each other); each
    logs to ``<run>.log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, active = list(runs.items()), []
    while pending or active:
        while pending and len(active) < jobs:
            name, args = pending.pop(0)
            log = open(Path(args[args.index("--out") + 1]).with_suffix(".log"), "a")
            print(f"$ stt {' '.join(args)}  > {log.name}", flush=True)
            active.append(
                (
                    name,
                    subprocess.Popen([sys.executable, "-m", "stt_model.cli", *args], stdout=log, stderr=log, env=env),
                    log,
                )
            )
        time.sleep(5)
        for entry in [a for a in active if a[1].poll() is not None]:
            active.remove(entry)
            entry[2].close()
            if entry[1].returncode != 0:
                raise SystemExit(f"training run {entry[0]} failed (exit {entry[1].returncode}); see {entry[2].name}")


def _probabilities(weights: Path, image: np.ndarray, tta: int) -> np.ndarray:
    """``weights``' probabilities ``(1, Z, Y, X)`` (uint8) of ``image``, as ``stt predict`` makes them."""
    import torch

    from .build import build_model
    from .checkpoint import checkpoint_config, load_checkpoint, load_model_weights
    from .segment import probabilities

    state = load_checkpoint(weights)
    config = checkpoint_config(state)
    model = build_model(config)
    load_model_weights(model, state, weights)
    model.eval()
    with torch.no_grad():
        return probabilities(model, config, image, tta=tta, progress=False)


def make(
    data: Path,
    out: Path,
    val_z: tuple[int, int] = (130, 165),
    jobs: int = 1,
    threads: int = 1,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    install: bool = False,
    notes: str = "",
    validation_only: bool = False,
) -> dict[str, Any]:
    """Steps 1-5 of the module doc; returns the card. ``validation_only``: steps 1-3 for the
    validation runs only (a trial of the recipe), their scores written to ``validation.json``."""
    from .checkpoint import atomic_save, load_checkpoint
    from .config import apply_overrides, load_config
    from .pretrained import CARD_FORMAT, MODELS_DIR
    from .segment import Thresholds
    from .tune import TuneResult, file_sha256, sidecar_path, write_sidecar

    targets = [MODELS_DIR / f"{NAME}{suffix}" for suffix in (".pt", ".thresholds.json", ".card.json")]
    if install and validation_only:
        raise SystemExit("--install needs the shipped run; --validation-only trains none")
    if install and not overwrite and any(t.exists() for t in targets):
        raise SystemExit(f"{MODELS_DIR} already holds {NAME}; --overwrite replaces it")
    weights = out / f"{NAME}.pt"
    outputs = [out / VALIDATION] if validation_only else [weights, sidecar_path(weights), out / f"{NAME}.card.json"]
    if not overwrite and any(p.exists() for p in outputs):
        held = f"the {VALIDATION} of an earlier trial" if validation_only else f"a packaged {NAME} ({weights.name})"
        raise SystemExit(f"{out} already holds {held}; --overwrite replaces it")
    config = apply_overrides(load_config(RECIPE), overrides)
    iterations, patch = config.train.iterations, config.data.patch
    if 16 in TTA_CHOICES and patch[1] != patch[2]:
        raise SystemExit(f"data.patch must have H = W (tta 16 swaps y and x of each window); got {list(patch)}")
    if not data.is_file():
        raise SystemExit(f"--data {data} is not a file (the Lucchi++ training volume, an HDF5 with image and label)")
    val = _validation_volume(data, out, val_z)
    sets = [arg for o in overrides for arg in ("--set", o)]
    common = ["train", "--config", str(RECIPE), "--image", f"{data}:image", "--label", f"{data}:label", *sets]
    plan = {f"val-seed{s}": [*common, "--val-z", f"{val_z[0]}:{val_z[1]}", "--set", f"train.seed={s}"] for s in SEEDS}
    if not validation_only:
        plan["all"] = [*common, "--set", "train.seed=0"]
    runs = {}
    for name, args in plan.items():
        run = out / name
        if _finished(run, iterations):
            continue
        resume = ["--resume", str(run / "last.pt")] if (run / "last.pt").is_file() else []
        runs[name] = [*args, "--out", str(run), *resume]
    _train(runs, jobs, threads)
    tta, mask, mean, per_seed = _held_out(out, val)
    scores = {k: float(np.mean([run["scores"][k] for run in per_seed.values()])) for k in per_seed["0"]["scores"]}
    untuned = {k: float(np.mean([run["scores_tta1_mask0.5"][k] for run in per_seed.values()])) for k in scores}
    summary = ", ".join(f"seed {s} {per_seed[s]['scores']['jaccard']:.3f}" for s in per_seed)
    summary += f" (at tta 1 and 0.5: {untuned['jaccard']:.3f} on average)"
    table = {str(t): {str(m): round(mean[t, m], 4) for m in MASK_THRESHOLDS} for t in TTA_CHOICES}
    if validation_only:
        report = {"tta": tta, "mask": mask, "scores": scores, "scores_tta1_mask0.5": untuned, "seeds": per_seed}
        report["jaccard_by_tta_and_mask"] = table
        atomic_write(out / VALIDATION, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
        print(f"validation runs: tta {tta}, mask >= {mask}: Jaccard {summary}")
        return report

    state = load_checkpoint(out / "all" / "last.pt")
    steps, seconds = training_seconds(out / "all" / "train_log.csv")
    atomic_save({"config": state["config"], "model": state["model"], "step": state.get("step", steps)}, weights)
    thresholds = Thresholds(mask=mask, foreground=mask)
    result = TuneResult(thresholds, "jaccard", untuned, scores, len(mean), "grid over the validation runs")
    tuned_on = (
        f"slices {val_z[0]}-{val_z[1] - 1}, predicted by the validation runs (seeds {', '.join(map(str, SEEDS))})"
    )
    write_sidecar(sidecar_path(weights), result, weights, {"tta": tta, "tuned_on": tuned_on}, overwrite=True)
    card = {
        "format": CARD_FORMAT,
        "name": NAME,
        "version": VERSION,
        "description": "tiny-cpu STT-UNET (mask only, input pooled 2x2x2, SST on the two coarsest levels, FG-BG "
        "loss with a patch discriminator) for mitochondria in FIB-SEM of mouse CA1 hippocampus at 5 nm; "
        "semantic: instances are the 3D connected components of the mask",
        "data": f"Lucchi++ training volume ({data.name}, 165 x 768 x 1024, EPFL CA1 hippocampus, 5 nm isotropic), "
        "all 165 slices",
        "citation": CITATION,
        "license": "research use only, as the Lucchi++ data it was trained on",
        "recipe": f"stt_model/models/{RECIPE.name}",
        "config": state["config"],
        "command": f"make model-lucchi-tiny (= python -m stt_model.lucchi_recipe --data {data.name} --out runs/{NAME} "
        f"--jobs {jobs} --threads {threads} --install)",
        "steps": steps,
        "training_seconds": round(seconds, 1),
        "trained_on": f"{threads} CPU thread(s) (OMP_NUM_THREADS={threads}) each, {jobs} run(s) at once on a "
        f"{os.cpu_count()}-core machine",
        "held_out": {
            "volume": f"Lucchi++ training volume slices {val_z[0]}-{val_z[1] - 1}, held out from the validation "
            "runs (the same recipe trained on the other slices); the shipped weights trained on them too",
            "prediction": {"tta": tta, "tta_reduce": "mean", "overlap": 0.25},
            "thresholds": dataclasses.asdict(thresholds),
            "thresholds_chosen_on": tuned_on,
            "scores": scores,
            "scores_tta1_mask0.5": untuned,
            "seeds": per_seed,
            "jaccard_by_tta_and_mask": table,
        },
        "weights": {"file": f"{NAME}.pt", "sha256": file_sha256(weights), "bytes": weights.stat().st_size},
        "thresholds_file": f"{NAME}.thresholds.json",
        "made": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if notes:
        card["notes"] = notes
    card_path = out / f"{NAME}.card.json"
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=1) + "\n"))
    print(
        f"{NAME}: {steps} steps, {seconds / 60:.1f} min; tta {tta}, mask >= {mask}; validation runs: Jaccard {summary}"
    )
    if install:
        for source, target in zip(outputs, targets):
            shutil.copyfile(source, target)
        print(f"installed into {MODELS_DIR}")
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stt_model.lucchi_recipe",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="lucchi_pp_train.h5 (datasets image and label)")
    parser.add_argument("--out", type=Path, default=Path("runs") / NAME)
    parser.add_argument("--val-z", type=_z_range, default=(130, 165), help="validation slices z0:z1 (default 130:165)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each training run (default 1)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe (a trial, not the model)"
    )
    parser.add_argument("--notes", default="", help="a line for the card: how the runs went, beyond its fields")
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help=f"train and score the validation runs only (a trial of the recipe), into {VALIDATION}",
    )
    parser.add_argument("--install", action="store_true", help="copy the model into stt_model/models/")
    parser.add_argument("--overwrite", action="store_true", help="replace a packaged / installed model")
    args = parser.parse_args(argv)
    for flag in ("jobs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    make(
        args.data,
        args.out,
        args.val_z,
        args.jobs,
        args.threads,
        args.set,
        args.overwrite,
        args.install,
        args.notes,
        args.validation_only,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
