"""Runtime dispatch of the CPU kernels: one library per x86 capability, the best the CPU runs
loaded at import (capped by ATEN_CPU_CAPABILITY), every one of them right, and none that can
meet an instruction the CPU lacks: the baseline code holds no AVX, each library's flags are
checked at run time, release libraries carry no debug sections."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

import stt_kernels
from stt_kernels import _isa
from stt_kernels._extension import EXTENSION

PACKAGE = Path(stt_kernels.__file__).parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
BUILT = EXTENSION.info.get("cpu_capabilities", [])
FEATURES = dict(stt_kernels._C.cpu_features()) if EXTENSION.loaded else {}
needs_build = pytest.mark.skipif(not EXTENSION.loaded, reason=f"stt_kernels._C is not usable: {EXTENSION.error}")
needs_x86 = pytest.mark.skipif(not X86, reason=f"x86 capabilities; this machine is {platform.machine()}")


def libraries(prefix: str = "") -> list[Path]:
    return sorted(p for p in PACKAGE.glob(f"{prefix}*.so") if p.name.startswith(("_C.", "_cpu_")))


# --- choosing a library ------------------------------------------------------------------

ALL = ("default", "avx2", "avx512")
ZEN4 = {f: True for c in _isa.X86_CAPABILITIES for f in c.features}
HASWELL = {**ZEN4, "avx512f": False, "avx512bw": False, "avx512dq": False, "avx512vl": False}
SANDY_BRIDGE = {**HASWELL, "avx2": False, "fma": False}


@pytest.mark.parametrize(
    "features, env, expected",
    [
        (ZEN4, {}, "avx512"),
        (HASWELL, {}, "avx2"),
        (SANDY_BRIDGE, {}, "default"),  # AVX but no AVX2: the baseline library
        ({}, {}, "default"),  # nothing known about the CPU: the baseline library
        (ZEN4, {"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
        (ZEN4, {"ATEN_CPU_CAPABILITY": "DEFAULT"}, "default"),
        (HASWELL, {"ATEN_CPU_CAPABILITY": "avx512"}, "avx2"),  # torch would fault there; we do not
        (ZEN4, {"ATEN_CPU_CAPABILITY": "zvector"}, "avx512"),  # not an x86 name: ignored, as torch does
        ({**ZEN4, "avx512bw": False}, {}, "avx2"),  # every feature of a level is needed
    ],
    ids=[
        "zen4",
        "haswell",
        "sandy-bridge",
        "unknown-cpu",
        "capped-avx2",
        "capped-default",
        "cap-above-cpu",
        "cap-not-x86",
        "avx512f-without-bw",
    ],
)
def test_choice_is_the_best_the_cpu_runs_within_the_cap(features, env, expected):
    choice = _isa.choose(ALL, features, env)
    assert choice.name == expected, choice.note


def test_choice_names_what_decided_it():
    assert (
        "capped by ATEN_CPU_CAPABILITY=avx2; this CPU runs avx512"
        in _isa.choose(ALL, ZEN4, {"ATEN_CPU_CAPABILITY": "avx2"}).note
    )
    assert "this CPU runs at most avx2" in _isa.choose(ALL, HASWELL, {"ATEN_CPU_CAPABILITY": "avx512"}).note
    assert (
        "'bogus' ignored (expected one of default, avx2, avx512)"
        in _isa.choose(ALL, ZEN4, {"ATEN_CPU_CAPABILITY": "bogus"}).note
    )


def test_choice_only_among_built_libraries():
    assert _isa.choose(("default", "avx2"), ZEN4, {}).name == "avx2"
    assert _isa.choose(("avx2", "avx512"), SANDY_BRIDGE, {}).name is None
    assert (
        "runs none of the CPU kernel libraries built (avx2, avx512)"
        in _isa.choose(("avx2", "avx512"), SANDY_BRIDGE, {}).note
    )
    assert _isa.choose((), ZEN4, {}).name is None  # a _C from before the kernel libraries
    assert _isa.choose(("native",), {}, {"ATEN_CPU_CAPABILITY": "default"}).name == "native"


def test_non_x86_builds_one_baseline_library():
    (only,) = _isa.build_capabilities("aarch64", native=False)
    assert (only.name, only.flags, only.features) == ("default", (), ())
    assert [c.name for c in _isa.build_capabilities("x86_64", native=False)] == list(ALL)
    assert [c.flags for c in _isa.build_capabilities("x86_64", native=True)] == [("-march=native",)]


# --- the flags and the run-time check agree ---------------------------------------------

# Macros the flags turn on whose instructions come with a checked feature: CRC32 is part of
# SSE4.2; XSAVE is what the OS uses to enable AVX, which GCC's AVX check already requires.
_IMPLIED = {"crc32": "sse4.2", "xsave": "avx"}


def _isa_macros(flags: tuple[str, ...]) -> set[str]:
    compiler = os.environ.get("CXX", "c++")
    result = subprocess.run(
        [compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, check=True
    )
    return set(re.findall(r"^#define __([A-Z0-9_]+)__ 1$", result.stdout, re.MULTILINE))


@needs_x86
@needs_build
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to ask")
@pytest.mark.parametrize("capability", _isa.X86_CAPABILITIES[1:], ids=lambda c: c.name)
def test_every_instruction_set_the_flags_enable_is_checked_at_run_time(capability):
    enabled = _isa_macros(capability.flags) - _isa_macros(_isa.X86_CAPABILITIES[0].flags)
    assert enabled, f"{capability.flags} enable nothing"
    needed = {_IMPLIED.get(m.lower(), m.lower().replace("sse4_", "sse4.")) for m in enabled}
    assert needed <= set(capability.features), f"not checked before loading: {needed - set(capability.features)}"
    assert set(capability.features) <= set(FEATURES), "stt_kernels._C.cpu_features() cannot tell these"


# --- each library, loaded for its capability, computes the right numbers ----------------

_CHECK = textwrap.dedent("""
    import json, sys, torch
    import stt_kernels
    from stt_kernels import reference
    from stt_kernels._extension import EXTENSION

    torch.manual_seed(int(sys.argv[1]))
    report = {"capability": EXTENSION.info.get("cpu_capability"),
              "compiled_for": EXTENSION.info.get("cpu_compiled_for"),
              "cpu": str(stt_kernels.backends()["cpu"]), "errors": {}}

    def error(got, want):
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    attention = {"spatial": (stt_kernels.spatial_attention, reference.spatial_attention, (2, 3, 7, 19, 2, 24)),
                 "temporal": (stt_kernels.temporal_attention, reference.temporal_attention, (1, 9, 5, 3, 3, 40))}
    for dtype in (torch.float32, torch.float64):
        for kind, (op, spec, (b, t, h, w, heads, d)) in attention.items():
            qkv = torch.randn(b, t, h, w, 3, heads, d, dtype=dtype, requires_grad=True)
            grad = torch.randn(b, t, h, w, heads, d, dtype=dtype)
            out = op(*qkv.unbind(4), backend="cpu")
            (dx,) = torch.autograd.grad(out, qkv, grad)
            x64 = qkv.detach().double().requires_grad_()
            want = spec(*x64.unbind(4), d ** -0.5)
            (want_dx,) = torch.autograd.grad(want, x64, grad.double())
            report["errors"][f"{kind} {dtype}"] = max(error(out, want), error(dx, want_dx))
        x = torch.randn(2, 5, 11, 13, dtype=dtype, requires_grad=True)
        offset = (2.5 * torch.randn(2, 18, 6, 7, dtype=dtype)).requires_grad_()
        mask = torch.rand(2, 9, 6, 7, dtype=dtype, requires_grad=True)
        weight = torch.randn(3, 5, 3, 3, dtype=dtype, requires_grad=True)
        bias = torch.randn(3, dtype=dtype, requires_grad=True)
        inputs = (x, offset, mask, weight, bias)
        out = stt_kernels.deform_conv2d(*inputs, stride=2, padding=1, backend="cpu")
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad)
        inputs64 = [t.detach().double().requires_grad_() for t in inputs]
        want = stt_kernels.deform_conv2d(*inputs64, stride=2, padding=1, backend="reference")
        wants = torch.autograd.grad(want, inputs64, grad.double())
        report["errors"][f"deform_conv2d {dtype}"] = max(error(g, w) for g, w in zip((out, *grads), (want, *wants)))
    print(json.dumps(report))
""")
_TOLERANCE = {"torch.float32": 1e-5, "torch.float64": 1e-9}


def _runs_here(name: str) -> bool:
    return all(FEATURES.get(f, False) for f in next(c for c in _isa.X86_CAPABILITIES if c.name == name).features)


def _capability_param(name: str, sgemm: str = "default"):
    marks = []
    if name not in BUILT:
        marks.append(pytest.mark.skip(reason=f"the {name} library is not built here (built: {BUILT or 'none'})"))
    elif not _runs_here(name):
        marks.append(pytest.mark.skip(reason=f"this CPU lacks {name}"))
    return pytest.param(name, sgemm, marks=marks, id=name if sgemm == "default" else f"{name}-sgemm-{sgemm}")


@needs_x86
@needs_build
@pytest.mark.parametrize("name, sgemm", [_capability_param(n) for n in ALL] + [_capability_param("avx2", "off")])
def test_each_capability_loads_its_library_and_matches_the_reference(name, sgemm, request):
    """The avx2 library's forward runs heads of 32 or more (the temporal case's 40) on MKL's
    sgemm where torch has MKL; STT_CPU_SGEMM=0 keeps it on brgemm, which must be right too."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": name, "OMP_NUM_THREADS": "2"}
    env.pop("STT_CPU_SGEMM", None)
    if sgemm == "off":
        env["STT_CPU_SGEMM"] = "0"
    seed = str(zlib.crc32(request.node.nodeid.encode()))
    result = subprocess.run([sys.executable, "-c", _CHECK, seed], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["capability"] == name, report["cpu"]
    assert report["compiled_for"] == name, "the library's at::vec level is not the one its name says"
    assert f"stt_kernels._cpu_{name} " in report["cpu"]
    assert len(report["errors"]) == 6
    for case, err in report["errors"].items():
        assert err <= _TOLERANCE[case.split()[-1]], f"{name} {case}: relative error {err:.3g}"


# --- nothing that can fault on an older CPU ---------------------------------------------

# What objdump prints for instructions beyond x86-64: any AVX/AVX-512 register, a VEX-encoded
# (v-prefixed) instruction on xmm registers, or the VEX/BMI/ABM integer instructions.
_BEYOND_BASELINE = re.compile(
    r"%[yz]mm\d|%k[0-7]\b|^\s*[0-9a-f]+:\s+v[a-z0-9]+\s.*%xmm"
    r"|^\s*[0-9a-f]+:\s+(?:popcnt|lzcnt|tzcnt|andn|bextr|blsi|blsr|blsmsk|bzhi|shlx|shrx|sarx|rorx|pdep|pext"
    r"|mulx|movbe)\s",
    re.MULTILINE,
)


@needs_x86
@needs_build
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("prefix", ["_C.", "_cpu_default."])
def test_baseline_code_has_no_instruction_beyond_x86_64(prefix):
    """_C and the default kernel library load on every x86-64 CPU: neither may fault there."""
    if prefix == "_cpu_default." and "default" not in BUILT:
        pytest.skip(f"no default library in this build ({BUILT})")
    (library,) = libraries(prefix)
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert len(code) > 10_000, "objdump printed no code"
    found = _BEYOND_BASELINE.findall(code)
    assert not found, f"{library.name}: {len(found)} instructions beyond x86-64, e.g. {found[:5]}"


@needs_x86
@needs_build
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_the_avx512_library_does_use_avx512():
    """The check above would pass on any library: it means something only because the
    libraries built with the same tooling do use the wider registers."""
    if "avx512" not in BUILT:
        pytest.skip(f"no avx512 library in this build ({BUILT})")
    (library,) = libraries("_cpu_avx512.")
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "%zmm" in code


@needs_build
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_release_libraries_are_stripped():
    if EXTENSION.info.get("debug"):
        pytest.skip("a debug build (STT_DEBUG=1) keeps its debug information")
    found = libraries()
    assert {"_C", *(f"_cpu_{c}" for c in BUILT)} <= {p.name.split(".")[0] for p in found}
    for library in found:
        headers = subprocess.run(["objdump", "-h", str(library)], capture_output=True, text=True, check=True).stdout
        sections = re.findall(r"^\s*\d+\s+(\S+)", headers, re.MULTILINE)
        assert ".text" in sections, f"objdump listed no sections of {library.name}"
        extra = [s for s in sections if s.startswith((".debug", ".zdebug")) or s == ".symtab"]
        assert not extra, f"{library.name} is not stripped: {extra}"


# --- a missing library is a sentence ----------------------------------------------------


@needs_build
def test_missing_kernel_library_turns_the_cpu_backend_off_with_a_sentence(tmp_path):
    chosen = EXTENSION.info["cpu_capability"]
    package = tmp_path / "stt_kernels"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", f"_cpu_{chosen}.*"))
    script = textwrap.dedent(f"""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import stt_kernels
        message = "stt_kernels._cpu_{chosen} is missing although stt_kernels._C lists it"
        assert any(message in str(w.message) for w in caught), [str(w.message) for w in caught]
        status = stt_kernels.backends()["cpu"]
        assert not status.available and message in status.reason, status
        q = torch.randn(1, 2, 3, 2, 1, 4)
        stt_kernels.spatial_attention(q, q, q)  # auto runs the reference
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


# --- the cache sizes tiles are sized by --------------------------------------------------

needs_cpu_kernels = pytest.mark.skipif(
    EXTENSION.cpu is None or EXTENSION.cpu.capability is None, reason="no CPU kernel library is loaded"
)


@needs_cpu_kernels
@pytest.mark.parametrize(
    "text, size",
    [("48K", 48 << 10), ("2048K", 2 << 20), ("1M", 1 << 20), ("32k\n", 32 << 10), ("512", 512), ("", 0), ("n/a", 0)],
)
def test_sysfs_cache_sizes_are_parsed(text, size):
    import ctypes

    parse = _isa._LIBRARIES[-1].stt_parse_cache_size
    parse.restype, parse.argtypes = ctypes.c_int64, [ctypes.c_char_p]
    assert parse(text.encode()) == size


def _sysfs_cache(level: int):
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            found, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if int(found) == level and kind != "Instruction":
            units = {"K": 1 << 10, "M": 1 << 20}
            return int(size.rstrip("KM")) * units.get(size[-1], 1)
    return None


@needs_cpu_kernels
@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/cache").is_dir(), reason="no sysfs cache description")
def test_the_kernels_size_tiles_by_this_cpus_caches():
    l1, l2 = _sysfs_cache(1), _sysfs_cache(2)
    if l1 is None or l2 is None:
        pytest.skip("sysfs describes no level-1 data or level-2 cache here")
    # The kernels' plausibility bounds (stt/cpu_cache.h): a VM can report 0, or its L3 as L2.
    l1 = l1 if (8 << 10) <= l1 <= (1 << 20) else 32 << 10
    l2 = 512 << 10 if l2 < (128 << 10) else min(l2, 4 << 20)
    assert EXTENSION.info["cpu_cache"] == {"l1d": l1, "l2": l2}
