"""Cases of ``stt_model`` for the ``stt_kernels.bench`` engine, and their suites, registered on
import (``stt bench`` imports this before reading its options). The kernel package never imports
it: the dependency runs one way, from ``stt_model`` to ``stt_kernels``. Both cases run in float32
only: the network trains in float32 parameters (with the preset's AMP on GPU).

``train-step``: one STT-UNET training step on a preset's batch (``Shape.name``: ``tiny-cpu`` in the
``quick`` and ``default`` tiers, ``mitoem-r``, the paper's 2 x 32 x 320 x 320, in ``full``).
``forward`` is the network's inference forward; ``forward+backward`` one :meth:`Trainer.train_step`
(network, BCE, the FG-BG discriminator's update and adversarial term, backward, clipping, both Adam
steps, AMP as the preset says on GPU). FLOPs by ``torch.utils.flop_counter`` on the meta device,
for the segmentation network.

``predict-volume``: ``stt predict --instances`` out of core on a chunked synthetic HDF5 volume of
``t x h x w`` (32 x 512 x 512 quick, 32 x 2048 x 2048 default, 256 x 2048 x 2048 full), a fresh
``tiny-cpu`` network: the time per volume and the predicting process's peak memory.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stt_kernels.bench import Case, Shape, register_backends, register_case, register_suite
from stt_kernels.bench.cases import Tensors
from stt_kernels.bench.impls import Step

from .build import build_model
from .checkpoint import atomic_save
from .config import Config, load_config
from .train import Trainer, TrainOptions

NAME = "stt_unet_train_step"
_PRESET_OF_TIER = {"quick": "tiny-cpu", "default": "tiny-cpu", "full": "mitoem-r"}


def preset_shape(preset: str) -> Shape:
    """The training batch of ``preset``."""
    config = load_config(preset)
    t, h, w = config.data.patch
    return Shape(config.train.batch_size, t, h, w, config.model.channels[0], config.model.heads[0], preset)


def _config(shape: Shape, backend: str) -> Config:
    """The preset named by ``shape`` on ``backend``, training on ``shape``'s batch and patch."""
    base = load_config(shape.name)
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, backend=backend),
        data=dataclasses.replace(base.data, patch=[shape.t, shape.h, shape.w]),
        train=dataclasses.replace(base.train, batch_size=shape.batch),
    )


@functools.cache
def _flops(shape: Shape, pass_: str) -> float:
    config = _config(shape, "reference")
    with torch.device("meta"):
        model = build_model(config)
        x = torch.empty(shape.batch, config.model.in_channels, shape.t, shape.h, shape.w)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(pass_ != "forward"):
        out = model(x)
        if pass_ != "forward":
            out.sum().backward()
    return float(counter.get_total_flops())


class TrainStepCase(Case):
    name = NAME
    dtypes = (torch.float32,)
    description = (
        "`forward`: the STT-UNET segmentation network's inference forward. `forward+backward`: one "
        "whole training step (network, BCE, FG-BG discriminator update and adversarial term, "
        "backward, clipping, both Adam steps). Shapes are a preset's training batch; GFLOP/s "
        "count the segmentation network only."
    )

    def small(self, shape: Shape) -> Shape:
        # Three 1 x 2 x 2 downsamplings need H, W divisible by 8.
        return dataclasses.replace(shape, batch=1, t=2, h=16, w=16)

    def label(self, shape: Shape) -> str:
        return f"{shape.name} B{shape.batch} T{shape.t} {shape.h}x{shape.w}"

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensors:
        model = _config(shape, "reference").model
        image = torch.randn(shape.batch, model.in_channels, shape.t, shape.h, shape.w, generator=gen)
        target = torch.rand(shape.batch, model.out_channels, shape.t, shape.h, shape.w, generator=gen) < 0.2
        return image.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)

    def flops(self, shape: Shape, pass_: str) -> float:
        return _flops(shape, pass_)


def _train_step(backend: str, shape: Shape, leaves: Tensors, pass_: str) -> Step:
    (image, target), config = leaves, _config(shape, backend)
    if pass_ == "forward":
        model = build_model(config).to(image.device).eval()
        return torch.no_grad()(lambda: model(image))
    options = TrainOptions(out_dir=Path(tempfile.gettempdir()), device=str(image.device), progress=False)
    trainer = Trainer(config, source=None, options=options)  # type: ignore[arg-type]  # batches come from the case
    return lambda: trainer.train_step(image, target)


register_case(TrainStepCase())
register_backends(NAME, lambda backend: functools.partial(_train_step, backend))
register_suite("train-step", lambda tier: [(NAME, preset_shape(_PRESET_OF_TIER[tier]), None)])


class PredictVolumeCase(Case):
    name = "stt_predict_volume"
    dtypes = (torch.float32,)
    description = (
        "One `stt predict --instances` of a chunked (16 x 128 x 128, gzip) synthetic HDF5 volume by a "
        "fresh `tiny-cpu` network (window 8 x 64 x 64, overlap 0.25), probabilities and instances "
        "written: seconds per volume, and the peak memory of the predicting process."
    )

    def label(self, shape: Shape) -> str:
        return f"volume {shape.t}x{shape.h}x{shape.w}"

    def small(self, shape: Shape) -> Shape:
        return dataclasses.replace(shape, t=8, h=64, w=64)  # one window

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensors:
        return ()

    def flops(self, shape: Shape, pass_: str) -> float:
        return 0.0  # no work model: the network, the blending and the post-processing


TILE = (32, 512, 512)  # the volume repeats one synthetic tile: generating a tile costs seconds


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory:
    """A folder for the volumes and outputs, removed when the process exits."""
    return tempfile.TemporaryDirectory(prefix="stt-bench-")


def volume(shape: Shape) -> Path:
    """The synthetic volume of ``shape``'s ``t x h x w`` in ``image`` of an HDF5 file, written tile by tile."""
    import h5py

    from .data import synthetic_volume

    size, path = (shape.t, shape.h, shape.w), Path(_scratch().name) / f"volume_{shape.t}x{shape.h}x{shape.w}.h5"
    if not path.exists():
        tile = synthetic_volume(tuple(min(n, m) for n, m in zip(size, TILE)), seed=0).image
        with h5py.File(path, "w") as f:
            chunks = tuple(min(n, m) for n, m in zip(size, (16, 128, 128)))
            image = f.create_dataset("image", size, "uint8", chunks=chunks, compression="gzip", compression_opts=1)
            for z, y, x in itertools.product(*(range(0, n, m) for n, m in zip(size, tile.shape))):
                part = tile[: size[0] - z, : size[1] - y, : size[2] - x]
                image[z : z + part.shape[0], y : y + part.shape[1], x : x + part.shape[2]] = part
    return path


def _predict_step(backend: str, shape: Shape, leaves: Tensors, pass_: str) -> Step:
    from .cli import main

    config, work = _config(preset_shape("tiny-cpu"), backend), Path(_scratch().name)
    torch.manual_seed(0)
    atomic_save({"config": config.to_dict(), "model": build_model(config).state_dict()}, work / f"{backend}.pt")
    command = ["predict", f"--checkpoint={work / f'{backend}.pt'}", f"--image={volume(shape)}:image"]
    command += [f"--out={work / 'probs.h5'}", f"--instances={work / 'instances.h5'}", "--overwrite"]

    def step() -> None:
        if (code := main(command)) != 0:
            raise RuntimeError(f"stt {' '.join(command)} exited with {code}")

    return step


register_case(PredictVolumeCase())
register_backends(PredictVolumeCase.name, lambda backend: functools.partial(_predict_step, backend))
_VOLUME_OF_TIER = {"quick": (32, 512, 512), "default": (32, 2048, 2048), "full": (256, 2048, 2048)}
_volume = lambda tier: Shape(1, *_VOLUME_OF_TIER[tier], 1, 1, "volume")
register_suite("predict-volume", lambda tier: [(PredictVolumeCase.name, _volume(tier), ("forward",))])
