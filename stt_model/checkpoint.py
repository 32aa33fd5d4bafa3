"""Checkpoints: written atomically (a temporary file in the same folder, fsync, rename), so a
crash never leaves a half-written file; read with ``weights_only=True``, so loading one runs
no pickled code.

A checkpoint is a dict of tensors and plain values: ``config`` (the Config as a dict),
``model``, and whatever the trainer adds (optimisers, scheduler, step, RNG and sampler state).
A checkpoint whose model weights hold NaN/Inf is refused at load, naming the parameter: it can
only predict garbage (all-zero probabilities, in silence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from stt_kernels.atomic_file import atomic_write

from .config import Config, load_config
from .errors import UserInputError


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise UserInputError(f"{path} is not a readable stt checkpoint: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserInputError(f"{path} is not an stt checkpoint (no 'model' and 'config' entries)")
    # A resumed run continues from the trained weights beside a weight average and from the
    # discriminator: a damaged one would poison the run as surely as a damaged model.
    for entry in ("model", "training_model", "discriminator"):
        if entry in state:
            _refuse_non_finite(state[entry], path, entry)
    return state


def _refuse_non_finite(weights: Any, path: Path, entry: str) -> None:
    if not isinstance(weights, dict):
        raise UserInputError(f"{path} is not an stt checkpoint (its {entry!r} entry is not a state dict)")
    for name, value in weights.items():
        if torch.is_tensor(value) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise UserInputError(
                    f"{path}: {entry.replace('_', ' ')} parameter {name} holds {bad} NaN/Inf value(s) of "
                    f"{value.numel()}; the checkpoint is damaged or was saved after training diverged"
                )


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The config stored in a checkpoint, validated."""
    return load_config(state["config"])


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: Union[str, Path] = "checkpoint") -> None:
    """Load ``state['model']`` into ``model``, or say which parameters do not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserInputError(
            f"{path} does not fit this model's config: {str(exc).splitlines()[0]} (was it trained with another config?)"
        ) from None
