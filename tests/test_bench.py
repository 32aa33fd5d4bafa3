"""The benchmark engine (stt_kernels.bench) on tiny shapes: valid files, OOM and skips recorded
instead of crashing, the standard timers, any shape through a suite, the speedup arithmetic, and
the kernel package standing alone (it never imports stt_model)."""

import json
import subprocess
import sys
import time

import pytest
import torch

import stt_kernels
from stt_kernels.bench import (
    SUITES,
    Implementation,
    Options,
    Shape,
    differentiable,
    engine,
    impls,
    measure,
    read_results,
    register_suite,
    run,
)
from stt_kernels.bench.cases import CASES, levels, sst_module
from stt_kernels.bench.engine import Row, add_speedups, plan
from stt_kernels.bench.report import update_results_md

METADATA_FIELDS = (
    "device",
    "cpu",
    "cpu_cores",
    "cuda",
    "rocm",
    "torch",
    "triton",
    "torchvision",
    "commit",
    "command",
    "date",
    "backends",
    "load_average",
    "duration_s",
)


def _raise_oom(*args: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("simulated: tried to allocate 1 PiB")


@pytest.fixture
def small_ceilings(monkeypatch):
    monkeypatch.setitem(measure.CEILING_SIZES, "cpu", ((64, 1 << 16),) * 2)  # a yardstick, not a benchmark


@pytest.fixture
def fake_implementations(monkeypatch):
    op = "temporal_attention"
    oom = Implementation("fake:oom", op, "peer", differentiable(_raise_oom))
    declines = Implementation(
        "fake:skip", op, "peer", differentiable(_raise_oom), unsupported=lambda dtype: "needs hardware we lack"
    )
    monkeypatch.setattr(impls, "IMPLEMENTATIONS", impls.IMPLEMENTATIONS + [oom, declines])
    monkeypatch.setattr(engine, "IMPLEMENTATIONS", impls.IMPLEMENTATIONS)


def _options(tmp_path, **kwargs) -> Options:
    settings = dict(
        out=tmp_path / "out",
        tier="quick",
        passes=["forward"],
        device="cpu",
        warmup=0,
        repeats=2,
        cpu_memory=False,
        threads=1,
        progress=lambda line: None,
    )
    return Options(**{**settings, **kwargs})


def test_engine_writes_valid_results_with_oom_and_skip(tmp_path, fake_implementations, small_ceilings):
    path = run(
        _options(
            tmp_path,
            ops=["temporal_attention"],
            backends=["reference"],
            peers=["sdpa:math", "fake"],
            command=["stt", "bench", "--quick"],
        )
    )
    document = json.loads(path.read_text())
    for name in METADATA_FIELDS:
        assert name in document["metadata"], name
    assert document["metadata"]["command"] == "stt bench --quick"
    assert document["ceilings"]["matmul_gflops"]["float32"] > 0
    rows = read_results(path)["rows"]
    status = {(r.implementation, r.shape): r.status for r in rows}
    for shape in (CASES["temporal_attention"].label(s) for s in levels("quick")):
        assert status[("reference", shape)] == status[("sdpa:math", shape)] == "ok"
        assert status[("fake:oom", shape)] == "OOM" and status[("fake:skip", shape)] == "skipped"
    for row in rows:
        if row.status == "ok":
            assert row.time_q1_s <= row.time_median_s <= row.time_q3_s and row.repeats >= 2
            assert row.timer == "torch.utils.benchmark.Timer.blocked_autorange"
            assert row.gflops_per_s > 0 and row.gbytes_per_s > 0
        if row.kind == "reference":
            assert row.speedup_vs_reference == pytest.approx(1.0)
    assert next(r for r in rows if r.status == "skipped").reason == "needs hardware we lack"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## temporal_attention" in report and "**OOM**" in report and "needs hardware we lack" in report
    assert "Command: `stt bench --quick`" in report and "Timer: torch.utils.benchmark" in report
    assert "reference: yes" in report and document["metadata"]["backends"]["reference"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "results.json"]


def test_a_suite_takes_any_shape(tmp_path, small_ceilings, monkeypatch):
    # Odd sizes, a head dim of 5 and a block of 3 slices: nothing in the engine assumes the STT-UNET levels.
    monkeypatch.setitem(
        SUITES,
        "odd",
        lambda tier: [
            ("spatial_attention", Shape(1, 3, 5, 7, 10, 2, "odd"), None),
            ("sst_attention", Shape(1, 3, 5, 7, 8, 2, "odd"), ("forward",)),
        ],
    )
    rows = read_results(
        run(
            _options(tmp_path, suites=["odd"], backends=["reference"], peers=[], passes=["forward", "forward+backward"])
        )
    )["rows"]
    assert [(r.op, r.shape, r.pass_, r.status) for r in rows] == [
        ("spatial_attention", "odd B1 T3 5x7 C10 h2", "forward", "ok"),
        ("spatial_attention", "odd B1 T3 5x7 C10 h2", "forward+backward", "ok"),
        ("sst_attention", "odd B1 T3 5x7 C8 h2", "forward", "ok"),
    ]
    # 3 x 2 sequences of 35 tokens, d = 5: 4 N^2 d FLOPs each, forward.
    assert rows[0].flops == 4 * 35**2 * 5 * 6 and rows[1].flops == rows[0].flops * 3.5


def test_unknown_suites_and_ops_are_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"suites \(--suite\) must be among levels, issue-shapes, .*; got 'nope'"):
        Options(out=tmp_path / "out", suites=["nope"])
    with pytest.raises(ValueError, match=r"ops \(--ops\) must be among spatial_attention, .*; got 'conv'"):
        Options(out=tmp_path / "out", ops=["conv"])


def test_cpu_timing_is_torch_utils_benchmark_with_at_least_the_repeats():
    timing = measure.time_step(lambda: time.sleep(0.002), torch.device("cpu"), warmup=0, repeats=4, min_run_time=0.01)
    assert timing.repeats >= 4 and 0.0019 < timing.median < 0.05
    assert timing.timer == "torch.utils.benchmark.Timer.blocked_autorange"


def test_gpu_timing_is_triton_do_bench(monkeypatch):
    calls = []

    def do_bench(fn, warmup, rep, return_mode):
        calls.append((rep, return_mode))
        return [2.0, 1.0, 4.0]  # milliseconds, L2 flushed between them by do_bench itself

    monkeypatch.setattr(measure, "do_bench", do_bench)
    timing = measure.time_step(lambda: None, torch.device("cuda"), warmup=0, repeats=5, min_run_time=0.25)
    assert calls == [(250.0, "all"), (250.0, "all")]  # rounds until there are 5 samples
    assert (timing.median, timing.repeats, timing.timer) == (0.002, 6, "triton.testing.do_bench (L2 flushed)")


def test_cpu_memory_cap_records_oom_in_the_subprocess():
    spec = {
        "module": "stt_kernels.bench.cases",
        "op": "temporal_attention",
        "implementation": "reference",
        "shape": levels("quick")[0].__dict__,
        "dtype": "float32",
        "pass": "forward+backward",
        "seed": 0,
    }
    probe = measure.probe_cpu(spec, cap_bytes=1)
    assert probe["status"] == "OOM" and "memory cap" in probe["reason"], probe


def test_cpu_memory_of_a_row_is_measured_in_a_fresh_process(tmp_path, small_ceilings, monkeypatch):
    monkeypatch.setitem(SUITES, "one", lambda tier: [("temporal_attention", Shape(1, 64, 16, 16, 8, 1), None)])
    rows = read_results(run(_options(tmp_path, suites=["one"], backends=["reference"], peers=[], cpu_memory=True)))
    # The reference's scores and their softmax: 256 sequences of 64 x 64 float32, 4 MiB each.
    (row,) = rows["rows"]
    assert row.status == "ok" and row.peak_memory_bytes >= 8 << 20 and row.baseline_memory_bytes > 50 << 20


def _row(implementation: str, kind: str, seconds: float, status: str = "ok") -> Row:
    return Row(
        "op",
        implementation,
        kind,
        "S",
        {},
        "float32",
        "forward",
        1.0,
        1.0,
        status=status,
        time_median_s=seconds if status == "ok" else None,
    )


def test_speedups_against_reference_and_fastest_peer():
    rows = [
        _row("reference", "reference", 8.0),
        _row("ours:cpu", "ours", 2.0),
        _row("slow", "peer", 6.0),
        _row("fast", "peer", 4.0),
        _row("broken", "peer", 0.0, status="OOM"),
    ]
    add_speedups(rows)
    by_name = {r.implementation: r for r in rows}
    assert by_name["ours:cpu"].speedup_vs_reference == 4.0
    assert by_name["ours:cpu"].speedup_vs_best_peer == 2.0 and by_name["ours:cpu"].best_peer == "fast"
    assert by_name["slow"].speedup_vs_best_peer == pytest.approx(4.0 / 6.0)
    assert by_name["reference"].speedup_vs_reference == 1.0 and by_name["broken"].speedup_vs_reference is None


def test_summarise_quartiles():
    timing = measure.summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median, timing.q1, timing.q3, timing.repeats) == (3.0, 2.0, 4.0, 5)


def test_results_md_keeps_other_devices_and_the_text_around(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nintro\n\n## Triton resources\n\nkept\n")
    update_results_md(path, "CPU A", "# stt-kernels benchmark\n\nfirst\n")
    update_results_md(path, "GPU B", "# stt-kernels benchmark\n\ngpu\n")
    update_results_md(path, "CPU A", "# stt-kernels benchmark\n\nsecond\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "gpu" in text and "intro" in text and "kept" in text
    assert text.count("<!-- results: CPU A -->") == 1 and "## CPU A" in text


def test_training_step_suite_runs_on_every_backend_here(tmp_path, small_ceilings, monkeypatch):
    from stt_model import train_step_bench

    small = train_step_bench.TrainStepCase().small(train_step_bench.preset_shape("tiny-cpu"))
    monkeypatch.setitem(SUITES, "train-step", lambda tier: [(train_step_bench.NAME, small, None)])
    options = _options(
        tmp_path,
        suites=["train-step"],
        backends=["cpu", "reference"],
        peers=[],
        repeats=1,
        passes=["forward", "forward+backward"],
    )
    rows = read_results(run(options))["rows"]
    expected = {("reference", "forward"), ("reference", "forward+backward")}
    if stt_kernels.backends()["cpu"].available:
        expected |= {("ours:cpu", "forward"), ("ours:cpu", "forward+backward")}
    assert {(r.implementation, r.pass_) for r in rows if r.status == "ok"} == expected
    flops = {r.pass_: r.flops for r in rows}
    assert 0 < flops["forward"] < flops["forward+backward"]
    assert all(r.gbytes_per_s is None and r.shape == "tiny-cpu B1 T2 16x16" for r in rows)
    assert train_step_bench.TrainStepCase.description in (tmp_path / "out" / "report.md").read_text()
    # The network trains in float32 parameters: no row in another dtype, whatever the run asks for.
    asked = plan(["train-step"], "quick", torch.device("cpu"), [torch.float16, torch.float32])
    assert asked and {dtype for _, _, _, dtype, _ in asked} == {torch.float32}


def test_the_kernel_package_never_imports_stt_model():
    code = (
        "import sys, stt_kernels.bench.cli as cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'stt_model'), sorted(cli.SUITES))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[] ['issue-scale', 'issue-shapes', 'levels']"  # the model's suites come from stt


def test_an_implementation_is_ours_the_reference_or_a_peer():
    with pytest.raises(ValueError, match="kind must be one of ours, reference, peer; got 'theirs'"):
        Implementation("x", "temporal_attention", "theirs", differentiable(_raise_oom))


def test_register_suite_makes_a_suite_selectable(tmp_path):
    register_suite("mine", lambda tier: [("deform_conv2d", Shape(1, 1, 3, 3, 2, 1), ("forward",))])
    try:
        assert Options(out=tmp_path / "o", suites=["mine"]).suites == ["mine"]
    finally:
        del SUITES["mine"]


def test_the_predict_volume_volume_repeats_its_tile_to_the_edges(monkeypatch):
    import h5py

    from stt_model import train_step_bench
    from stt_model.data import synthetic_volume

    monkeypatch.setattr(train_step_bench, "TILE", (4, 16, 16))
    path = train_step_bench.volume(Shape(1, 6, 20, 40, 1, 1))
    tile = synthetic_volume((4, 16, 16), seed=0).image
    with h5py.File(path) as f:
        image = f["image"][:]
    assert image.shape == (6, 20, 40)
    expected = [[[tile[z % 4, y % 16, x % 16] for x in range(40)] for y in range(20)] for z in range(6)]
    assert (image == expected).all()


def test_predict_volume_suite_runs_stt_predict(tmp_path, small_ceilings, monkeypatch):
    from stt_model import train_step_bench

    one_window = Shape(1, 8, 64, 64, 1, 1, "volume")
    monkeypatch.setitem(
        SUITES, "predict-volume", lambda tier: [(train_step_bench.PredictVolumeCase.name, one_window, ("forward",))]
    )
    rows = read_results(run(_options(tmp_path, suites=["predict-volume"], backends=["reference"], repeats=1)))["rows"]
    assert [(r.shape, r.status) for r in rows] == [("volume 8x64x64", "ok")], rows
    assert rows[0].time_median_s > 0 and rows[0].gflops_per_s is None


def test_building_the_stt_parser_leaves_the_timers_unimported():
    """torch.utils.benchmark imports cpp_extension, which prints a CUDA warning on a CUDA build of
    torch without a GPU: every `stt` command builds the bench parser, and its one-line errors
    must stay one line."""
    code = (
        "import sys, stt_model.cli as cli; cli._parser(); "
        "print(sorted(m for m in ('torch.utils.benchmark', 'torch.utils.cpp_extension') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_stock_block_is_our_block_from_stock_parts():
    """The ``stock`` peer of ``sst_attention`` (SDPA and torchvision's deform_conv2d on the block's
    own weights) computes what SSTAttention computes, forward and every gradient: the ratio
    against it compares the same work."""
    pytest.importorskip("torchvision")
    block = sst_module(8, 2, torch.float64, torch.device("cpu"))
    x = torch.randn(2, 8, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    wrt, grad = [x, *block.parameters()], torch.randn(x.shape, dtype=torch.float64)
    with stt_kernels.use_backend("reference"):
        ours = block(x)
    stock = impls.stock_sst_attention(block, x)
    assert block.fusion.predictor.weight.abs().max() > 0  # the offsets sample between pixels
    torch.testing.assert_close(stock, ours, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(stock, wrt, grad), torch.autograd.grad(ours, wrt, grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_the_block_is_timed_against_the_stock_block(tmp_path, small_ceilings, monkeypatch):
    monkeypatch.setitem(SUITES, "block", lambda tier: [("sst_attention", Shape(1, 2, 6, 6, 8, 2, "tiny"), None)])
    rows = read_results(run(_options(tmp_path, suites=["block"], backends=["reference"], peers=["stock"])))["rows"]
    assert [(r.implementation, r.status) for r in rows] == [("reference", "ok"), ("stock", "ok")]
    assert rows[0].best_peer == "stock" and rows[0].speedup_vs_best_peer == pytest.approx(
        rows[1].time_median_s / rows[0].time_median_s
    )


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu avx2 fma", "AMD EPYC (family 25 model 1, AVX2)"),
        ("avx2 avx512f avx512_bf16", "AMD EPYC (family 25 model 1, AVX-512, AVX512-BF16)"),
        ("avx2 avx512f avx512_bf16 amx_tile", "AMD EPYC (family 25 model 1, AVX-512, AVX512-BF16, AMX)"),
        ("sse2", "AMD EPYC (family 25 model 1)"),
    ],
)
def test_the_cpu_is_named_with_family_model_and_isa(monkeypatch, flags, expected):
    from stt_kernels.bench import engine

    cpuinfo = f"processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n"
    monkeypatch.setattr(engine.Path, "read_text", lambda self: cpuinfo)
    assert engine._cpu() == expected
