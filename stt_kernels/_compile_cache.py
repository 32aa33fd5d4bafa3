"""This build of stt_kernels in torch.compile's cache keys.

Inductor's FX-graph cache and AOTAutograd's cache key a graph by its ops' names, the inputs and
torch's version, not by what a custom op is: a graph compiled against one build of these kernels
(its fake kernels' output dtypes, its schemas, its Python fallbacks) is served to another after an
upgrade, a rebuild or a switch of checkout, and then fails at run time ("expected dtype ... but
got ...") or runs on stale metadata. Tagging the keys with a fingerprint of the installed package
keeps each build's compiled graphs to itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch.compiler import config as _compiler_config

_PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = (".py", ".so", ".pyd", ".dll", ".json")


def fingerprint(root: Path = _PACKAGE) -> str:
    """A short hash of the path, size and modification time of every source, library and build
    record under ``root`` (stat calls only: importing stays fast)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in _SUFFIXES and "__pycache__" not in path.parts and path.is_file():
            info = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def tag_compile_caches(root: Path = _PACKAGE) -> str:
    """Add ``stt_kernels-<fingerprint>`` to ``torch.compiler.config.cache_key_tag``, keeping any
    tag the user set (``TORCH_COMPILE_CACHE_KEY_TAG``); returns the tag now in force."""
    ours = f"stt_kernels-{fingerprint(root)}"
    tag = _compiler_config.cache_key_tag
    if ours not in tag.split("+"):
        _compiler_config.cache_key_tag = f"{tag}+{ours}" if tag else ours
    return _compiler_config.cache_key_tag
