"""``stt demo``: the whole job on a fresh machine, with no data needed.

Generates a synthetic EM volume to train on and a held-out one to test on (or splits a real
HDF5 volume with ``image`` and ``label`` datasets: the first 80 % of the slices train, the rest
test), trains ``tiny-cpu`` within a time budget, segments the test volume with sliding windows,
decodes 3D instances, scores them and writes ``OUT/``:

- ``probabilities.h5`` (``main``: (C, Z, Y, X) uint8), ``instances.h5`` and ``instances.tif``
  ((Z, Y, X) uint32), ``metrics.json`` (the ``stt evaluate --json`` keys), ``montage.png``
  (image / probability / instances / ground truth of the middle slice), ``run/`` (checkpoint
  and training log).

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
from .segment import instances, probabilities, score
from .train import Trainer, TrainOptions

# Everything the demo writes into its folder; an earlier demo's are replaced only with --overwrite.
DEMO_OUTPUTS = ("probabilities.h5", "instances.h5", "instances.tif", "metrics.json", "montage.png", "run")
TRAIN_SHAPE = (48, 256, 256)
TEST_SHAPE = (32, 256, 256)


def _volumes(data: Optional[str], seed: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(train image, train labels, test image, test instances)."""
    if data is None:
        train, test = synthetic_volume(TRAIN_SHAPE, seed=seed), synthetic_volume(TEST_SHAPE, seed=seed + 1)
        return train.image, train.labels, test.image, test.labels
    image, label = open_volume(f"{data}:image"), open_volume(f"{data}:label")
    if tuple(image.shape) != tuple(label.shape):
        raise ValueError(f"{data}: image {tuple(image.shape)} and label {tuple(label.shape)} differ in shape")
    split = int(round(image.shape[0] * 0.8))
    gt = np.asarray(ZRange(label, split, image.shape[0])[:])
    gt = instances_from_binary(gt > 0) if gt.max() <= 1 else gt
    return ZRange(image, 0, split), ZRange(label, 0, split), np.asarray(ZRange(image, split, image.shape[0])[:]), gt


def _montage(path: Path, image: np.ndarray, probs: np.ndarray, labels: np.ndarray, gt: np.ndarray) -> None:
    """The middle slice's image / probability / instances / ground truth, ``(Z, Y, X)`` volumes
    and ``(C, Z, Y, X)`` probabilities in; skipped with one line when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:
        # The demo's results are all written by now: a missing plotting package costs the picture only.
        print(f"{path.name} skipped: {exc.name} is not installed (matplotlib draws it: "
              "pip install 'stt-kernels[model]')")
        return

    z = image.shape[0] // 2
    panels = [("image", image[z], "gray"), ("probability", probs[0, z], "magma"),
              ("instances", labels[z], "nipy_spectral"), ("ground truth", gt[z], "nipy_spectral")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (title, panel, cmap) in zip(axes, panels):
        ax.imshow(panel, cmap=cmap, interpolation="nearest")
        ax.set_title(f"{title} (z = {z})")
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
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
        raise OutputError(f"--out {out} already holds a demo's outputs ({', '.join(existing)}); --overwrite replaces "
                          f"them (other files there are left alone)")
    for name in existing:
        if (out / name).is_dir() != (name == "run"):
            raise OutputError(f"--out {out}: {out / name} is a {'file' if name == 'run' else 'folder'}, not a demo "
                              f"output; it is left alone (move it or choose another --out)")
    for name in ("probabilities.h5", "instances.h5"):
        check_target(output_target(out / name), overwrite=True)
    try:
        (out / f".stt-probe-{os.getpid()}").mkdir()
        (out / f".stt-probe-{os.getpid()}").rmdir()
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write there: {exc.strerror or exc}") from None


def run_demo(out: Path, data: Optional[str] = None, minutes: float = 4.0, seed: int = 0,
             overwrite: bool = False) -> dict[str, float]:
    """The whole demo into the folder ``out`` (see the module doc); ``overwrite`` replaces the
    outputs of an earlier demo there, which are refused otherwise."""
    import tifffile

    started = time.monotonic()
    out = Path(out)
    check_demo_folder(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    cleaned = [line for name in ("probabilities.h5", "instances.h5")
               for line in remove_leftovers(output_target(out / name))]
    if cleaned:
        print(f"stt demo: left by killed runs: {'; '.join(cleaned)}")
    config = load_config("tiny-cpu")
    config.train.seed = seed
    print(f"stt demo: {'synthetic EM' if data is None else data}, tiny-cpu, {minutes:g} min of training -> {out}/")
    train_image, train_labels, test_image, gt = _volumes(data, seed)
    sampler = PatchSampler.from_config([(train_image, train_labels)], config)
    trainer = Trainer(config, sampler, TrainOptions(out_dir=out / "run", time_budget=minutes * 60,
                                                    overwrite=overwrite))
    result = trainer.run()

    shape = (config.model.out_channels, *test_image.shape)
    with create_output(out / "probabilities.h5", shape, np.uint8) as probs_out:
        probabilities(trainer.model, config, test_image, probs_out)
        probs = probs_out[:]
    labels = instances(probs)
    with create_output(out / "instances.h5", labels.shape, np.uint32) as labels_out:
        labels_out[:] = labels
    atomic_write(out / "instances.tif", lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
    metrics = score(probs, gt)
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1) + "\n"))
    _montage(out / "montage.png", np.asarray(test_image), probs, labels, gt)

    print(f"trained {result.step} steps (final loss {result.losses[-1]:.4f}); "
          f"test volume {tuple(test_image.shape)}: {int(labels.max())} instances found, {int(gt.max())} true")
    print("  " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    print(f"done in {time.monotonic() - started:.0f} s; outputs in {out}/")
    return metrics
