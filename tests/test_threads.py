"""``--threads`` and the busy-machine warning of ``stt train`` / ``stt predict`` (stt_model/threads.py),
the load figure injected; and docs/threads/measure.py run dry."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stt_model import threads as th
from stt_model.cli import main
from stt_model.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "load, usable, machine, free",
    [
        (0.0, 2, 2, 2),
        (0.4, 2, 2, 2),  # less than half a task: both cores
        (0.6, 2, 2, 1),
        (1.0, 2, 2, 1),
        (7.5, 2, 2, 1),  # never below one
        (3.0, 2, 16, 2),  # a big machine's load leaves this process's two CPUs free
        (15.0, 4, 16, 1),
    ],
)
def test_free_cpus(load, usable, machine, free):
    assert th.free_cpus(load, usable, machine) == free


def test_busy_warning_names_the_threads_to_use():
    assert th.busy_warning("stt train", 2, 0.2, 2, 2) is None
    assert th.busy_warning("stt train", 1, 5.0, 2, 2) is None  # one thread is already the least
    line = th.busy_warning("stt train", 2, 1.3, 2, 2)
    assert line.startswith("stt train: warning: the machine looks busy (load average 1.3 on 2 CPUs")
    assert "--threads 1 is likely faster" in line and "\n" not in line


def test_set_threads_default_warns_on_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("STT_BUSY_WARNING", "1")
    torch.set_num_threads(2)
    out = io.StringIO()
    assert th.set_threads("stt train", None, load=1.0, usable=2, machine=2, stream=out) == 2
    assert torch.get_num_threads() == 2
    assert "--threads 1 is likely faster" in out.getvalue()
    quiet = io.StringIO()
    th.set_threads("stt train", None, load=0.1, usable=2, machine=2, stream=quiet)
    assert quiet.getvalue() == ""


def test_default_is_capped_at_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("STT_BUSY_WARNING", "1")
    torch.set_num_threads(2)
    assert th.set_threads("stt train", None, load=0.0, usable=1, machine=2, stream=io.StringIO()) == 1
    assert torch.get_num_threads() == 1


def test_a_chosen_count_is_kept_without_warning(monkeypatch):
    out = io.StringIO()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("STT_BUSY_WARNING", "1")
    assert th.set_threads("stt train", 2, load=6.0, usable=2, machine=2, stream=out) == 2
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    th.set_threads("stt train", None, load=6.0, usable=2, machine=2, stream=out)
    assert out.getvalue() == ""
    assert th.set_threads("stt train", 1, load=0.0, usable=2, machine=2, stream=out) == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad, message", [(0, "--threads must be >= 1; got 0"), (3, "--threads 3 is more than the 2")])
def test_bad_thread_counts_are_refused(bad, message):
    with pytest.raises(UserInputError, match=message):
        th.set_threads("stt train", bad, load=0.0, usable=2, machine=2)


def test_cli_refuses_bad_threads_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--image", "x.h5:image", "--label", "x.h5:label", "--out", str(out), "--threads", "0"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err == "stt train: error: --threads must be >= 1; got 0\n"
    too_many = str(th.usable_cpus() + 1)
    code = main(
        [
            "predict",
            "--checkpoint",
            "none.pt",
            "--image",
            "x.h5",
            "--out",
            str(tmp_path / "p.h5"),
            "--threads",
            too_many,
        ]
    )
    assert code == 2 and not (tmp_path / "p.h5").exists()
    assert capsys.readouterr().err.startswith(f"stt predict: error: --threads {too_many} is more than the ")


def test_cli_warns_with_the_machines_load(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("STT_BUSY_WARNING", "1")
    monkeypatch.setattr(th, "machine_load", lambda: 3.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    # The checkpoint is missing: the command stops after setting up its threads.
    code = main(
        ["predict", "--checkpoint", str(tmp_path / "none.pt"), "--image", "x.h5", "--out", str(tmp_path / "p.h5")]
    )
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "stt predict: warning: the machine looks busy (load average 3.0 on 2 CPUs, 2 usable here): 2 threads "
        "would wait on each other at every parallel region; --threads 1 is likely faster (docs/threads.md)"
    )
    assert err[1].startswith("stt predict: error:")


TINY_YAML = """base: tiny-cpu
model: {channels: [4, 8], heads: [1, 2], sst_levels: [false, true]}
data: {patch: [4, 32, 32], augment: false}
loss: {discriminator_channels: 4}
train: {batch_size: 1}
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the benchmark runs on two CPUs")
def test_benchmark_script_dry(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    cores = [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]
    variants = ["2 threads + hog, PASSIVE"]  # the hog, an environment and 2 threads: one run (a process start)
    command = [sys.executable, str(ROOT / "docs" / "threads" / "measure.py"), f"--config={config}", "--seconds=0.05"]
    command += ["--warmup=0", "--repeats=1", "--cores", *cores, "--only", *variants]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip("| ") for r in rows] == ["variant", *variants]
    assert float(rows[1][1]) > 0 and rows[1][2].strip(" |") == "1.00"
    assert "load average" in done.stdout.splitlines()[0]


def test_benchmark_script_refuses_cpus_it_may_not_use():
    bad = str(max(os.sched_getaffinity(0)) + 1)
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "threads" / "measure.py"), "--cores", "0", bad],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--cores must be two different CPUs this process may use" in done.stderr


def test_stt_busy_warning_0_silences_it(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("STT_BUSY_WARNING", "0")
    torch.set_num_threads(2)
    out = io.StringIO()
    assert th.set_threads("stt train", None, load=6.0, usable=2, machine=2, stream=out) == 2
    assert out.getvalue() == ""


def test_machine_load_is_the_average_bounded_by_what_runs_now(monkeypatch, tmp_path):
    """A load average left by work that has ended (nothing else runnable now) is not a busy machine."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    real_open = open

    def proc_loadavg(running):
        def fake_open(path, *args, **kwargs):
            return io.StringIO(f"1.70 1.00 0.50 {running}/300 4242\n") if path == "/proc/loadavg" else real_open(path)

        return fake_open

    monkeypatch.setattr("builtins.open", proc_loadavg(1))  # only this process runs
    assert th.machine_load(samples=3) == 0.0
    monkeypatch.setattr("builtins.open", proc_loadavg(3))  # two others run now
    assert th.machine_load(samples=3) == 1.7
