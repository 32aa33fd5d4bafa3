"""Packaging: what setup.py does without torch or with an isolated one, the sdist's contents,
the torch pin of wheels, one version everywhere, the `stt` command without the model extras,
the demo without matplotlib, and the loud warning of an installed package without a usable
library. The end-to-end install (sdist -> wheel -> fresh venv) is tests/install_check.py
(`make test-install`)."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

import stt_kernels

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _setup_functions(*names: str) -> dict:
    """Functions of setup.py with the constants and plain imports they use, without running it
    (running it would call setup()) and without torch."""

    def wanted(node: ast.stmt) -> bool:
        if isinstance(node, ast.FunctionDef):
            return node.name in names
        if isinstance(node, ast.Assign):
            return all(isinstance(t, ast.Name) and t.id.startswith("_") and t.id.isupper() for t in node.targets)
        if isinstance(node, ast.ImportFrom):
            return node.module not in ("setuptools", "torch.utils")
        return isinstance(node, ast.Import) and not any(alias.name == "torch" for alias in node.names)

    tree = ast.parse((ROOT / "setup.py").read_text())
    namespace: dict = {}
    exec(compile(ast.Module(body=[n for n in tree.body if wanted(n)], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the files git knows, as a clean checkout or an sdist would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    target = tmp_path_factory.mktemp("tree")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def _fake_torch(folder: Path, body: str) -> Path:
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text(body)
    return folder


def _setup_py(tree: Path, args: list[str], pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def test_which_commands_compile():
    compiles = _setup_functions("compiles_extension")["compiles_extension"]
    for argv in (
        ["bdist_wheel", "--dist-dir", "/tmp/x"],
        ["build_ext", "--inplace"],
        ["editable_wheel"],
        ["install"],
        ["develop"],
        ["build"],
    ):
        assert compiles(argv), argv
    for argv in (
        ["sdist", "--formats", "gztar"],
        ["egg_info"],
        ["dist_info", "--output-dir", "/tmp/x"],
        ["--version"],
        [],
    ):
        assert not compiles(argv), argv


def test_isolated_build_environments_are_recognised():
    isolated = _setup_functions("isolated_build_env")["isolated_build_env"]
    assert (
        isolated("/tmp/pip-build-env-a1b2/overlay/lib/python3.11/site-packages/torch/__init__.py")
        == "pip-build-env-a1b2"
    )
    assert isolated("/tmp/build-env-x9/lib/python3.11/site-packages/torch/__init__.py") == "build-env-x9"
    assert isolated("/root/.cache/uv/builds-v0/.tmpAbC/lib/python3.11/site-packages/torch/__init__.py") == "builds-v0"
    assert isolated("/work/main/.venv/lib/python3.11/site-packages/torch/__init__.py") is None


def test_wheel_pin_follows_the_build_torch():
    requirement = _setup_functions("torch_requirement")["torch_requirement"]
    assert requirement(None) == "torch>=2.4"
    pin = Requirement(requirement("2.14.1+cu130"))
    assert str(pin) == "torch==2.14.1"
    # The local label is not part of the pin: every variant of that release satisfies it.
    for ok in ("2.14.1", "2.14.1+cu130", "2.14.1+cpu"):
        assert pin.specifier.contains(ok), ok
    for other in ("2.14.0", "2.14.2", "2.15.0"):
        assert not pin.specifier.contains(other), other


def test_a_build_without_torch_stops_with_the_command(tree, tmp_path):
    result = _setup_py(tree, ["bdist_wheel"], _fake_torch(tmp_path / "hidden", 'raise ImportError("hidden")\n'))
    assert result.returncode == 1
    assert "torch cannot be imported here (hidden)" in result.stderr
    assert "    pip install torch\n    pip install --no-build-isolation stt-kernels\n" in result.stderr
    assert not (tree / "build").exists() and not (tree / "stt_kernels" / "_build_info.json").exists()


def test_a_build_against_an_isolated_torch_stops(tree, tmp_path):
    overlay = tmp_path / "pip-build-env-0123" / "overlay"
    result = _setup_py(tree, ["bdist_wheel"], _fake_torch(overlay, '__version__ = "2.99.0"\n'))
    assert result.returncode == 1
    assert "torch 2.99.0 comes from a temporary build environment (pip-build-env-0123)" in result.stderr
    assert "pip install --no-build-isolation stt-kernels" in result.stderr


def test_sdist_needs_no_torch_and_is_complete(tree, tmp_path):
    # Build products in the tree (another machine's library and record) must not travel.
    (tree / "stt_kernels" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (tree / "stt_kernels" / "_build_info.json").write_text('{"torch_version": "2.3.0"}')
    result = _setup_py(
        tree,
        ["sdist", "--dist-dir", str(tmp_path / "dist")],
        _fake_torch(tmp_path / "hidden", 'raise ImportError("hidden")\n'),
    )
    assert result.returncode == 0, result.stderr
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    top = f"stt_kernels-{VERSION}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(top) for name in archive.getnames()}
        pkg_info = archive.extractfile(top + "PKG-INFO").read().decode()
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h")]
    configs = [p.relative_to(ROOT).as_posix() for p in (ROOT / "stt_model" / "configs").glob("*.yaml")]
    assert any(s.endswith(".h") for s in sources) and any(s.endswith(".cu") for s in sources)
    needed = {
        *sources,
        *configs,
        "CMakeLists.txt",
        "README.md",
        "LICENSE",
        "CITATION.cff",
        "CHANGELOG.md",
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "stt_kernels/py.typed",
        "stt_model/py.typed",
    }
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith(".so") or n.endswith("_build_info.json")]
    assert "Requires-Dist: torch>=2.4" in pkg_info
    assert f"Version: {VERSION}\n" in pkg_info and "License-Expression: BSD-3-Clause" in pkg_info


def test_one_version_everywhere():
    assert stt_kernels.__version__ == importlib.metadata.version("stt-kernels")
    changelog = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE).group(1)
    citation = re.search(r"^version: (\S+)", (ROOT / "CITATION.cff").read_text(), re.MULTILINE).group(1)
    assert changelog == citation == VERSION


def test_the_model_extra_covers_the_command():
    from stt_model.cli import MODEL_EXTRA_MODULES

    assert list(MODEL_EXTRA_MODULES) == PYPROJECT["project"]["optional-dependencies"]["model"]


def test_stt_without_the_model_extras_says_which_to_install():
    script = textwrap.dedent("""
        import sys
        sys.modules["numpy"] = None   # find_spec and import both see it as not installed
        sys.modules["matplotlib"] = None
        from stt_model.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    for argv in (["--help"], ["demo", "--minutes", "0.1"]):
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", script, *argv], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "stt: error: numpy, matplotlib not installed; the stt commands need the model extras: "
            "pip install 'stt-kernels[model]'"
        ], result.stderr


def test_demo_montage_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    from stt_model.demo import _montage

    volume = np.zeros((3, 8, 8), np.uint8)
    probs = np.zeros((2, 3, 8, 8), np.uint8)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _montage(tmp_path / "montage.png", volume, probs, volume, volume)
    assert capsys.readouterr().out == (
        "montage.png skipped: matplotlib is not installed (matplotlib draws it: pip install 'stt-kernels[model]')\n"
    )
    assert not (tmp_path / "montage.png").exists()
    monkeypatch.undo()  # matplotlib as it was: a fresh import beside its old submodules would break them
    _montage(tmp_path / "montage.png", volume, probs, volume, volume)
    assert (tmp_path / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _installed_copy(tmp_path: Path) -> Path:
    """This package copied to a folder with no setup.py beside it: an installed layout."""
    site = tmp_path / "site-packages"
    shutil.copytree(
        Path(stt_kernels.__file__).parent, site / "stt_kernels", ignore=shutil.ignore_patterns("__pycache__")
    )
    return site / "stt_kernels"


_IMPORT_REPORT = textwrap.dedent("""
    import sys, warnings
    # An editable install's finder would fill in a missing stt_kernels._C from the checkout.
    sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import stt_kernels
    for w in caught:
        print("WARNING", w.category.__name__, w.message)
    print("CPU", stt_kernels.backends()["cpu"])
""")


def _import_report(site: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_REPORT],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        cwd=site,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.slow
def test_installed_package_without_its_library_warns_once(tmp_path):
    package = _installed_copy(tmp_path)
    for library in package.glob("*.so"):
        library.unlink()
    lines = _import_report(package.parent)
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith(f"WARNING RuntimeWarning stt_kernels._C is missing from {package}")
    assert "--no-binary stt-kernels stt-kernels" in warnings[0]
    assert lines[-1].startswith(f"CPU cpu       unavailable stt_kernels._C is missing from {package}")


@pytest.mark.slow
def test_installed_package_built_for_another_torch_warns(tmp_path):
    package = _installed_copy(tmp_path)
    for library in package.glob("*.so"):
        library.write_bytes(b"not a shared library")
    (package / "_build_info.json").write_text('{"torch_version": "2.3.0+cu121", "cuda_version": "12.1"}')
    lines = _import_report(package.parent)
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1, lines
    assert "stt_kernels._C was built for torch 2.3.0+cu121, CUDA 12.1; you have torch " in warnings[0]
    assert "rebuild it against your torch: `pip install --no-build-isolation" in warnings[0]
    assert "built for torch 2.3.0+cu121" in lines[-1]


@pytest.mark.slow
def test_checkout_never_built_is_quiet(tmp_path):
    package = _installed_copy(tmp_path)
    for library in [*package.glob("*.so"), package / "_build_info.json"]:
        library.unlink(missing_ok=True)
    (package.parent / "setup.py").write_text("")  # a source tree, before its first build
    lines = _import_report(package.parent)
    assert not [line for line in lines if line.startswith("WARNING")], lines
    assert "stt_kernels._C is not built; rebuild it with `pip install --no-build-isolation -e .`" in lines[-1]
