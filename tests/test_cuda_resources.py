"""The CUDA kernels' resources, from the build CI already does: ``setup.py`` compiles them with
``-Xptxas -v`` and records each kernel's registers, shared memory and spills per target in
``_build_info.json``; no kernel may spill or exceed its target's limits. The parser itself is
tested on a report in ptxas's format, so it cannot silently read nothing."""

import json
from pathlib import Path

import pytest

import stt_kernels
from stt_kernels import _ptxas

BUILD_INFO = Path(stt_kernels.__file__).with_name("_build_info.json")

# What piped `ninja -v` printed for two compiles: a CUDA one with its ptxas report (two
# targets, a kernel and a device function that spills) and a C++ one.
NINJA_OUTPUT = """\
[1/2] c++ -MMD -MF csrc/attention.o.d -c /src/csrc/attention.cpp -o csrc/attention.o -O3
[2/2] /usr/local/cuda/bin/nvcc -MD -MF k.o.d -I/src/csrc/include -c /src/csrc/cuda/k.cu -o k.o --resource-usage
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN3stt12_GLOBAL__N_16kernelIfEEvPT_' for 'sm_80'
ptxas info    : Function properties for _ZN3stt12_GLOBAL__N_16kernelIfEEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Function properties for _ZN3stt6helperEv
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function '_ZN3stt12_GLOBAL__N_16kernelIfEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN3stt12_GLOBAL__N_16kernelIfEEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
"""


def test_the_report_is_split_by_cuda_source():
    sections = _ptxas.split_by_source(NINJA_OUTPUT)
    assert list(sections) == ["/src/csrc/cuda/k.cu"]
    assert "Compiling entry function" in sections["/src/csrc/cuda/k.cu"]


def test_every_figure_is_read():
    kernels = {(k.kernel, k.arch): k for k in _ptxas.parse(NINJA_OUTPUT)}
    name = "_ZN3stt12_GLOBAL__N_16kernelIfEEvPT_"
    assert kernels[name, "sm_80"] == _ptxas.KernelResources(name, "sm_80", registers=40, static_smem=1024)
    assert kernels[name, "sm_90"] == _ptxas.KernelResources(name, "sm_90", registers=255)
    assert kernels["_ZN3stt6helperEv", "sm_80"] == _ptxas.KernelResources(
        "_ZN3stt6helperEv", "sm_80", stack=24, spill_stores=8, spill_loads=12
    )


def test_spills_and_figures_over_the_limits_are_named():
    kernels = _ptxas.parse(NINJA_OUTPUT)
    problems = _ptxas.violations(kernels)
    assert len(problems) == 1 and "spills 8 bytes stored, 12 loaded" in problems[0]
    over = _ptxas.KernelResources("k", "sm_90", registers=256, static_smem=48 * 1024 + 1)
    assert _ptxas.violations([over]) == ["k (sm_90): registers 256 > 255", "k (sm_90): static_smem 49153 > 49152"]
    assert _ptxas.violations([_ptxas.KernelResources("k", "sm_75")]) == ["k (sm_75): no limits known for sm_75"]


def test_the_table_has_a_row_per_kernel_and_columns_per_target():
    table = _ptxas.markdown_table({"csrc/cuda/k.cu": _ptxas.parse(NINJA_OUTPUT)})
    rows = table.splitlines()
    assert rows[0].count("regs") == 2 and len(rows) == 4  # header, rule, the kernel, the helper
    assert "| 40 | 1024 | 0 | 0 | 255 | 0 | 0 | 0 |" in table


def _build_record() -> dict:
    record = json.loads(BUILD_INFO.read_text())
    if record.get("mode") != "cuda":
        pytest.skip(f"this build has no CUDA kernels (mode {record.get('mode')!r}): nothing was compiled for a GPU")
    return record


def test_the_build_recorded_every_cuda_source_for_every_target():
    record = _build_record()
    resources = record.get("cuda_resources")
    assert resources, "the CUDA build recorded no ptxas figures: rebuild (setup.py compiles with --resource-usage)"
    sources = sorted(
        str(p.relative_to(BUILD_INFO.parent.parent)) for p in (BUILD_INFO.parent.parent / "csrc" / "cuda").glob("*.cu")
    )
    assert sorted(resources) == sources
    archs = set(record["archs"].split(","))
    for source, records in resources.items():
        assert records is not None, f"no ptxas report kept for {source}: rebuild it (rm -r build/temp-cuda-*)"
        assert {r["arch"] for r in records if r["registers"]} == archs, source


def test_no_cuda_kernel_spills_or_exceeds_its_target():
    resources = _build_record().get("cuda_resources") or {}
    kernels = [k for records in resources.values() for k in _ptxas.from_records(records or [])]
    assert _ptxas.violations(kernels) == []


def test_the_command_writes_the_table_into_its_section_and_keeps_the_rest(tmp_path, capsys):
    """``python -m stt_kernels._ptxas LOG --results-md FILE``: the table of the log, in its own
    section of FILE (replaced on a second run, never duplicated; the other sections kept), and exit 1
    for the helper's spill."""
    log, results = tmp_path / "build.log", tmp_path / "RESULTS.md"
    log.write_text(NINJA_OUTPUT)
    results.write_text("# Results\n\n<!-- results: cpu -->\nkept\n<!-- end results: cpu -->\n")
    assert _ptxas.main([str(log), "--results-md", str(results)]) == 1
    assert _ptxas.main([str(log), "--results-md", str(results)]) == 1
    text = results.read_text()
    assert text.count(_ptxas.HEADING) == 1 and "kept" in text and "| `k.cu` |" in text
    assert "spills 8 bytes stored, 12 loaded" in capsys.readouterr().err
