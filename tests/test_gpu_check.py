"""``make gpu-check`` in its dry mode (what CI can run): every GPU step skips with its reason, the
summary names each step, and nothing is left beside the evidence folder."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
STEPS = ("build", "report", "gpu tests", "memcheck", "racecheck", "bench")


def test_dry_run_skips_every_step_with_its_reason(tmp_path):
    out = tmp_path / "evidence"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry"],
        env={"OUT": str(out), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    assert [line.split("  ")[0].strip() for line in lines[: len(STEPS)]] == list(STEPS)
    assert all("skipped: dry run" in line for line in lines[: len(STEPS)])
    assert lines[-1].startswith("total ")
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]


def test_steps_fit_the_nine_minute_budget():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    steps = gpu_check._steps(Path("/nonexistent"), sys.executable)
    assert [step[0] for step in steps] == list(STEPS)
    assert sum(step[1] for step in steps) <= gpu_check.TOTAL_SECONDS <= 9 * 60


def test_the_gpu_tests_step_selects_the_gpu_backends_tests():
    """The kernel tests it names exist, and its selection finds tests in them (a marker no test
    carries would select none, and pytest would exit 5 on the GPU machine)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    (command,) = [step[2] for step in gpu_check._steps(Path("/nonexistent"), sys.executable) if step[0] == "gpu tests"]
    collect = [*command[: command.index("-q")], "--collect-only", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(collect, cwd=gpu_check.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    selected = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("[cuda" in line or "cuda]" in line or "-cuda" in line for line in selected), selected[:20]
    assert any("triton" in line for line in selected)


def test_steps_see_the_checkout_without_an_install(tmp_path):
    """On the GPU machine the package is built in place, not installed: each step's python must
    import it from the checkout, wherever the script's own folder puts sys.path."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    log, probe = tmp_path / "log.txt", tmp_path / "probe.py"
    # Run as a script from elsewhere, as gpu_check runs itself: sys.path[0] is the script's folder.
    probe.write_text(f"import sys\nassert {str(gpu_check.ROOT)!r} in sys.path, sys.path\n")
    assert gpu_check._run([sys.executable, "-S", str(probe)], log, 60) == "ok", log.read_text()


def test_the_bench_step_covers_the_issue_shapes_and_the_papers_scale():
    """Every kernel case and the block at the issues' shapes forward, and temporal attention at the
    first level of the paper's 2 x 32 x 320 x 320 batch forward+backward (no GPU needed to plan)."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from stt_kernels.bench import register_suite
    from stt_kernels.bench.cases import SUITES
    from stt_kernels.bench.engine import plan

    register_suite("gpu-check", gpu_check.suite)
    try:
        rows = plan(["gpu-check"], "quick", torch.device("cuda"), [torch.bfloat16])
    finally:
        del SUITES["gpu-check"]
    planned = {(c.name, s.name, s.t, s.h, p) for c, _, s, _, p in rows}
    assert planned == {
        *((op, "issue", t, 64, "forward") for op, t in [("spatial_attention", 8), ("temporal_attention", 32)]),
        ("deform_conv2d", "issue", 16, 64, "forward"),
        ("sst_attention", "issue", 8, 64, "forward"),
        ("temporal_attention", "L0", 32, 320, "forward+backward"),
    }
    assert {i.name for c, i, *_ in rows if c.name == "sst_attention"} >= {"ours:triton", "ours:cuda", "stock"}
