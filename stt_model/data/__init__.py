"""EM data: lazy volume readers and atomic outputs, training targets, a synthetic EM generator,
seeded patch sampling and augmentations. Volumes are (Z, Y, X) throughout."""

from .augment import (
    Compose,
    CutNoise,
    Elastic,
    Flip,
    GrayJitter,
    Misalign,
    MissingSection,
    MotionBlur,
    Rescale,
    Rotate90,
    Transform,
    default_augmentations,
)
from .intensity import check_image, parse_intensity, to_unit_range
from .outputs import OutputVolume, create_output
from .sampling import ForegroundIndex, PatchSampler, read_window
from .scan import InputError
from .synthetic import SyntheticVolume, synthetic_volume
from .targets import binary_mask, check_labels, instance_contour, instances_from_binary, make_targets
from .volumes import (
    HDF5Volume,
    SliceFolderVolume,
    TiffVolume,
    Volume,
    VolumeReadError,
    ZarrVolume,
    ZRange,
    open_volume,
    split_spec,
)

__all__ = [
    "Volume",
    "open_volume",
    "split_spec",
    "HDF5Volume",
    "TiffVolume",
    "SliceFolderVolume",
    "ZarrVolume",
    "ZRange",
    "VolumeReadError",
    "InputError",
    "check_image",
    "check_labels",
    "parse_intensity",
    "to_unit_range",
    "OutputVolume",
    "create_output",
    "binary_mask",
    "instance_contour",
    "instances_from_binary",
    "make_targets",
    "SyntheticVolume",
    "synthetic_volume",
    "ForegroundIndex",
    "PatchSampler",
    "read_window",
    "Transform",
    "Compose",
    "Flip",
    "Rotate90",
    "Rescale",
    "Elastic",
    "Misalign",
    "GrayJitter",
    "MissingSection",
    "MotionBlur",
    "CutNoise",
    "default_augmentations",
]
