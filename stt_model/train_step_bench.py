"""One STT-UNET training step as a case of the ``stt_kernels.bench`` engine.

Importing this module registers the case and the ``train-step`` suite with the engine; ``stt
bench`` does so before it reads its options (``stt bench --suite train-step``). The kernel
package never imports it: the dependency runs one way, from ``stt_model`` to ``stt_kernels``.

The shape is a preset's training batch, the preset's name in ``Shape.name``: ``tiny-cpu``
(``8 x 64 x 64``, batch 2) in the ``quick`` and ``default`` tiers, ``mitoem-r`` (the paper's
``32 x 320 x 320``, batch 2) in ``full``. Its rows:

- ``forward``: the segmentation network's forward in eval mode, no gradients (inference);
- ``forward+backward``: one whole :meth:`stt_model.train.Trainer.train_step`: the network,
  BCE, the FG-BG discriminator's update and the adversarial term, backward, clipping, both
  Adam steps (AMP as the preset says, on GPU).

Each of our backends runs the same network (``model.backend``); ``reference`` is the network on
the plain-PyTorch ops. FLOPs are counted once per shape by ``torch.utils.flop_counter`` on the
meta device, for the segmentation network (the discriminator's share is left out).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from stt_kernels.bench import Case, Shape, Unsupported, backend_unsupported, register_backends, register_case
from stt_kernels.bench import register_suite

from .build import build_model
from .config import Config, load_config
from .train import TrainOptions, Trainer

NAME = "stt_unet_train_step"
_PRESET_OF_TIER = {"quick": "tiny-cpu", "default": "tiny-cpu", "full": "mitoem-r"}
_FLOAT32_ONLY = "the network trains in float32 parameters (with the preset's AMP on GPU)"


def preset_shape(preset: str) -> Shape:
    """The training batch of ``preset``."""
    config = load_config(preset)
    t, h, w = config.data.patch
    return Shape(config.train.batch_size, t, h, w, config.model.channels[0], config.model.heads[0], preset)


def _config(shape: Shape, backend: str) -> Config:
    """The preset named by ``shape`` on ``backend``, training on ``shape``'s batch and patch."""
    base = load_config(shape.name)
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, backend=backend),
        data=dataclasses.replace(base.data, patch=[shape.t, shape.h, shape.w]),
        train=dataclasses.replace(base.train, batch_size=shape.batch))


@functools.lru_cache(maxsize=None)
def _flops(shape: Shape, pass_: str) -> float:
    config = _config(shape, "reference")
    with torch.device("meta"):
        model = build_model(config)
        x = torch.empty(shape.batch, config.model.in_channels, shape.t, shape.h, shape.w)
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

    def small(self, shape: Shape) -> Shape:
        # Three 1 x 2 x 2 downsamplings need H, W divisible by 8.
        return dataclasses.replace(shape, batch=1, t=2, h=16, w=16)

    def label(self, shape: Shape) -> str:
        return f"{shape.name} B{shape.batch} T{shape.t} {shape.h}x{shape.w}"

    def leaves(self, shape: Shape, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        model = _config(shape, "reference").model
        image = torch.randn(shape.batch, model.in_channels, shape.t, shape.h, shape.w, generator=generator)
        target = torch.rand(shape.batch, model.out_channels, shape.t, shape.h, shape.w, generator=generator) < 0.2
        return image.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)

    def flops(self, shape: Shape, pass_: str) -> float:
        return _flops(shape, pass_)

    def bytes(self, shape: Shape, dtype: torch.dtype, pass_: str) -> Optional[float]:
        return None


def _make_step(backend: str, shape: Shape, leaves: Sequence[torch.Tensor], pass_: str) -> Callable[[], None]:
    image, target = leaves
    if image.dtype != torch.float32:
        raise Unsupported(_FLOAT32_ONLY)
    config = _config(shape, backend)
    if pass_ == "forward":
        model = build_model(config).to(image.device).eval()

        def forward() -> None:
            with torch.no_grad():
                model(image)
        return forward
    trainer = Trainer(config, source=None,  # type: ignore[arg-type]  # batches come from the case
                      options=TrainOptions(out_dir=Path(tempfile.gettempdir()), device=str(image.device),
                                           progress=False))
    return lambda: trainer.train_step(image, target)


def _step_unsupported(backend: str, device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    return _FLOAT32_ONLY if dtype != torch.float32 else backend_unsupported(backend, device, dtype, pass_)


register_case(TrainStepCase())
register_backends(NAME, make_step=_make_step, unsupported=_step_unsupported)
register_suite("train-step", lambda tier: [(NAME, preset_shape(_PRESET_OF_TIER[tier]), None)])
