"""``make test-install``: the package built and installed the way users get it, then used from
outside the checkout.

1. A clean tree: the files git knows (tracked, or untracked but not ignored) copied to a
   temporary folder, so no build product of the checkout (``_C*.so``, ``build/``, egg-info) can
   leak into what is tested.
2. An sdist of it with ``python -m build --sdist --no-isolation`` and torch hidden (making an
   sdist must not need torch); its listing must hold every source, header, config and
   ``CMakeLists.txt`` a build needs, and no build product.
3. A wheel from that sdist with ``pip wheel --no-build-isolation --no-deps`` and
   ``STT_BUILD_CUDA=0`` (CPU kernels only: nvcc would add several minutes, and CI has no GPU).
   The sdist is unpacked into ``build/test-install/src``, whose ``build/temp-*`` object folders
   are kept between runs so ninja recompiles only what changed; everything else there is
   replaced by the sdist's files each run. Its listing must hold the configs, both
   ``py.typed``, the build record and stripped libraries, and pin the torch it was built against.
4. A fresh virtual environment (``venv --without-pip``) gets the wheel, non-editable; a ``.pth``
   file appends this environment's site-packages after its own, which reuses the pinned torch
   and the test dependencies in well under a second (a fresh ``pip install torch==2.14.1`` from
   the local wheel files took 81 s and 5.4 GB here). A plain path in a ``.pth`` file does not
   run the ``.pth`` files of that folder, so the checkout's editable install stays invisible;
   the checks below prove that ``stt_kernels`` comes from the fresh environment.
5. From an empty folder outside the checkout: ``stt --help``, ``python -m stt_kernels``,
   ``stt demo`` (the shipped model), ``stt demo --minutes 0.3`` (training) and the kernel tests
   (a copy of ``tests/``) against the installed package.

Usage: ``python tests/install_check.py [--keep]`` (``--keep`` leaves the temporary folder).
Prints each step's time; exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "test-install"
CACHE_MARK = ".stt-install-check"  # only a folder carrying it is ever emptied by this script
KERNEL_TESTS = [
    "tests/test_attention.py",
    "tests/test_deform_conv2d.py",
    "tests/test_backend.py",
    # The wheel's per-capability CPU libraries: each loads and is right, none can SIGILL.
    "tests/test_isa_dispatch.py",
    # It expects CUDA kernels wherever nvcc is found; this wheel is CPU-only by choice.
    "--deselect",
    "tests/test_backend.py::test_cuda_compiled_without_gpu",
]
DEMO_OUTPUTS = ["probabilities.h5", "instances.h5", "instances.tif", "metrics.json", "montage.png"]


class CheckFailed(Exception):
    """One check of the install did not hold; the message says which and what was seen."""


def _run(
    command: Sequence[str], *, cwd: Path, env: Optional[dict[str, str]] = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise CheckFailed(f"`{' '.join(map(str, command))}` exited {result.returncode} in {cwd}:\n{tail}")
    return result


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise CheckFailed("pyproject.toml has no version")
    return match.group(1)


def _git_files() -> list[str]:
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    # A file deleted in the working tree but still in the index is not part of the tree.
    return sorted(name for name in listed.split("\0") if name and (ROOT / name).is_file())


def clean_tree(target: Path) -> list[str]:
    """Copy the files git knows into ``target`` (mtimes kept, for ninja); returns their names."""
    names = _git_files()
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    return names


def _hidden_torch(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import torch`` fail."""
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text('raise ImportError("torch is hidden: an sdist must not need it")\n')
    return folder


def build_sdist(tree: Path, out: Path, work: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(_hidden_torch(work / "no-torch"))}
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, tree], cwd=tree, env=env)
    sdists = list(out.glob("*.tar.gz"))
    if len(sdists) != 1:
        raise CheckFailed(f"expected one sdist in {out}, found {sdists}")
    return sdists[0]


def check_sdist(sdist: Path, tracked: list[str], version: str) -> None:
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
        top = f"stt_kernels-{version}"
        names = {name[len(top) + 1 :] for name in members if name.startswith(top + "/")}
        pkg_info = archive.extractfile(f"{top}/PKG-INFO").read().decode()
    needed = [
        name
        for name in tracked
        if name.startswith(("csrc/", "stt_model/configs/", "stt_model/models/"))
        or name.endswith(".py")
        and name.startswith(("stt_kernels/", "stt_model/"))
    ]
    needed += [
        "CMakeLists.txt",
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        "README.md",
        "LICENSE",
        "CITATION.cff",
        "CHANGELOG.md",
        "stt_kernels/py.typed",
        "stt_model/py.typed",
    ]
    missing = sorted(set(needed) - names)
    if missing:
        raise CheckFailed(f"the sdist lacks {missing}")
    if not any(n.endswith(".h") for n in names) or not any(n.endswith(".cu") for n in names):
        raise CheckFailed("the sdist has no headers or no CUDA sources")
    products = sorted(n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json"))
    if products:
        raise CheckFailed(f"the sdist carries build products: {products}")
    requires = _requires_dist(pkg_info)
    if "torch>=2.4" not in requires:
        raise CheckFailed(f"the sdist should ask for torch>=2.4; its Requires-Dist: {requires}")


def _requires_dist(metadata: str) -> list[str]:
    parsed = email.parser.Parser().parsestr(metadata)
    return [value.replace(" ", "") for value in parsed.get_all("Requires-Dist") or []]


def unpack_into_cache(sdist: Path, cache: Path) -> Path:
    """The sdist's files in ``cache/src``, keeping only the compiled objects of a previous run."""
    if cache.exists() and not (cache / CACHE_MARK).exists():
        raise CheckFailed(f"{cache} exists but was not made by this check; move it away or set STT_INSTALL_CACHE")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / CACHE_MARK).touch()
    fresh = cache / "unpacking"
    if fresh.exists():
        shutil.rmtree(fresh)
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(fresh, filter="data")
        else:
            archive.extractall(fresh)
    (tree,) = fresh.iterdir()
    previous = cache / "src"
    for objects in sorted((previous / "build").glob("temp-*")):
        (tree / "build").mkdir(exist_ok=True)
        objects.rename(tree / "build" / objects.name)
    if previous.exists():
        shutil.rmtree(previous)
    tree.rename(previous)
    fresh.rmdir()
    return previous


def build_wheel(source: Path, out: Path) -> Path:
    env = {**os.environ, "STT_BUILD_CUDA": "0"}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--wheel-dir",
            out,
            source,
        ],
        cwd=source,
        env=env,
        timeout=1200,
    )
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one wheel in {out}, found {wheels}")
    return wheels[0]


def check_wheel(wheel: Path, work: Path, torch_version: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
        libraries = sorted(n for n in names if n.startswith("stt_kernels/") and n.endswith(".so"))
        unpacked = work / "wheel-libraries"
        for name in libraries:
            archive.extract(name, unpacked)
    needed = [
        "stt_kernels/py.typed",
        "stt_model/py.typed",
        "stt_kernels/_build_info.json",
        *(f"stt_model/configs/{p.name}" for p in sorted((ROOT / "stt_model" / "configs").glob("*.yaml"))),
        *(f"stt_model/models/{p.name}" for p in sorted((ROOT / "stt_model" / "models").iterdir()) if p.is_file()),
    ]
    missing = sorted(set(needed) - names)
    if missing:
        raise CheckFailed(f"the wheel lacks {missing}")
    if not any(Path(n).name.startswith("_C") for n in libraries):
        raise CheckFailed(f"the wheel has no stt_kernels/_C library; its libraries: {libraries}")
    strays = sorted(n for n in names if n.split("/")[0] in ("tests", "csrc", "benchmarks", "docs", "build"))
    if strays:
        raise CheckFailed(f"the wheel carries files that are not the packages': {strays[:10]}")
    for name in libraries:
        sections = _run(["readelf", "-S", "--wide", unpacked / name], cwd=work).stdout
        if ".debug_info" in sections:
            raise CheckFailed(f"{name} in the wheel is not stripped (it has .debug_info)")
    pin = f"torch=={torch_version.partition('+')[0]}"
    if pin not in _requires_dist(metadata):
        raise CheckFailed(f"the wheel should pin {pin}; its Requires-Dist: {_requires_dist(metadata)}")


def fresh_venv(wheel: Path, folder: Path) -> tuple[Path, Path]:
    """A venv with the wheel installed and this environment's site-packages appended after its
    own; returns (its python, its site-packages)."""
    _run([sys.executable, "-m", "venv", "--without-pip", folder], cwd=folder.parent)
    python = folder / "bin" / "python"
    # Installed before the .pth exists, so pip sees an empty environment (not the checkout's
    # editable install) and installs every file into the fresh site-packages.
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
        cwd=folder.parent,
    )
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=folder.parent).stdout.strip()
    )
    reused = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_stt_reuse_test_env.pth").write_text("".join(f"{path}\n" for path in reused))
    return python, site


def _outside_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def check_installed(python: Path, site: Path, outside: Path, version: str) -> None:
    env = _outside_env()
    probe = (
        "import sys, stt_kernels, stt_model; "
        "print(stt_kernels.__file__); print(stt_model.__file__); print(stt_kernels.__version__); "
        "print('\\n'.join(sys.path))"
    )
    lines = _run([python, "-W", "error::RuntimeWarning", "-c", probe], cwd=outside, env=env).stdout.splitlines()
    kernels_file, model_file, installed_version, *path = lines
    for name, where in (("stt_kernels", kernels_file), ("stt_model", model_file)):
        if not Path(where).resolve().is_relative_to(site.resolve()):
            raise CheckFailed(f"{name} was imported from {where}, not from the fresh environment's {site}")
    if installed_version != version:
        raise CheckFailed(f"stt_kernels.__version__ is {installed_version!r}; pyproject.toml says {version!r}")
    inside = [
        p
        for p in path
        if p and Path(p).resolve().is_relative_to(ROOT) and not Path(p).resolve().is_relative_to(ROOT / ".venv")
    ]
    if inside:
        raise CheckFailed(f"the checkout is on sys.path of the fresh environment: {inside}")


def check_commands(python: Path, outside: Path) -> None:
    env = _outside_env()
    stt = python.parent / "stt"
    usage = _run([stt, "--help"], cwd=outside, env=env).stdout
    if not all(command in usage for command in ("demo", "train", "predict", "evaluate", "bench")):
        raise CheckFailed(f"`stt --help` does not list the commands:\n{usage}")
    report = _run([python, "-W", "error::RuntimeWarning", "-m", "stt_kernels"], cwd=outside, env=env).stdout
    if not re.search(r"^cpu\s+available", report, re.MULTILINE):
        raise CheckFailed(f"the installed cpu backend is not available:\n{report}")
    print("    " + report.strip().replace("\n", "\n    "))


def check_demo(python: Path, outside: Path, *args: str) -> None:
    out = outside / f"demo_out{len(args)}"
    result = _run([python.parent / "stt", "demo", *args, "--out", out], cwd=outside, env=_outside_env())
    missing = [name for name in DEMO_OUTPUTS if not (out / name).is_file()]
    if missing:
        raise CheckFailed(f"`stt demo` did not write {missing}:\n{result.stdout[-2000:]}")
    print("    " + result.stdout.strip().splitlines()[-2].strip())


def check_kernel_tests(python: Path, site: Path, outside: Path) -> None:
    shutil.copytree(ROOT / "tests", outside / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", outside / "pyproject.toml")  # pytest's markers and options
    # After the run, the stt_kernels the tests used must be the installed one.
    script = (
        "import sys, pytest\n"
        f"code = pytest.main(['-q', '-p', 'no:cacheprovider', *{KERNEL_TESTS!r}])\n"
        "import stt_kernels\n"
        f"assert stt_kernels.__file__.startswith({str(site.resolve())!r}), stt_kernels.__file__\n"
        "sys.exit(code)\n"
    )
    env = {**_outside_env(), "OMP_NUM_THREADS": "1"}
    result = _run([python, "-c", script], cwd=outside, env=env, timeout=900)
    print("    " + result.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    import torch  # the torch of this environment, which the fresh one reuses and the wheel must pin

    version = _version()
    cache = Path(os.environ.get("STT_INSTALL_CACHE", CACHE))
    work = Path(tempfile.mkdtemp(prefix="stt-install-check-"))
    started = time.monotonic()
    steps = [
        ("clean tree", lambda s: s.update(tracked=clean_tree(work / "tree"))),
        ("sdist (torch hidden)", lambda s: s.update(sdist=build_sdist(work / "tree", work / "dist", work))),
        ("sdist listing", lambda s: check_sdist(s["sdist"], s["tracked"], version)),
        (
            "wheel from the sdist (STT_BUILD_CUDA=0)",
            lambda s: s.update(wheel=build_wheel(unpack_into_cache(s["sdist"], cache), work / "dist")),
        ),
        ("wheel listing", lambda s: check_wheel(s["wheel"], work, torch.__version__)),
        ("fresh venv + wheel", lambda s: s.update(zip(("python", "site"), fresh_venv(s["wheel"], work / "venv")))),
        ("imports from the fresh venv", lambda s: check_installed(s["python"], s["site"], s["outside"], version)),
        ("stt --help, python -m stt_kernels", lambda s: check_commands(s["python"], s["outside"])),
        # The default demo segments with the shipped model: its weights must be in the wheel.
        ("stt demo (the shipped synthetic-demo model)", lambda s: check_demo(s["python"], s["outside"])),
        ("stt demo --minutes 0.3 (trains)", lambda s: check_demo(s["python"], s["outside"], "--minutes", "0.3")),
        (
            "kernel tests against the installed package",
            lambda s: check_kernel_tests(s["python"], s["site"], s["outside"]),
        ),
    ]
    state: dict = {"outside": work / "outside"}
    state["outside"].mkdir()
    try:
        for title, step in steps:
            began = time.monotonic()
            step(state)
            print(f"test-install: {title}: ok ({time.monotonic() - began:.1f} s)", flush=True)
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"test-install: {title}: FAILED: {exc}\n(files in {work})", file=sys.stderr)
        return 1
    print(f"test-install: all checks passed in {time.monotonic() - started:.0f} s")
    if args.keep:
        print(f"test-install: kept {work}")
    else:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
