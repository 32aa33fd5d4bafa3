"""Shipped, versioned models: the registry in ``stt_model/models/``.

Each model is three files in that folder, installed with the package:

- ``<name>.card.json``: its card (format ``stt-model-card/1``): name, version, what it was
  trained on (``data``), the recipe (config file) and the command that made it, steps, training
  time, the scores it reaches on held-out data with the settings that reach them, and its
  weights' file name, SHA-256 and size;
- ``<name>.pt``: the weights, an stt checkpoint (``config`` and ``model`` only);
- ``<name>.thresholds.json``: the decoding thresholds ``stt tune`` found for it (optional).

:func:`load_pretrained` (and ``stt predict --model NAME``) checks the weights against the
card's SHA-256 and size before loading them with ``weights_only=True``: a damaged or replaced
file is refused, never run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .config import Config
from .errors import UserInputError
from .segment import Thresholds

MODELS_DIR = Path(__file__).with_name("models")
CARD_FORMAT = "stt-model-card/1"
CARD_KEYS = ("name", "version", "data", "recipe", "command", "steps", "training_seconds", "held_out", "weights")


class ModelRegistryError(UserInputError):
    """An unknown model name, or a shipped model whose files do not match its card."""


@dataclass
class Pretrained:
    model: nn.Module  # in eval mode, on the requested device
    config: Config
    thresholds: Thresholds  # the tuned ones when the model ships them, else the defaults
    card: dict[str, Any]
    path: Path  # the verified weights file


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelRegistryError(f"model card {path} is not readable JSON: {exc}") from None
    missing = [key for key in CARD_KEYS if key not in card] if isinstance(card, dict) else list(CARD_KEYS)
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or missing:
        raise ModelRegistryError(f"model card {path} is not an {CARD_FORMAT} card (missing {', '.join(missing)})")
    return card


def list_models(folder: Optional[Union[str, Path]] = None) -> list[dict[str, Any]]:
    """The cards of the shipped models, by name."""
    return sorted((_read_card(p) for p in Path(folder or MODELS_DIR).glob("*.card.json")), key=lambda c: c["name"])


def model_card(name: str, folder: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """The card of the shipped model ``name``."""
    cards = {card["name"]: card for card in list_models(folder)}
    if name not in cards:
        known = ", ".join(cards) or "none"
        raise ModelRegistryError(f"no shipped model named {name!r}; the models are: {known} (stt models lists them)")
    return cards[name]


def verified_weights(name: str, folder: Optional[Union[str, Path]] = None) -> Path:
    """The path of model ``name``'s weights, after checking their size and SHA-256 against its card."""
    from .tune import file_sha256

    card = model_card(name, folder)
    weights = card["weights"]
    path = Path(folder or MODELS_DIR) / weights["file"]
    if not path.is_file():
        raise ModelRegistryError(f"model {name}: its weights {path} are missing (the installation is incomplete)")
    size = path.stat().st_size
    if size != weights["bytes"] or file_sha256(path) != weights["sha256"]:
        raise ModelRegistryError(
            f"model {name}: {path} does not match its card (SHA-256 {weights['sha256'][:12]}..., "
            f"{weights['bytes']} bytes; the file has {size} bytes): it is damaged or was "
            "replaced, and is not loaded"
        )
    return path


def load_pretrained(name: str, device: Optional[str] = None, folder: Optional[Union[str, Path]] = None) -> Pretrained:
    """Shipped model ``name`` (see ``stt models``), verified against its card, ready to predict.

    >>> import torch
    >>> m = load_pretrained("synthetic-demo")
    >>> m.model(torch.rand(1, 1, *m.config.data.patch)).shape   # (1, C, T, H, W) logits
    torch.Size([1, 2, 8, 64, 64])
    """
    from .build import build_model
    from .checkpoint import checkpoint_config, load_checkpoint, load_model_weights
    from .tune import sidecar_thresholds

    path = verified_weights(name, folder)
    state = load_checkpoint(path)
    config = checkpoint_config(state)
    model = build_model(config)
    load_model_weights(model, state, path)
    model.eval()
    if device is not None:
        model.to(device)
    thresholds, _ = sidecar_thresholds(path)
    return Pretrained(model, config, thresholds or Thresholds(), model_card(name, folder), path)


def describe_card(card: dict[str, Any], full: bool = False) -> str:
    """``stt models``' lines for one card: a summary, or (``full``) the whole card."""
    held = card["held_out"]
    found = held.get("scores", {})
    scores = ", ".join(f"{k} {found[k]:.3f}" for k in ("ap75", "ap50", "jaccard") if k in found)
    lines = [
        f"{card['name']}  v{card['version']}  {card['weights']['bytes'] / 1024:.0f} KiB  "
        f"{card['steps']} steps, {card['training_seconds'] / 60:.1f} min training",
        f"  data: {card['data']}",
        f"  held out: {scores} ({held.get('volume', '')})",
    ]
    if full:
        lines += [
            f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in card.items()
            if key not in ("name", "version", "data", "held_out")
        ]
        lines.append(f"  held_out: {json.dumps(held)}")
    else:
        lines.append(f"  made by: {card['command']}")
    return "\n".join(lines)
