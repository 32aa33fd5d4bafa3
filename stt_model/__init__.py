"""STT-UNET model package: networks, data, training, inference, post-processing and metrics
for 3D mitochondria instance segmentation in electron microscopy (DESIGN.md section 6).

Entry points: :func:`load_config` (presets ``mitoem-r``, ``mitoem-h``, ``lucchi``,
``tiny-cpu``, or a YAML file), :func:`build_model` (``(B, 1, T, H, W)`` -> logits
``(B, out, T, H, W)``) and :func:`load_pretrained` (a shipped model by name; ``stt models``).
"""

from .build import build_discriminator, build_model
from .config import Config, ConfigError, load_config

__all__ = ["load_config", "build_model", "build_discriminator", "load_pretrained", "Config", "ConfigError"]


def load_pretrained(name: str, device=None):
    """A shipped model, verified against its card's SHA-256: see :func:`stt_model.pretrained.load_pretrained`
    (imported on first use: it needs the [model] extras, which ``import stt_model`` does not)."""
    from .pretrained import load_pretrained as load

    return load(name, device)
