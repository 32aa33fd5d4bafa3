"""``stt demo``: the whole job on a fresh machine, with no data needed.

By default it segments a held-out synthetic EM volume (``synthetic_volume(TEST_SHAPE, seed=
seed + 1)``, never trained on) with the shipped ``synthetic-demo`` model, with the test-time
augmentation and tuned thresholds its card names, so it trains nothing. With ``train``
(``--train``) it generates a synthetic volume to train on instead (or splits a real HDF5 volume
with ``image`` and ``label`` datasets: the first 80 % of the slices train, the rest test) and
trains ``tiny-cpu`` within a time budget first. Then it decodes 3D instances, scores them and
writes ``OUT/``:

- ``probabilities.h5`` (``main``: (C, Z, Y, X) uint8), ``instances.h5`` and ``instances.tif``
  ((Z, Y, X) uint32), ``metrics.json`` (the ``stt evaluate --json`` keys), ``montage.png``
  (image / probability / instances / ground truth of several slices, instances in distinct
  colours, true and false positives outlined), ``run/`` (with ``train``: checkpoint and
  training log).

An ``OUT/`` that holds an earlier demo's outputs is refused before any work unless
``overwrite`` (``--overwrite``) is given; other files in ``OUT/`` are never touched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from stt_kernels.atomic_file import atomic_write

from .config import load_config
from .data import PatchSampler, ZRange, create_output, instances_from_binary, open_volume, synthetic_volume
from .data.outputs import OutputError, check_target, output_target, remove_leftovers
from .errors import UserInputError
from .segment import Thresholds, instances, probabilities, score
from .train import Trainer, TrainOptions

# Everything the demo writes into its folder; an earlier demo's are replaced only with --overwrite.
DEMO_OUTPUTS = ("probabilities.h5", "instances.h5", "instances.tif", "metrics.json", "montage.png", "run")
TRAIN_SHAPE = (48, 256, 256)
TEST_SHAPE = (32, 256, 256)
DEMO_MODEL = "synthetic-demo"
MONTAGE_SLICES = 4
MATCH_IOU = 0.75  # a predicted instance is a true positive at this 3D IoU (the AP-75 criterion)


def _volumes(data: Optional[str], seed: int, train: bool = True) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(train image, train labels, test image, test instances); the training pair is None
    without ``train``."""
    if data is None:
        test = synthetic_volume(TEST_SHAPE, seed=seed + 1)
        if not train:
            return None, None, test.image, test.labels
        train_volume = synthetic_volume(TRAIN_SHAPE, seed=seed)
        return train_volume.image, train_volume.labels, test.image, test.labels
    image, label = open_volume(f"{data}:image"), open_volume(f"{data}:label")
    if tuple(image.shape) != tuple(label.shape):
        raise UserInputError(f"{data}: image {tuple(image.shape)} and label {tuple(label.shape)} differ in shape")
    split = int(round(image.shape[0] * 0.8))
    gt = np.asarray(ZRange(label, split, image.shape[0])[:])
    gt = instances_from_binary(gt > 0) if gt.max() <= 1 else gt
    return ZRange(image, 0, split), ZRange(label, 0, split), np.asarray(ZRange(image, split, image.shape[0])[:]), gt


def instance_colours(labels: np.ndarray) -> np.ndarray:
    """``(..., 3)`` float RGB of instance ids: each id its own hue (golden-ratio steps, so
    neighbouring ids differ), the background black."""
    hue = (labels.astype(np.float64) * 0.618033988749895) % 1.0
    value = np.where(labels > 0, 0.95, 0.0)
    # HSV -> RGB with saturation 0.8, vectorised.
    h6 = hue * 6
    k = np.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], -1)
    return value[..., None] * (1 - 0.8 * np.clip(np.minimum(k, 4 - k), 0, 1))


def matched(labels: np.ndarray, gt: np.ndarray, iou: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray]:
    """The predicted ids (of ``labels``) and the ground-truth ids (of ``gt``) that match one
    another at 3D IoU >= ``iou`` (> 0.5 makes every match one-to-one)."""
    pred_ids, pred_sizes = np.unique(labels, return_counts=True)
    gt_ids, gt_sizes = np.unique(gt, return_counts=True)
    both = (labels > 0) & (gt > 0)
    pairs, shared = np.unique(np.stack([labels[both], gt[both]]).astype(np.int64), axis=1, return_counts=True)
    if pairs.size == 0:
        return np.zeros(0, labels.dtype), np.zeros(0, gt.dtype)
    size_p = pred_sizes[np.searchsorted(pred_ids, pairs[0])]
    size_g = gt_sizes[np.searchsorted(gt_ids, pairs[1])]
    good = shared / (size_p + size_g - shared) >= iou
    return pairs[0][good], pairs[1][good]


def _outline(ids: np.ndarray) -> np.ndarray:
    """Pixels of a 2-d label slice on the edge of their instance."""
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:-1] |= ids[1:] != ids[:-1]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    return edge & (ids > 0)


def _montage(path: Path, image: np.ndarray, probs: np.ndarray, labels: np.ndarray, gt: np.ndarray) -> None:
    """Several slices (rows) of image / probability / instances / ground truth, ``(Z, Y, X)``
    volumes and ``(C, Z, Y, X)`` probabilities in. Predicted instances that match a true one
    (3D IoU >= 0.75) are outlined green, false positives red; missed true instances are outlined
    red in the ground truth. Skipped with one line when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:
        # The demo's results are all written by now: a missing plotting package costs the picture only.
        print(
            f"{path.name} skipped: {exc.name} is not installed (matplotlib draws it: pip install 'stt-kernels[model]')"
        )
        return

    tp, found = matched(labels, gt)
    depth = image.shape[0]
    spread = np.linspace((depth - 1) * 0.15, (depth - 1) * 0.85, min(MONTAGE_SLICES, depth))
    rows = sorted({int(z) for z in spread.round()})
    green, red = np.array([0.1, 1.0, 0.1]), np.array([1.0, 0.1, 0.1])
    fig, axes = plt.subplots(len(rows), 4, figsize=(16, 4.2 * len(rows)), squeeze=False)
    for row, z in zip(axes, rows):
        pred_rgb, gt_rgb = instance_colours(labels[z]), instance_colours(gt[z])
        edge = _outline(labels[z])
        pred_rgb[edge & np.isin(labels[z], tp)] = green
        pred_rgb[edge & ~np.isin(labels[z], tp)] = red
        gt_rgb[_outline(gt[z]) & ~np.isin(gt[z], found)] = red
        n_tp = len(set(np.unique(labels[z])) & set(tp.tolist()))
        n_fp = len(set(np.unique(labels[z])) - {0} - set(tp.tolist()))
        n_fn = len(set(np.unique(gt[z])) - {0} - set(found.tolist()))
        panels = [
            (f"image (z = {z})", image[z], "gray"),
            ("probability (mask)", probs[0, z], "magma"),
            (f"instances: {n_tp} true (green), {n_fp} false (red)", pred_rgb, None),
            (f"ground truth: {n_fn} missed (red)", gt_rgb, None),
        ]
        for ax, (title, panel, cmap) in zip(row, panels):
            ax.imshow(panel, cmap=cmap, interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
    fig.suptitle(
        f"3D instances, matched to the ground truth at IoU >= {MATCH_IOU:g}: {len(tp)} of "
        f"{len(set(np.unique(gt).tolist()) - {0})} true instances found, "
        f"{len(set(np.unique(labels).tolist()) - {0}) - len(tp)} false positives"
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / len(rows) / 4.2))  # room for the title above the rows
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=70, format="png"))
    plt.close(fig)


def check_demo_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse (:class:`OutputError`), before any work, an ``--out`` that is not a folder, or that
    holds an earlier demo's outputs, unless ``overwrite``; other files in it are never touched."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder; the demo writes a folder of outputs")
    if not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--out {out}: cannot create it, {parent} is not writable")
        return
    existing = [name for name in DEMO_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if existing and not overwrite:
        raise OutputError(
            f"--out {out} already holds a demo's outputs ({', '.join(existing)}); --overwrite replaces "
            f"them (other files there are left alone)"
        )
    for name in existing:
        if (out / name).is_dir() != (name == "run"):
            raise OutputError(
                f"--out {out}: {out / name} is a {'file' if name == 'run' else 'folder'}, not a demo "
                f"output; it is left alone (move it or choose another --out)"
            )
    for name in ("probabilities.h5", "instances.h5"):
        check_target(output_target(out / name), overwrite=True)
    try:
        (out / f".stt-probe-{os.getpid()}").mkdir()
        (out / f".stt-probe-{os.getpid()}").rmdir()
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there: {exc.strerror or exc}") from None


def run_demo(
    out: Path,
    data: Optional[str] = None,
    minutes: float = 4.0,
    seed: int = 0,
    overwrite: bool = False,
    train: bool = False,
    model: str = DEMO_MODEL,
    bridge_blank: bool = True,
) -> dict[str, float]:
    """The whole demo into the folder ``out`` (see the module doc): the shipped ``model`` on the
    held-out volume, or (``train``) a ``minutes``-long tiny-cpu run first; ``overwrite`` replaces
    the outputs of an earlier demo there, which are refused otherwise; ``bridge_blank`` interpolates
    the probabilities of blank test slices from their neighbours (:mod:`stt_model.infer`)."""
    import tifffile

    from .pretrained import load_pretrained

    if data is not None and not train:
        raise UserInputError(
            "--data trains a model on that volume: it needs --train (the shipped model knows synthetic EM only)"
        )
    started = time.monotonic()
    out = Path(out)
    check_demo_folder(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    cleaned = [
        line for name in ("probabilities.h5", "instances.h5") for line in remove_leftovers(output_target(out / name))
    ]
    if cleaned:
        print(f"stt demo: left by killed runs: {'; '.join(cleaned)}")
    train_image, train_labels, test_image, gt = _volumes(data, seed, train)
    options: dict[str, Any] = {"bridge_blank": bridge_blank}
    if train:
        config = load_config("tiny-cpu")
        config.train.seed = seed
        print(f"stt demo: {'synthetic EM' if data is None else data}, tiny-cpu, {minutes:g} min of training -> {out}/")
        sampler = PatchSampler.from_config([(train_image, train_labels)], config)
        trainer = Trainer(
            config, sampler, TrainOptions(out_dir=out / "run", time_budget=minutes * 60, overwrite=overwrite)
        )
        result = trainer.run()
        net, thresholds = trainer.model, Thresholds()
        summary = f"trained {result.step} steps (final loss {result.losses[-1]:.4f})"
    else:
        shipped = load_pretrained(model)
        config, net, thresholds = shipped.config, shipped.model, shipped.thresholds
        prediction = shipped.card["held_out"].get("prediction", {})
        options.update({key: prediction[key] for key in ("tta", "tta_reduce", "overlap") if key in prediction})
        print(
            f"stt demo: the shipped {model} v{shipped.card['version']} model on a held-out synthetic EM volume "
            f"(seed {seed + 1}), tta {options.get('tta', 1)} -> {out}/"
        )
        summary = f"{model}: {shipped.card['steps']} steps, {shipped.card['training_seconds'] / 60:.0f} min of training"

    shape = (config.model.out_channels, *test_image.shape)
    with create_output(out / "probabilities.h5", shape, np.uint8) as probs_out:
        probabilities(net, config, test_image, probs_out, **options)
        probs = probs_out[:]
    labels = instances(probs, thresholds)
    with create_output(out / "instances.h5", labels.shape, np.uint32) as labels_out:
        labels_out[:] = labels
    atomic_write(out / "instances.tif", lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
    metrics = score(probs, gt, thresholds)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1) + "\n"))
    _montage(out / "montage.png", np.asarray(test_image), probs, labels, gt)

    print(
        f"{summary}; test volume {tuple(test_image.shape)}: {int(labels.max())} instances found, {int(gt.max())} true"
    )
    print("  " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    print(f"done in {time.monotonic() - started:.0f} s; outputs in {out}/")
    return metrics
