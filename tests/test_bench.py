"""The benchmark engine (stt_kernels.bench) on tiny shapes: valid files, OOM and skips
recorded instead of crashing, and the speedup arithmetic."""

import json

import pytest
import torch

from stt_kernels.bench import Implementation, Options, run
import stt_kernels
from stt_kernels.bench import ceilings, plots, plugins, registry
from stt_kernels.bench.cases import CASES
from stt_kernels.bench.memory import probe_cpu
from stt_kernels.bench.results import Row, add_speedups, read_results
from stt_kernels.bench.results_md import update_results_md
from stt_kernels.bench.shapes import levels
from stt_kernels.bench.timing import summarise

METADATA_FIELDS = ("device", "cpu", "cpu_cores", "cuda", "rocm", "torch", "triton", "torchvision",
                   "commit", "command", "date", "backends")


def _raise_oom(*args: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("simulated: tried to allocate 1 PiB")


@pytest.fixture
def fake_implementations(monkeypatch):
    op = "temporal_attention"
    oom = Implementation("fake:oom", op, "peer", _raise_oom)
    declines = Implementation("fake:skip", op, "peer", _raise_oom,
                              unsupported=lambda device, dtype, pass_: "needs hardware we lack")
    monkeypatch.setattr(registry, "IMPLEMENTATIONS", registry.IMPLEMENTATIONS + [oom, declines])


def test_engine_writes_valid_results_with_oom_and_skip(tmp_path, fake_implementations, monkeypatch):
    monkeypatch.setitem(ceilings._SIZES, ("cpu", "quick"), (256, 1 << 20))  # a yardstick, not a benchmark
    options = Options(out=tmp_path / "out", tier="quick", ops=["temporal_attention"], backends=["reference"],
                      peers=["sdpa:math", "fake"], passes=["forward"], device="cpu", warmup=0, repeats=2,
                      cpu_memory=False, threads=1, progress=lambda line: None, command=["stt", "bench", "--quick"])
    path = run(options)

    document = json.loads(path.read_text())
    for field in METADATA_FIELDS:
        assert field in document["metadata"], field
    assert document["metadata"]["command"] == "stt bench --quick"
    assert document["ceilings"]["matmul_gflops"]["float32"] > 0
    rows = read_results(path)["rows"]
    status = {(r.implementation, r.shape): r.status for r in rows}
    shapes = [CASES["temporal_attention"].label(level) for level in levels("quick")]
    for shape in shapes:
        assert status[("reference", shape)] == "ok"
        assert status[("fake:oom", shape)] == "OOM"
        assert status[("fake:skip", shape)] == "skipped"
    for row in rows:
        if row.status == "ok":
            assert row.time_q1_s <= row.time_median_s <= row.time_q3_s and row.repeats == 2
            assert row.gflops_per_s > 0 and row.gbytes_per_s > 0
        if row.kind == "reference":
            assert row.speedup_vs_reference == pytest.approx(1.0)
    skipped = next(r for r in rows if r.status == "skipped")
    assert skipped.reason == "needs hardware we lack"

    report = (tmp_path / "out" / "report.md").read_text()
    assert "## temporal_attention" in report and "**OOM**" in report
    assert "needs hardware we lack" in report and "Command: `stt bench --quick`" in report
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["temporal_attention_memory.png", "temporal_attention_speedup.png",
                    "temporal_attention_time.png"] or "Plots skipped" in report
    assert not list((tmp_path / "out").glob(".*")), "temporary files left behind"


def test_cpu_memory_cap_records_oom_in_the_subprocess():
    level = levels("quick")[0]
    spec = {"op": "temporal_attention", "implementation": "reference", "level": level.__dict__,
            "dtype": "float32", "pass": "forward+backward", "seed": 0}
    probe = probe_cpu(spec, cap_bytes=1, timeout_s=120)
    assert probe.status == "OOM" and "memory cap" in probe.reason, probe


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(plots.importlib.util, "find_spec", lambda name: None)
    written, note = plots.write_plots(tmp_path, [_row("reference", "reference", 1.0)])
    assert written == [] and "matplotlib is not installed" in note


def _row(implementation: str, kind: str, seconds: float, status: str = "ok") -> Row:
    row = Row("op", implementation, kind, "S", {}, 1, "float32", "forward", status=status)
    row.time_median_s = seconds if status == "ok" else None
    return row


def test_speedups_against_reference_and_fastest_peer():
    rows = [_row("reference", "reference", 8.0), _row("ours:cpu", "ours", 2.0), _row("slow", "peer", 6.0),
            _row("fast", "peer", 4.0), _row("broken", "peer", 0.0, status="OOM")]
    add_speedups(rows)
    by_name = {r.implementation: r for r in rows}
    assert by_name["ours:cpu"].speedup_vs_reference == 4.0
    assert by_name["ours:cpu"].speedup_vs_best_peer == 2.0 and by_name["ours:cpu"].best_peer == "fast"
    assert by_name["slow"].speedup_vs_best_peer == pytest.approx(4.0 / 6.0)
    assert by_name["reference"].speedup_vs_reference == 1.0
    assert by_name["broken"].speedup_vs_reference is None


def test_summarise_quartiles():
    timing = summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median, timing.q1, timing.q3, timing.min, timing.max, timing.repeats) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)


def test_results_md_keeps_other_devices(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_results_md(path, "CPU A", "# stt-kernels benchmark\n\nfirst\n")
    update_results_md(path, "GPU B", "# stt-kernels benchmark\n\ngpu\n")
    update_results_md(path, "CPU A", "# stt-kernels benchmark\n\nsecond\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "gpu" in text
    assert text.count("<!-- results: CPU A -->") == 1 and "## CPU A" in text


def test_training_step_case_runs_on_every_backend_here(tmp_path, monkeypatch):
    from stt_model import train_step_bench

    case = CASES[train_step_bench.NAME]  # registered through the entry point, not imported here
    small = case.small(case.levels("quick")[0])
    monkeypatch.setattr(type(case), "levels", lambda self, tier: [small])
    options = Options(out=tmp_path / "out", tier="quick", ops=[case.name], backends=["cpu", "reference"],
                      peers=[], device="cpu", warmup=0, repeats=1, cpu_memory=False, threads=1, plots=False,
                      progress=lambda line: None)
    rows = read_results(run(options))["rows"]
    expected = {("reference", "forward"), ("reference", "forward+backward")}
    if stt_kernels.backends()["cpu"].available:
        expected |= {("ours:cpu", "forward"), ("ours:cpu", "forward+backward")}
    assert {(r.implementation, r.pass_) for r in rows if r.status == "ok"} == expected
    flops = {r.pass_: r.flops for r in rows}
    assert 0 < flops["forward"] < flops["forward+backward"]
    assert all(r.gbytes_per_s is None and r.shape == "tiny-cpu B1 T2 16x16" for r in rows)
    assert case.description in (tmp_path / "out" / "report.md").read_text()


def test_an_implementation_takes_either_call_or_make_step():
    with pytest.raises(ValueError, match="exactly one of call and make_step"):
        Implementation("neither", "temporal_attention", "peer")
    with pytest.raises(ValueError, match="exactly one of call and make_step"):
        Implementation("both", "temporal_attention", "peer", _raise_oom, make_step=lambda *a: None)


def test_a_broken_plugin_warns_and_the_engine_still_loads(monkeypatch):
    class Entry:
        name, value = "broken", "nowhere:thing"

        def load(self):
            raise RuntimeError("plugin bug")

    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [Entry()])
    with pytest.warns(RuntimeWarning, match="benchmark plugin 'broken'.*plugin bug"):
        assert plugins.load_plugins() == []
