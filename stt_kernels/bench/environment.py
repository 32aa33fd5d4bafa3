"""Where and how the figures were taken: the metadata block of every result file."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

import stt_kernels

from .._extension import EXTENSION


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run(command: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git() -> dict[str, Any]:
    """Commit of the checkout this stt_kernels was imported from, if it is one."""
    source = Path(stt_kernels.__file__).resolve().parent.parent
    commit = _run(["git", "rev-parse", "HEAD"], source)
    if commit is None:
        return {"commit": None}
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], source))
    return {"commit": commit, "dirty": dirty, "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], source)}


def _gpu(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {
        "gpu": props.name,
        "gpu_memory_bytes": props.total_memory,
        "gpu_count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.version.hip:
        info["rocm_driver"] = _run(["rocm-smi", "--showdriverversion", "--csv"])
    else:
        info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                               f"--id={device.index or 0}"])
    return info


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_note(metadata: dict[str, Any]) -> Optional[str]:
    """A warning for the report when other work competed for the CPU during the run."""
    loads = [l for key in ("load_average_start", "load_average_end") if (l := metadata.get(key))]
    worst = max((l[0] for l in loads), default=0.0)
    if worst > metadata["cpu_cores_usable"]:
        return (f"The machine was busy with other work (1-minute load average up to {worst:.1f} on "
                f"{metadata['cpu_cores_usable']} cores): CPU times are noisy, compare within a run only.")
    return None


def collect(device: torch.device, command: Optional[list[str]] = None) -> dict[str, Any]:
    """Everything a reader needs to trust or reproduce the figures."""
    argv = command if command is not None else [sys.executable, *sys.argv]
    gpu = _gpu(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        "device": gpu.get("gpu") or _cpu_model(),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        **gpu,
        "cuda": torch.version.cuda,
        "rocm": torch.version.hip,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton-rocm"),
        "torchvision": _version("torchvision"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "xformers": _version("xformers"),
        "natten": _version("natten"),
        "matplotlib": _version("matplotlib"),
        "stt_kernels": stt_kernels.__version__,
        "stt_kernels_build": EXTENSION.info,
        "backends": {name: {"available": s.available, "reason": s.reason}
                     for name, s in stt_kernels.backends().items()},
        **_git(),
    }
