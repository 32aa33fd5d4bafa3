"""One STT-UNET training step as a case of the ``stt_kernels.bench`` engine.

Registered through the ``stt_kernels.bench`` entry point (``pyproject.toml``), so
``stt bench`` and ``python -m stt_kernels.bench`` both run it when ``stt_model`` is installed.

The case is a preset's training batch: ``tiny-cpu`` (``8 x 64 x 64``, batch 2) in the
``quick`` and ``default`` tiers, ``mitoem-r`` (the paper's ``32 x 320 x 320``, batch 2) in
``full``. Its rows:

- ``forward``: the segmentation network's forward in eval mode, no gradients (inference);
- ``forward+backward``: one whole :meth:`stt_model.train.Trainer.train_step`: the network,
  BCE, the FG-BG discriminator's update and the adversarial term, backward, clipping, both
  Adam steps (AMP as the preset says, on GPU).

Each of our backends runs the same network (``model.backend``); ``reference`` is the network
on the plain-PyTorch ops. FLOPs are counted once per shape by ``torch.utils.flop_counter``
on the meta device (the reference ops, which the kernels compute exactly as many of), for the
segmentation network; the discriminator's share is left out.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from stt_kernels.bench.cases import Case, register_case
from stt_kernels.bench.implementation import Implementation, Unsupported
from stt_kernels.bench.ours import BACKEND_DEVICES, backend_unsupported
from stt_kernels.bench.registry import register_implementation
from stt_kernels.bench.shapes import Level

from .build import build_model
from .config import Config, load_config
from .train import TrainOptions, Trainer

NAME = "stt_unet_train_step"
_PRESET_OF_TIER = {"quick": "tiny-cpu", "default": "tiny-cpu", "full": "mitoem-r"}


@functools.lru_cache(maxsize=None)
def _preset(name: str) -> Config:
    return load_config(name)


def _level(preset: str) -> Level:
    config = _preset(preset)
    t, h, w = config.data.patch
    return Level(level=0, batch=config.train.batch_size, t=t, h=h, w=w,
                 channels=config.model.channels[0], heads=config.model.heads[0])


def _preset_of(level: Level) -> str:
    """The preset whose batch ``level`` is (or whose channels it keeps, for a small probe)."""
    for name in dict.fromkeys(_PRESET_OF_TIER.values()):
        full = _level(name)
        if (level.channels, level.heads) == (full.channels, full.heads):
            return name
    raise ValueError(f"no preset has first-level channels {level.channels} and heads {level.heads}")


def _config(level: Level, backend: str) -> Config:
    """The preset of ``level`` on ``backend``, training on ``level``'s batch and patch."""
    config = _preset_of(level)
    base = _preset(config)
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, backend=backend),
        data=dataclasses.replace(base.data, patch=[level.t, level.h, level.w]),
        train=dataclasses.replace(base.train, batch_size=level.batch))


@functools.lru_cache(maxsize=None)
def _flops(level: Level, pass_: str) -> float:
    config = _config(level, "reference")
    with torch.device("meta"):
        model = build_model(config)
        x = torch.empty(level.batch, config.model.in_channels, level.t, level.h, level.w)
    with FlopCounterMode(display=False) as counter:
        if pass_ == "forward":
            with torch.no_grad():
                model(x)
        else:
            model(x).sum().backward()
    return float(counter.get_total_flops())


class TrainStepCase(Case):
    name = NAME
    description = ("`forward`: the STT-UNET segmentation network's inference forward. `forward+backward`: one "
                   "whole training step (network, BCE, FG-BG discriminator update and adversarial term, "
                   "backward, clipping, both Adam steps). Shapes are a preset's training batch; GFLOP/s "
                   "count the segmentation network only.")

    def levels(self, tier: str) -> list[Level]:
        return [_level(_PRESET_OF_TIER[tier])]

    def small(self, level: Level) -> Level:
        # Three 1x2x2 downsamplings need H, W divisible by 8.
        return dataclasses.replace(level, batch=1, t=2, h=16, w=16)

    def label(self, level: Level) -> str:  # type: ignore[override]
        return f"{_preset_of(level)} B{level.batch} T{level.t} {level.h}x{level.w}"

    def leaves(self, level: Level, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        config = _config(level, "reference")
        image = torch.randn(level.batch, config.model.in_channels, level.t, level.h, level.w, generator=generator)
        target = torch.rand(level.batch, config.model.out_channels, level.t, level.h, level.w,
                            generator=generator) < 0.2
        return image.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)

    def arguments(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(leaves)

    def flops(self, level: Level, pass_: str) -> float:
        return _flops(level, pass_)

    def bytes(self, level: Level, dtype: torch.dtype, pass_: str) -> Optional[float]:
        return None


def _make_step(backend: str, level: Level, leaves: Sequence[torch.Tensor], pass_: str) -> Callable[[], None]:
    image, target = leaves
    if image.dtype != torch.float32:
        raise Unsupported("the network trains in float32 parameters (with the preset's AMP on GPU)")
    config = _config(level, backend)
    if pass_ == "forward":
        model = build_model(config).to(image.device).eval()

        def forward() -> None:
            with torch.no_grad():
                model(image)
        return forward
    trainer = Trainer(config, source=None,  # type: ignore[arg-type]  # batches come from the case
                      options=TrainOptions(out_dir=Path(tempfile.gettempdir()), device=str(image.device),
                                           progress=False))

    def train_step() -> None:
        trainer.train_step(image, target)
    return train_step


def _step_unsupported(backend: str, device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    if dtype != torch.float32:
        return "the network trains in float32 parameters (with the preset's AMP on GPU)"
    return backend_unsupported(backend, device, dtype, pass_)


register_case(TrainStepCase())
for _backend, _devices in BACKEND_DEVICES.items():
    register_implementation(Implementation(
        name="reference" if _backend == "reference" else f"ours:{_backend}", op=NAME,
        kind="reference" if _backend == "reference" else "ours", devices=_devices,
        make_step=functools.partial(_make_step, _backend),
        unsupported=functools.partial(_step_unsupported, _backend)))
