"""Out-of-core segmentation of a large chunked volume on this machine (issue 7): ``stt predict``
with ``--instances`` on a synthetic HDF5 volume, timed, with the peak resident memory of the
predicting process.

    python benchmarks/bench_predict_volume.py --shape 256 2048 2048 --work /tmp/bench-predict

The volume is synthetic EM (``stt_model.data.synthetic_volume``) generated tile by tile into a
chunked (16, 128, 128) gzip HDF5 file, so making it never holds more than one tile either. The
checkpoint is a ``tiny-cpu`` network (``--checkpoint``; default: a freshly initialised one: the
work per voxel does not depend on the weights, only the instance count does). Prints one JSON
object: voxels, seconds for prediction and post-processing, voxels per second, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

TILE = (32, 512, 512)


def make_volume(path: Path, shape: tuple[int, int, int], seed: int) -> None:
    """Synthetic EM of ``shape`` in ``path:image``, written one tile at a time."""
    from stt_model.data import synthetic_volume

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        image = f.create_dataset("image", shape=shape, dtype=np.uint8, chunks=(16, 128, 128), compression="gzip",
                                 compression_opts=1)
        # A handful of distinct tiles, reused: generating each one costs seconds.
        tiles = [synthetic_volume(TILE, seed=seed + i).image for i in range(4)]
        n = 0
        for z in range(0, shape[0], TILE[0]):
            for y in range(0, shape[1], TILE[1]):
                for x in range(0, shape[2], TILE[2]):
                    tile = tiles[n % len(tiles)]
                    n += 1
                    dz, dy, dx = min(TILE[0], shape[0] - z), min(TILE[1], shape[1] - y), min(TILE[2], shape[2] - x)
                    image[z:z + dz, y:y + dy, x:x + dx] = tile[:dz, :dy, :dx]
    tmp.replace(path)


def fresh_checkpoint(path: Path) -> None:
    import torch

    from stt_model import build_model, load_config
    from stt_model.checkpoint import atomic_save

    config = load_config("tiny-cpu")
    torch.manual_seed(0)
    atomic_save({"config": config.to_dict(), "model": build_model(config).state_dict()}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 2048, 2048], metavar=("Z", "Y", "X"))
    parser.add_argument("--work", type=Path, required=True, help="folder for the volume and the outputs")
    parser.add_argument("--checkpoint", type=Path, help="a tiny-cpu checkpoint (default: freshly initialised)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the predicting process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.shape)
    volume = args.work / f"synthetic_{'x'.join(map(str, shape))}.h5"
    if not volume.exists():
        started = time.perf_counter()
        make_volume(volume, shape, args.seed)
        print(f"made {volume} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    checkpoint = args.checkpoint or args.work / "tiny-cpu-init.pt"
    if args.checkpoint is None and not checkpoint.exists():
        fresh_checkpoint(checkpoint)
    env = None
    if args.threads:
        import os
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "stt_model.cli", "predict", "--checkpoint", str(checkpoint),
               "--image", f"{volume}:image", "--out", str(args.work / "probs.h5"),
               "--instances", str(args.work / "instances.h5")]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"stt predict failed:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    voxels = int(np.prod(shape))
    print(json.dumps({"shape": shape, "voxels": voxels, "seconds": round(seconds, 1),
                      "voxels_per_s": round(voxels / seconds), "peak_rss_bytes": peak,
                      "peak_rss_gib": round(peak / 2**30, 3), "threads": args.threads,
                      "stdout": done.stdout.strip().splitlines()[-2:]}))


if __name__ == "__main__":
    main()
