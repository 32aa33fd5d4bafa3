"""``stt predict`` as several processes (``torchrun``): one output from many ranks.

Each rank predicts its share of the output blocks (:func:`stt_model.infer.rank_blocks`: block
``i`` goes to rank ``i % world``) into a part file of its own beside the output, because an
HDF5 file takes one writer at a time. After a barrier, rank 0 copies every part's blocks into
the output, bridges the blank input slices (which the parts cannot: no rank holds both sides of
one for sure), publishes it atomically and deletes the parts; the blocks are predicted exactly
as one process predicts them, so the result is the same whatever the number of ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .data import create_output, open_volume
from .data.intensity import IntensitySpec
from .data.outputs import reserved_bytes
from .data.volumes import split_spec
from .errors import UserInputError
from .infer import InferOptions, blank_slices, bridge_blank_slices, rank_blocks


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (``torchrun``'s variables; 0 and 1 alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def device_for_rank(requested: str | None) -> str:
    """``requested`` (checked: ``cpu``, ``cuda`` or ``cuda:<index>``; plain ``cuda`` is this
    rank's GPU), else this rank's GPU (``LOCAL_RANK``) when there is one, else the CPU. A device
    that is not there is a ``ValueError`` naming ``--device``, said before any work."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not requested:
        return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserInputError(
            f"--device {requested!r} is not a device stt predicts on; expected cpu, cuda or cuda:<index>"
        )
    if device.type == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UserInputError(
            f"--device {requested}: no CUDA/ROCm GPU is visible here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
        )
    count = torch.cuda.device_count()
    index = local_rank % count if device.index is None else device.index
    if index >= count:
        raise UserInputError(f"--device {requested}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return f"cuda:{index}"


def start() -> None:
    """Join the ranks' group. Gloo even on GPUs: the ranks exchange nothing but barriers."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def part_spec(spec: str, rank: int, world: int) -> str:
    """The part file of ``rank`` for the output ``spec`` (``out.h5[:dataset]``): hidden, beside
    it, a whole file of its own (dataset ``main``) even when the output is a dataset of a
    shared file, so ranks never write into one file."""
    path, _ = split_spec(spec)
    return str(path.with_name(f".{path.stem}.part{rank}of{world}{path.suffix}"))


def part_bytes(nbytes: int, world: int) -> int:
    """Disk to set aside for one rank's part of an ``nbytes`` output: its share of the blocks."""
    return reserved_bytes(-(-nbytes // world))


def merge(
    spec: str,
    shape: Sequence[int],
    window: Sequence[int],
    options: dict[str, Any],
    world: int,
    overwrite: bool = True,
    image: Any = None,
    intensity: IntensitySpec = "dtype",
) -> list[int]:
    """Copy every rank's blocks from its part file into the output ``spec`` ``(C, Z, Y, X)``
    uint8, bridge the blank slices of ``image (Z, Y, X)`` when ``options["bridge_blank"]`` (read
    with ``intensity``, as the ranks read it), publish it, delete the parts; returns the bridged
    slices. ``options``: the :class:`~stt_model.infer.InferOptions` fields the ranks ran with
    (they fix the blocks)."""
    parts = [part_spec(spec, rank, world) for rank in range(world)]
    bridged: list[int] = []
    with create_output(spec, shape, np.uint8, overwrite=overwrite) as out:
        for rank, part in enumerate(parts):
            volume = open_volume(part)
            blocks = rank_blocks(
                tuple(shape[1:]),
                InferOptions(
                    window=tuple(window),
                    **options,  # type: ignore[arg-type]
                    rank=rank,
                    world=world,
                ),
            )
            for block in blocks:
                out[(slice(None), *block)] = volume[(slice(None), *block)]
        if options.get("bridge_blank", True) and image is not None:
            bridged = bridge_blank_slices(out, blank_slices(image, intensity))
    for part in parts:
        path = Path(part)
        if path.is_dir():
            shutil.rmtree(path)  # zarr
        else:
            path.unlink(missing_ok=True)
    return bridged


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
