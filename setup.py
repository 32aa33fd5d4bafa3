"""Builds ``stt_kernels._C`` (op schemas, Python binding; CUDA kernels when torch is a CUDA build
and nvcc is found, HIP kernels (hipified CUDA sources) when torch is a ROCm build) and the C++ CPU
kernels, once per x86 capability: ``stt_kernels._cpu_default`` (x86-64 baseline), ``_cpu_avx2``
and ``_cpu_avx512``, of which the package loads the best one the CPU runs (``stt_kernels/_isa.py``).

Environment:
  STT_BUILD_CUDA=auto|0|1   GPU kernels: auto (default) builds them when possible, 0 skips
                            them (a quick CPU-only build), 1 fails if they cannot be built.
  TORCH_CUDA_ARCH_LIST      CUDA archs; default: the visible GPUs, else "8.0;9.0" (A100, H100).
  PYTORCH_ROCM_ARCH         ROCm archs; default: the visible GPUs, else "gfx90a;gfx942" (MI250X, MI300X).
  MAX_JOBS                  parallel compile jobs; default: sized from free memory.
  STT_DEBUG=1               -O0 -g, not stripped (release libraries are stripped).
  STT_NATIVE=1              one CPU kernel library compiled with -march=native, for the machine
                            that builds it only (the default builds are portable).

Only the commands that compile (build, build_ext, bdist_wheel, editable_wheel, install,
develop) import torch; sdist, egg_info and dist_info do not, so making an sdist needs no torch.
A compiling command stops at once, with the command to use instead, when torch cannot be
imported or comes from a temporary build environment: the library must be built against the
torch that will run it (``pip install torch``, then ``pip install --no-build-isolation .``).
A built wheel pins that torch (``torch==X.Y.Z``); the sdist asks for ``torch>=2.4``.
"""

from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import site
import sys
from pathlib import Path
from typing import Optional

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _find_cuda_home() -> str | None:
    """A toolkit folder with bin/nvcc and include/cuda_runtime.h (nvcc may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        text = Path(nvcc).read_text(errors="ignore") if os.path.getsize(nvcc) < 4096 else ""
        candidates += [str(Path(word).parent.parent) for word in text.split() if word.endswith("/bin/nvcc")]
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


# Commands that compile the extension, and so need the torch it is built against.
_COMPILING_COMMANDS = frozenset(
    {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "editable_wheel", "install", "develop"}
)

# Folder names of the temporary environments that isolated builds create: pip
# (pip-build-env-*), python -m build (build-env-*), uv (builds-v0).
_BUILD_ENV_PREFIXES = ("pip-build-env-", "build-env-", "builds-v0")

_USE_INSTALLED_TORCH = """stt-kernels: not building: {reason}.
Its compiled kernels must be built against the torch that will run them, so the build uses
the torch already installed and never one that an isolated build environment downloads.
Install torch first, then build without build isolation:
    pip install torch
    pip install --no-build-isolation stt-kernels
(in a source tree or an unpacked sdist: pip install --no-build-isolation .)"""


def compiles_extension(argv: list[str]) -> bool:
    """Whether ``setup.py argv`` compiles ``stt_kernels._C`` (and so needs torch)."""
    return any(arg in _COMPILING_COMMANDS for arg in argv)


def isolated_build_env(path: str) -> Optional[str]:
    """The folder of ``path`` that marks a temporary isolated build environment, if any."""
    for part in Path(path).parts:
        if part.startswith(_BUILD_ENV_PREFIXES):
            return part
    return None


def torch_for_build():
    """The installed torch to compile against; exits with the command to use when it is
    missing (an isolated build environment) or belongs to a temporary build environment."""
    try:
        import torch
    except ImportError as exc:
        sys.exit(_USE_INSTALLED_TORCH.format(reason=f"torch cannot be imported here ({exc})"))
    env = isolated_build_env(torch.__file__)
    if env is not None:
        sys.exit(
            _USE_INSTALLED_TORCH.format(
                reason=f"torch {torch.__version__} comes from a temporary build environment ({env}), "
                "not from the environment that will run it"
            )
        )
    return torch


def torch_requirement(torch_version: Optional[str]) -> str:
    """``torch==X.Y.Z`` for a library built against ``torch_version``, else ``torch>=2.4``.

    The local label (``+cu130``, ``+cpu``) is left out: PyPI's torch carries none, and PEP 440
    ignores candidates' labels when the specifier has none. A CPU/CUDA variant mismatch is
    caught at import instead, by the build record.
    """
    if torch_version is None:
        return "torch>=2.4"
    return f"torch=={torch_version.partition('+')[0]}"


COMPILING = compiles_extension(sys.argv[1:])
if COMPILING:
    if "CUDA_HOME" not in os.environ and (_home := _find_cuda_home()):
        # torch guesses CUDA_HOME from nvcc's folder, wrong when nvcc is a wrapper in /usr/local/bin.
        os.environ["CUDA_HOME"] = _home
    torch = torch_for_build()
    from torch.utils import cpp_extension

    _TorchBuildExtension = cpp_extension.BuildExtension
else:
    # sdist, egg_info, dist_info: no torch. The build command class below is defined but unused.
    from setuptools.command.build_ext import build_ext as _TorchBuildExtension


def _gpu_mode() -> str:
    """'cuda', 'hip' or 'cpu': which kernels to build, following STT_BUILD_CUDA."""
    wanted = os.environ.get("STT_BUILD_CUDA", "auto").strip().lower()
    if wanted not in ("auto", "0", "1"):
        sys.exit(f"STT_BUILD_CUDA must be auto, 0 or 1; got {wanted!r}")
    if wanted == "0":
        return "cpu"
    if getattr(torch.version, "hip", None):
        if cpp_extension.ROCM_HOME is None:
            return _refuse(wanted, "torch is a ROCm build but ROCM_HOME (hipcc) was not found")
        return "hip"
    if torch.version.cuda is None:
        return _refuse(wanted, f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None or _find_cuda_home() is None:
        return _refuse(wanted, "nvcc was not found (put it on PATH or set CUDA_HOME)")
    return "cuda"


def _refuse(wanted: str, reason: str) -> str:
    if wanted == "1":
        sys.exit(f"STT_BUILD_CUDA=1 but the GPU kernels cannot be built: {reason}")
    print(f"stt_kernels: building CPU kernels only: {reason}", file=sys.stderr)
    return "cpu"


def _pip_cuda_includes() -> list[str]:
    """Headers that pip's nvidia-* wheels ship (cusparse.h, cublas_v2.h, ...), which torch's
    CUDA headers include and a partial toolkit may lack."""
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found: list[str] = []
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if include not in found:
                found.append(include)
    return found


def _default_archs(mode: str) -> None:
    """The visible GPUs' archs (what torch would pick), named, so the build record says which;
    without a GPU, A100 + H100 (CUDA) or MI250X + MI300X (ROCm)."""
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
    if mode == "cuda" and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in gpus})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(visible) or "8.0;9.0"
    if mode == "hip" and not os.environ.get("PYTORCH_ROCM_ARCH"):
        visible = sorted({torch.cuda.get_device_properties(i).gcnArchName.split(":")[0] for i in gpus})
        os.environ["PYTORCH_ROCM_ARCH"] = ";".join(visible) or "gfx90a;gfx942"


def _default_jobs(mode: str) -> None:
    """nvcc needs ~2 GB a job with torch's headers: more jobs than memory allows thrash."""
    if os.environ.get("MAX_JOBS"):
        return
    per_job = 2.5e9 if mode != "cpu" else 1.0e9
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 8e9
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free // per_job))))


def sources(mode: str, part: str) -> list[str]:
    """``part`` "binding": the sources of ``_C`` (schemas, Python binding, GPU kernels); "cpu":
    those of a CPU kernel library. Together the same globs as CMakeLists.txt, plus the Python
    binding that only this build has."""
    patterns = {
        "binding": [
            "csrc/ops/*.cpp",
            "csrc/ops/autograd/*.cpp",
            "csrc/python/*.cpp",
            *(["csrc/cuda/*.cu"] if mode != "cpu" else []),
        ],
        "cpu": ["csrc/cpu/*.cpp"],
    }[part]
    return sorted(str(Path(p).relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def _archs(mode: str) -> str:
    if mode == "cuda":
        return "sm_" + ",sm_".join(
            a.replace(".", "").replace("+PTX", "")
            for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "native").replace(" ", ";").split(";")
            if a
        )
    if mode == "hip":
        return os.environ.get("PYTORCH_ROCM_ARCH", "native").replace(";", ",")
    return ""


@functools.cache
def _isa():
    """``stt_kernels/_isa.py``, read by path: the package cannot be imported while it is built."""
    spec = importlib.util.spec_from_file_location("_stt_isa", ROOT / "stt_kernels" / "_isa.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module
    spec.loader.exec_module(module)
    return module


def cpu_builds() -> tuple:
    """The CPU kernel libraries this build makes (``_cpu_<name>``, ``_isa.Capability``), lowest first."""
    return _isa().build_capabilities(platform.machine(), native=os.environ.get("STT_NATIVE") == "1")


def extensions(mode: str) -> list:
    """``_C``, compiled for the CPU baseline, and one CPU kernel library per capability."""
    debug = os.environ.get("STT_DEBUG") == "1"
    # -g0: Python's CFLAGS carry -g, which slows the compile and makes a 0.5 MB library 18 MB.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    link = [*openmp, *([] if debug else ["-s"])]
    # No -std flag: torch picks the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
    cxx = [*opt, *openmp, "-Wall", "-Wno-unused-function"]
    # setuptools rebuilds nothing when only a header changed unless it is named here.
    headers = sorted(str(p.relative_to(ROOT)) for p in (CSRC / "include" / "stt").glob("*.h"))
    # include_dirs: a list of its own each, as CppExtension appends torch's folders in place.
    kernels = [
        cpp_extension.CppExtension(
            name=f"stt_kernels._cpu_{capability.name}",
            sources=sources(mode, "cpu"),
            include_dirs=[str(CSRC / "include")],
            depends=headers,
            extra_compile_args={"cxx": [*cxx, *capability.flags]},
            extra_link_args=link,
        )
        for capability in cpu_builds()
    ]
    baseline = [*cxx, *_isa().baseline_flags(platform.machine())]
    defines = [
        ("STT_TORCH_VERSION", f'"{torch.__version__}"'),
        ("STT_ARCHS", f'"{_archs(mode)}"'),
        ("STT_CPU_CAPABILITIES", '"' + ",".join(c.name for c in cpu_builds()) + '"'),
        *([("STT_DEBUG_BUILD", "1")] if debug else []),
    ]
    kwargs = dict(
        name="stt_kernels._C",
        sources=sources(mode, "binding"),
        include_dirs=[str(CSRC / "include")],
        depends=headers,
        define_macros=defines,
        extra_link_args=link,
    )
    if mode == "cpu":
        return [cpp_extension.CppExtension(extra_compile_args={"cxx": baseline}, **kwargs), *kernels]
    gpu_flags = ["-O0", "-g"] if debug else ["-O3"]  # nvcc has no -g0 (nor gets -g from Python's CFLAGS)
    if mode == "cuda":
        # --resource-usage (-Xptxas -v): each kernel's registers, shared memory and spills, kept
        # by _record_cuda_resources.
        gpu_flags += ["--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo", "--resource-usage"]
        kwargs["include_dirs"] += _pip_cuda_includes()
        defines.append(("STT_WITH_CUDA", "1"))
    else:
        defines.append(("STT_WITH_HIP", "1"))
    return [cpp_extension.CUDAExtension(extra_compile_args={"cxx": baseline, "nvcc": gpu_flags}, **kwargs), *kernels]


class BuildExtension(_TorchBuildExtension):
    def build_extension(self, ext) -> None:
        # A fixed build folder (pip would use a fresh temporary one) lets ninja rebuild only
        # what changed: a one-file edit costs one compile, not the whole CUDA build. One folder
        # per library: the kernel libraries compile the same sources with different flags.
        # Theirs do not depend on the GPU mode, so CPU-only and full builds share them.
        python = f"py{sys.version_info.major}{sys.version_info.minor}"
        library = ext.name.rpartition(".")[2]
        folder = f"temp-{MODE}-{python}" if library == "_C" else f"temp-{python}-{library}"
        self.build_temp = str(ROOT / "build" / folder)
        if library == "_C" and MODE == "cuda":
            _record_cuda_resources(functools.partial(super().build_extension, ext), Path(self.build_temp))
        else:
            super().build_extension(ext)


def _record_cuda_resources(build, folder: Path) -> None:
    """Runs ``build()`` with this process's stdout, where torch's ninja writes what every compile
    printed, going to ``folder/ninja.log`` (echoed afterwards); keeps each CUDA source's ptxas
    report in ``folder/ptxas/`` (ninja recompiles only what changed, so a report lives as long
    as its object) and adds the parsed figures of every source to ``_build_info.json`` as
    ``cuda_resources`` (``tests/test_cuda_resources.py`` reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "ninja.log"
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with log.open("wb") as handle:
            os.dup2(handle.fileno(), 1)
            try:
                build()
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
    finally:
        os.close(saved)
        sys.stdout.write(log.read_text(errors="replace"))
        sys.stdout.flush()
    spec = importlib.util.spec_from_file_location("_stt_ptxas", ROOT / "stt_kernels" / "_ptxas.py")
    ptxas = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ptxas  # dataclasses look up their module
    spec.loader.exec_module(ptxas)
    reports = folder / "ptxas"
    reports.mkdir(exist_ok=True)

    def report_of(source: str) -> Path:
        return reports / (str((ROOT / source).resolve().relative_to(ROOT)).replace("/", "__") + ".log")

    for source, report in ptxas.split_by_source(log.read_text(errors="replace")).items():
        report_of(source).write_text(report)
    resources = {
        source: ptxas.as_records(ptxas.parse(report_of(source).read_text())) if report_of(source).exists() else None
        for source in sources(MODE, "binding")
        if source.endswith(".cu")
    }
    target = ROOT / "stt_kernels" / "_build_info.json"
    record = {**json.loads(target.read_text()), "cuda_resources": resources}
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(target)


def write_build_record(mode: str) -> None:
    """``stt_kernels/_build_info.json``: what the library is built against, so that one built
    for another torch fails to load with a sentence instead of a symbol error."""
    record = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if mode == "cuda" else None,
        "hip_version": getattr(torch.version, "hip", None) if mode == "hip" else None,
        "mode": mode,
        "archs": _archs(mode),
        "cpu_capabilities": [c.name for c in cpu_builds()],
    }
    target = ROOT / "stt_kernels" / "_build_info.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(target)


def _pinned_torch() -> Optional[str]:
    """The torch version a wheel's metadata pins. pip prepares a wheel's metadata first
    (``dist_info``, PEP 517), in a process that compiles nothing, and the wheel keeps it: that
    process pins the installed torch too, read without importing it. An sdist pins none."""
    if "sdist" in sys.argv[1:]:
        return None
    if COMPILING:
        return torch.__version__
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


if COMPILING:
    MODE = _gpu_mode()
    _default_archs(MODE)
    _default_jobs(MODE)
    write_build_record(MODE)

setup(
    packages=find_packages(include=["stt_kernels*", "stt_model*"]),
    package_data={
        "stt_kernels": ["_build_info.json", "py.typed"],
        "stt_model": ["configs/*.yaml", "py.typed", "models/*.json", "models/*.pt", "models/*.yaml"],
    },
    install_requires=[torch_requirement(_pinned_torch())],
    ext_modules=extensions(MODE) if COMPILING else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)} if COMPILING else {},
)
