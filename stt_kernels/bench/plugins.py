"""Cases from other installed packages, named under the ``stt_kernels.bench`` entry-point group
(``stt_model`` registers its STT-UNET training step there): importing the module registers them."""

from __future__ import annotations

import importlib.metadata
import warnings

GROUP = "stt_kernels.bench"


def load_plugins() -> list[str]:
    """Import every module named under :data:`GROUP`; returns the names loaded. A plugin whose
    own dependencies are missing is left out quietly (its package's extras are not installed);
    any other failure is a warning, never a failed import of the engine."""
    loaded = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        try:
            entry.load()
        except ImportError:
            continue
        except Exception as exc:  # a broken plugin must not take the engine down
            warnings.warn(f"benchmark plugin {entry.name!r} ({entry.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        loaded.append(entry.name)
    return loaded
