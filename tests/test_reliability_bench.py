"""``stt bench`` refusing options that cannot measure anything, before it measures, and
exiting non-zero when a run measured nothing."""

import pytest

from stt_kernels.bench import cli as bench_cli
from stt_kernels.bench import measure
from stt_model import cli


def _stt(argv, capsys):
    code = cli.main(["bench", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--dtypes", "int8"], "dtypes (--dtypes) must be among float32, float16, bfloat16, float64; got 'int8'"),
        (
            ["--dtypes", "float32", "complex64"],
            "dtypes (--dtypes) must be among float32, float16, bfloat16, float64; got 'complex64'",
        ),
        (["--repeats", "0"], "repeats (--repeats) must be an int >= 1; got 0"),
        (["--warmup", "-1"], "warmup (--warmup) must be an int >= 0; got -1"),
        (["--threads", "-2"], "threads (--threads) must be an int >= 1; got -2"),
        (["--threads", "0"], "threads (--threads) must be an int >= 1; got 0"),
        (["--memory-cap-mb", "0"], "memory_cap_bytes (--memory-cap-mb) must be an int >= 1; got 0"),
        (
            ["--suite", "issue-shape"],
            "suites (--suite) must be among levels, issue-shapes, issue-scale, train-step, "
            "predict-volume; got 'issue-shape'",
        ),
        (
            ["--ops", "conv3d"],
            "ops (--ops) must be among spatial_attention, temporal_attention, deform_conv2d, "
            "sst_attention, stt_unet_train_step, stt_predict_volume; got 'conv3d'",
        ),
    ],
)
def test_bad_options_are_refused_before_measuring(tmp_path, capsys, option, message):
    out = tmp_path / "bench"
    code, stdout, stderr = _stt(["--quick", "--out", str(out), *option], capsys)
    assert code == 2
    assert stderr.strip().splitlines() == [f"stt bench: error: {message}"]
    assert stdout == "" and not out.exists()


def test_out_naming_an_existing_file_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    code, stdout, stderr = _stt(["--quick", "--out", str(out)], capsys)
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"stt bench: error: out (--out) must be a directory for results.json and report.md; "
        f"{str(out)!r} is an existing file"
    ]
    assert out.read_text() == "mine\n" and stdout == ""


@pytest.fixture
def tiny_ceilings(monkeypatch):
    monkeypatch.setitem(measure.CEILING_SIZES, "cpu", ((64, 1 << 16),) * 2)  # a yardstick, not a benchmark


def _nothing_to_run(out):
    # The cuda backend declines CPU tensors and no peer is asked for: every row is skipped.
    return [
        "--quick",
        "--out",
        str(out),
        "--ops",
        "temporal_attention",
        "--backends",
        "cuda",
        "--peers",
        "--passes",
        "forward",
        "--device",
        "cpu",
        "--no-memory-subprocess",
        "--threads",
        "1",
    ]


def test_stt_bench_that_measured_nothing_exits_1(tmp_path, capsys, tiny_ceilings):
    out = tmp_path / "bench"
    code, stdout, stderr = _stt(_nothing_to_run(out), capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("stt bench: error:")]
    assert code == 1 and "results ->" not in stdout
    assert len(lines) == 1 and "nothing was measured" in lines[0] and str(out / "report.md") in lines[0]
    assert (out / "results.json").is_file()  # what was (not) run is still recorded


def test_python_m_bench_that_measured_nothing_exits_1(tmp_path, capsys, tiny_ceilings):
    code = bench_cli.main(_nothing_to_run(tmp_path / "bench"))
    captured = capsys.readouterr()
    assert code == 1 and "nothing was measured" in captured.err and captured.out == ""


def test_python_m_bench_refuses_bad_options_in_one_line(tmp_path, capsys):
    assert bench_cli.main(["--quick", "--out", str(tmp_path / "b"), "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "python -m stt_kernels.bench: error: repeats (--repeats) must be an int >= 1; got 0"
    ]


def test_a_run_that_measures_exits_0(tmp_path, capsys, tiny_ceilings):
    out = tmp_path / "bench"
    argv = _nothing_to_run(out)
    argv[argv.index("cuda")] = "reference"
    code, stdout, _ = _stt(argv, capsys)
    assert code == 0 and stdout.strip() == f"results -> {out / 'results.json'}"


def test_an_earlier_run_is_replaced_only_with_overwrite(tmp_path, capsys, tiny_ceilings):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text("earlier\n")
    (out / "mine.txt").write_text("mine\n")
    argv = _nothing_to_run(out)
    argv[argv.index("cuda")] = "reference"
    code, stdout, stderr = _stt(argv, capsys)
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == [
        f"stt bench: error: out (--out) {str(out)!r} already holds an earlier run's results.json; "
        "give another folder, or --overwrite to replace them"
    ]
    assert (out / "results.json").read_text() == "earlier\n"
    code, stdout, _ = _stt([*argv, "--overwrite"], capsys)
    assert code == 0 and (out / "results.json").read_text() != "earlier\n"
    assert (out / "mine.txt").read_text() == "mine\n"
