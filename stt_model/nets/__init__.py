"""Networks of STT-UNET: the segmentation network, its blocks, the interpolation (denoising)
network and the FG-BG discriminator."""

from .discriminator import FgBgDiscriminator
from .interpolation import InterpolationNet
from .unet import STTUNet

__all__ = ["STTUNet", "InterpolationNet", "FgBgDiscriminator"]
