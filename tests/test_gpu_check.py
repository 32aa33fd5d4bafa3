"""``make gpu-check`` in its dry mode (what CI can run): every GPU step skips with its reason, the
summary names each step, and nothing is left beside the evidence folder."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
STEPS = ("build", "report", "gpu tests", "probe", "sanitizer", "bench")


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
    assert [name for name, _, _ in steps] == list(STEPS)
    assert sum(deadline for _, deadline, _ in steps) <= gpu_check.TOTAL_SECONDS <= 9 * 60


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
