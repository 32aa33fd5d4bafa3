"""Every implementation under test, by op. Add new ones with :func:`register_implementation`."""

from __future__ import annotations

import torch

from . import ours, peers
from .implementation import Implementation

IMPLEMENTATIONS: list[Implementation] = ours.implementations() + peers.implementations()


def register_implementation(implementation: Implementation) -> Implementation:
    if any(i.op == implementation.op and i.name == implementation.name for i in IMPLEMENTATIONS):
        raise ValueError(f"{implementation.name!r} is registered for {implementation.op!r} already")
    IMPLEMENTATIONS.append(implementation)
    return implementation


def implementations_for(op: str, device: torch.device) -> list[Implementation]:
    """The implementations of ``op`` listed for ``device``'s type, in registration order."""
    return [i for i in IMPLEMENTATIONS if i.op == op and device.type in i.devices]


def find(op: str, name: str) -> Implementation:
    for implementation in IMPLEMENTATIONS:
        if implementation.op == op and implementation.name == name:
            return implementation
    raise KeyError(f"no implementation {name!r} of {op!r}")
