"""Configuration: the paper's presets and a strict YAML loader.

``load_config(name_or_yaml)`` takes a preset name (``mitoem-r``, ``mitoem-h``, ``lucchi``,
``tiny-cpu``), a path to a YAML file, or a dict. A file or dict may start from a preset with
``base: <preset>`` and override any field. Unknown keys and bad values raise ``ConfigError``
naming the key (``model.heads``); the config travels inside every checkpoint as ``to_dict()``.
``apply_overrides(config, ["train.lr=3e-4", "model.channels=[8,16]"])`` sets fields by dotted
key (``stt train --set``), each value read as YAML and checked as a YAML file's would be.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

from .errors import UserInputError

PRESET_DIR = Path(__file__).with_name("configs")


class ConfigError(UserInputError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass
class ModelConfig:
    in_channels: int = 1
    out_channels: int = 2  # 2: mask + contour (MitoEM); 1: mask (Lucchi)
    channels: list[int] = field(default_factory=lambda: [28, 36, 48, 64])  # per encoder level
    heads: list[int] = field(default_factory=lambda: [4, 4, 4, 4])
    sst_levels: list[bool] = field(default_factory=lambda: [True, True, True, True])
    fusion: Literal["deformable", "add", "concat"] = "deformable"
    order: Literal["split", "spatial_temporal", "temporal_spatial"] = "split"
    offset_groups: int = 1
    norm: Literal["batch", "group", "instance"] = "batch"
    # The denoising network: none, trained with the rest, or frozen.
    interpolation: Literal["none", "joint", "frozen"] = "joint"
    interpolation_kernel: int = 5
    # (T, H, W) factors: the network sees its input average-pooled by them and its logits are
    # upsampled back (trilinear), so a patch covers that much more context at the same cost.
    input_downsample: list[int] = field(default_factory=lambda: [1, 1, 1])
    # Width of a full-resolution refinement of those upsampled logits (0: none): two convs on the
    # input beside the logits, so boundaries are placed at full resolution. Needs input_downsample.
    refine_channels: int = 0
    backend: Literal["auto", "triton", "cuda", "cpu", "reference"] = "auto"


@dataclass
class DataConfig:
    patch: list[int] = field(default_factory=lambda: [32, 320, 320])  # (T, H, W)
    foreground_bias: float = 0.5  # probability that a patch is centred on foreground
    augment: bool = True
    augmentations: Literal["full", "medium", "light"] = "full"  # all EM transforms; no section artefacts; symmetries
    contour_width: int = 1
    # Stored intensities to [0, 1], the same in training and prediction (stt_model.data.intensity):
    # "dtype" (integers / their dtype's maximum, floats already in [0, 1]) or [min, max] (linear, clipped).
    intensity: Union[Literal["dtype"], list[float]] = "dtype"

    def check_inputs(self) -> None:
        """The input-normalisation fields (kept apart from ``Config.validate``'s range checks)."""
        from .data.intensity import parse_intensity

        try:
            parse_intensity(self.intensity)
        except ValueError as exc:
            raise ConfigError(f"data.{exc}") from None


@dataclass
class LossConfig:
    adversarial_weight: float = 0.5  # lambda of L = L_BCE + lambda * L_fg-bg
    adversarial_warmup: int = 0  # steps over which lambda ramps linearly from 0 (0: full from step 1)
    lambda1: float = 1.0  # weight of the D(F_gt) - D(F_pr) term of Eq. 4
    # D sees the prediction thresholded at 0.5 (straight-through gradient), binary like the truth.
    discriminator_binary: bool = False
    # The segmentation network's side of Eq. 4 (losses.generator_loss); "minimax" is Eq. 4 itself.
    adversarial_objective: Literal["non_saturating", "minimax"] = "non_saturating"
    discriminator_channels: int = 16
    # D's verdict: one per volume (features averaged, then a linear head), or one per patch of
    # its receptive field (a 1x1x1 convolution head, PatchGAN style as in pix2pix, the paper's [8]).
    discriminator_output: Literal["volume", "patch"] = "volume"
    dice_weight: float = 0.0
    contour_pos_weight: float = 1.0  # weighted BCE for the sparse contour map


@dataclass
class TrainConfig:
    batch_size: int = 2
    lr: float = 1e-4
    iterations: int = 200_000
    warmup: int = 1000
    lr_steps: list[int] = field(default_factory=lambda: [150_000])
    lr_gamma: float = 0.1
    grad_clip: float = 1.0
    amp: bool = True
    seed: int = 0
    # > 0: validate and save an exponential moving average of the weights (stt_model.weight_average)
    ema_decay: float = 0.0
    val_every: int = 5000
    checkpoint_every: int = 5000


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        _check_finite("", self)
        m, d, t = self.model, self.data, self.train
        levels = len(m.channels)
        if levels < 1:
            raise ConfigError("model.channels must name at least one level")
        for key, values in (("model.heads", m.heads), ("model.sst_levels", m.sst_levels)):
            if len(values) != levels:
                raise ConfigError(
                    f"{key} must have one entry per level ({levels}, as model.channels); got {len(values)}"
                )
        for level, (c, h) in enumerate(zip(m.channels, m.heads)):
            _positive(f"model.channels[{level}]", c)
            _positive(f"model.heads[{level}]", h)
            if c % h:
                raise ConfigError(f"model.heads[{level}] ({h}) must divide model.channels[{level}] ({c})")
            if c % m.offset_groups:
                raise ConfigError(f"model.offset_groups ({m.offset_groups}) must divide model.channels[{level}] ({c})")
        for key in ("in_channels", "out_channels", "offset_groups"):
            _positive(f"model.{key}", getattr(m, key))
        if m.interpolation_kernel < 1 or m.interpolation_kernel % 2 == 0:
            raise ConfigError(f"model.interpolation_kernel must be a positive odd int; got {m.interpolation_kernel}")
        if len(d.patch) != 3:
            raise ConfigError(f"data.patch must be [T, H, W]; got {d.patch}")
        for axis, size in zip("THW", d.patch):
            _positive(f"data.patch ({axis})", size)
        if len(m.input_downsample) != 3:
            raise ConfigError(f"model.input_downsample must be [T, H, W] factors; got {m.input_downsample}")
        for axis, factor in zip("THW", m.input_downsample):
            _positive(f"model.input_downsample ({axis})", factor)
        if m.refine_channels < 0:
            raise ConfigError(f"model.refine_channels must be >= 0 (0: no refinement); got {m.refine_channels}")
        if m.refine_channels and m.input_downsample == [1, 1, 1]:
            raise ConfigError(
                "model.refine_channels refines logits upsampled from model.input_downsample, "
                "which is [1, 1, 1] (nothing to refine): set input_downsample or refine_channels: 0"
            )
        ft, fh, fw = m.input_downsample
        down = 2 ** (levels - 1)
        multiple = [ft, fh * down, fw * down]
        if any(n % k for n, k in zip(d.patch, multiple)):
            raise ConfigError(
                f"data.patch must be divisible by {multiple}: model.input_downsample "
                f"{m.input_downsample}, times 2**(levels-1) = {down} in H and W (the 1x2x2 "
                f"downsamplings); got {d.patch}"
            )
        if not 0 <= d.foreground_bias <= 1:
            raise ConfigError(f"data.foreground_bias must be in [0, 1]; got {d.foreground_bias}")
        d.check_inputs()
        for key in ("batch_size", "iterations", "val_every", "checkpoint_every"):
            _positive(f"train.{key}", getattr(t, key))
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be positive; got {t.lr}")
        if t.grad_clip <= 0:
            raise ConfigError(
                f"train.grad_clip must be > 0 (the largest gradient norm a step may take); got {t.grad_clip}"
            )
        if not 0 < t.lr_gamma <= 1:
            raise ConfigError(
                f"train.lr_gamma must be in (0, 1] (the LR's factor at each of train.lr_steps); got {t.lr_gamma}"
            )
        if not 0 <= t.ema_decay < 1:
            raise ConfigError(
                f"train.ema_decay must be in [0, 1) (0: no weight average; 0.999: about the last 1000 steps); "
                f"got {t.ema_decay}"
            )
        if t.warmup < 0:
            raise ConfigError(f"train.warmup must be >= 0 steps; got {t.warmup}")
        for i, step in enumerate(t.lr_steps):
            if step < 0 or (i and step <= t.lr_steps[i - 1]):
                raise ConfigError(f"train.lr_steps must be non-negative steps in increasing order; got {t.lr_steps}")
        for key in ("adversarial_weight", "lambda1", "dice_weight", "contour_pos_weight"):
            if getattr(self.loss, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0; got {getattr(self.loss, key)}")
        if self.loss.adversarial_warmup < 0:
            raise ConfigError(f"loss.adversarial_warmup must be >= 0 steps; got {self.loss.adversarial_warmup}")
        return self


def _check_finite(key: str, value: Any) -> None:
    """Every float in the config, however deep, is finite: NaN passes every range check."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(f"{key}.{f.name}" if key else f.name, getattr(value, f.name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(f"{key}[{i}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number; got {value}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1; got {value}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a dataclass field's type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            choices = ", ".join(repr(a) for a in typing.get_args(annotation))
            raise ConfigError(f"{key} must be one of {choices}; got {value!r}")
        return value
    if origin is Union:
        options = typing.get_args(annotation)
        # A list is checked item by item against the list option, so its message names the item.
        fitting = [o for o in options if (typing.get_origin(o) is list) == isinstance(value, list)]
        for option in fitting:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                if len(fitting) == 1 and isinstance(value, list):
                    raise
        raise ConfigError(f"{key} must be {' or '.join(_describe(o) for o in options)}; got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {annotation} for {key}")  # pragma: no cover


def _describe(annotation: Any) -> str:
    """A config type in words, for the message of a value that fits none of a Union's options."""
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of {_describe(typing.get_args(annotation)[0])}s"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(annotation, str(annotation))


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping; got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''}{where}: "
            f"{', '.join((prefix + '.' if prefix else '') + k for k in unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    return cls(**{k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in values.items()})


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# YAML 1.1 (PyYAML) reads 3e-4 and 1e5 as strings: a float needs a dot there. A learning rate
# is written that way more often than not, so numbers are read as YAML 1.2 reads them.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+.0123456789"))
    return Loader


def _parse_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = _parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return data if data is not None else {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 0.0003)``: the dotted key and its value read as
    YAML (a scalar, a ``[list]``, a ``{mapping}``)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not part.strip() for part in parts):
        raise ConfigError(f"--set expects key=value with a dotted config key (train.lr=3e-4); got {text!r}")
    try:
        value = _parse_yaml(raw)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({reason})") from None
    return [part.strip() for part in parts], value


def apply_overrides(config: Union[Config, dict[str, Any]], overrides: Sequence[str]) -> Config:
    """``config`` with each ``key=value`` of ``overrides`` set in turn, validated. Unknown keys and
    values of the wrong type raise ``ConfigError`` naming the key, as in a YAML file."""
    values = config.to_dict() if isinstance(config, Config) else dict(config)
    for text in overrides:
        parts, value = parse_override(text)
        for depth in range(len(parts) - 1, 0, -1):
            value = {parts[depth]: value}
        values = _merge(values, {parts[0]: value})
        _build(Config, values)  # the key and the type, while the override is the one to blame
    return _build(Config, values).validate()


def load_config(source: Union[str, Path, dict[str, Any], Config]) -> Config:
    """A validated :class:`Config` from a preset name, a YAML path or a dict."""
    if isinstance(source, Config):
        return _build(Config, source.to_dict()).validate()
    if isinstance(source, dict):
        values = dict(source)
    else:
        path = Path(source)
        if str(source) in presets():
            values = _read_yaml(PRESET_DIR / f"{source}.yaml")
        elif path.suffix in (".yaml", ".yml") or path.exists():
            if not path.exists():
                raise ConfigError(f"config file {path} does not exist")
            values = _read_yaml(path)
        else:
            raise ConfigError(f"unknown config {str(source)!r}: not a preset ({', '.join(presets())}) nor a YAML file")
    if not isinstance(values, dict):
        raise ConfigError(f"the config must be a mapping; got {type(values).__name__}")
    base = values.pop("base", None)
    if base is not None:
        if base not in presets():
            raise ConfigError(f"base must name a preset ({', '.join(presets())}); got {base!r}")
        values = _merge(_read_yaml(PRESET_DIR / f"{base}.yaml"), values)
    return _build(Config, values).validate()
