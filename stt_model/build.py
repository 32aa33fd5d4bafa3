"""``build_model`` / ``build_discriminator``: networks from a validated config."""

from __future__ import annotations

from typing import Any, Union

from .config import Config, load_config
from .nets import FgBgDiscriminator, STTUNet


def build_model(config: Union[str, dict[str, Any], Config]) -> STTUNet:
    """The STT-UNET of ``config`` (a preset name, YAML path, dict or Config):
    ``(B, in, T, H, W)`` -> logits ``(B, out, T, H, W)``."""
    return STTUNet(load_config(config).model)


def build_discriminator(config: Union[str, dict[str, Any], Config]) -> FgBgDiscriminator:
    """The FG-BG discriminator on ``concat(image, mask)``."""
    cfg = load_config(config)
    return FgBgDiscriminator(cfg.model.in_channels + 1, cfg.loss.discriminator_channels, cfg.loss.discriminator_output)
