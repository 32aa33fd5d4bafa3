"""STT-UNET model package: networks, data, training, inference, post-processing and metrics
for 3D mitochondria instance segmentation in electron microscopy (DESIGN.md section 6).

Entry points: :func:`load_config` (presets ``mitoem-r``, ``mitoem-h``, ``lucchi``,
``tiny-cpu``, or a YAML file) and :func:`build_model` (``(B, 1, T, H, W)`` -> logits
``(B, out, T, H, W)``).
"""

from .build import build_discriminator, build_model
from .config import Config, ConfigError, load_config

__all__ = ["load_config", "build_model", "build_discriminator", "Config", "ConfigError"]
