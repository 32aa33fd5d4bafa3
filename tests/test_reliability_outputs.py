"""Outputs never destroy anything: datasets added to existing files
copy-on-write, refusals before any work, full and read-only disks, Ctrl-C/SIGTERM, kill -9 at
random moments, and leftovers of killed runs cleaned up by the next run."""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from test_cli import _train_tiny

from stt_model import segment
from stt_model.cli import main
from stt_model.data import create_output, synthetic_volume
from stt_model.data.outputs import OutputError, check_outputs, output_target, remove_leftovers

# The same threads as this process: the kill test compares a subprocess's output with its own.
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    volume = synthetic_volume((12, 48, 48), seed=3)
    with h5py.File(folder / "train.h5", "w") as f:
        f["image"], f["label"] = volume.image, volume.labels
    return _train_tiny(folder, folder / "train.h5") / "last.pt"


def _volume_file(path, shape=(8, 40, 40), seed=5):
    """An input file with ``image``, ``label`` and an attribute, as a user's file would have."""
    volume = synthetic_volume(shape, seed=seed)
    if path.suffix == ".zarr":
        root = zarr.open_group(str(path), mode="w")
        root.create_array("image", data=volume.image, chunks=(4, 40, 40))
        root.create_array("label", data=volume.labels, chunks=(4, 40, 40))
    else:
        with h5py.File(path, "w") as f:
            f["image"], f["label"] = volume.image, volume.labels
            f.attrs["resolution"] = [30, 8, 8]
    return volume


def _read(spec):
    path, name = str(spec).rsplit(":", 1)
    if path.endswith(".zarr"):
        return zarr.open_group(path, mode="r")[name][:]
    with h5py.File(path, "r") as f:
        return f[name][:]


def _snapshot(folder):
    """Every entry under ``folder`` with a hash of its bytes: anything changed shows."""
    return {
        str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(Path(folder).rglob("*"))
    }


def _predict(checkpoint, image, out, *extra):
    return main(
        ["predict", "--checkpoint", str(checkpoint), "--image", str(image), "--out", str(out), *map(str, extra)]
    )


def _one_line_error(capsys, *needles):
    """The run's last stderr line is its error, and nothing else but progress lines came before."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert err.startswith("stt predict: error:"), lines
    assert all(line.startswith("predict ") for line in lines[:-1]), lines
    for needle in needles:
        assert needle in err, err
    return err


@contextlib.contextmanager
def _tmpfs(folder, size):
    """A small tmpfs at ``folder`` (a real full disk), or a skip saying why there is none."""
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); the full-disk "
            f"and read-only cases need one (root, or CAP_SYS_ADMIN)"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# --- 1. a dataset is added to an existing file, the rest kept bit for bit ---------------------


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_output_into_the_input_file_adds_a_dataset(tmp_path, checkpoint, suffix):
    vol = tmp_path / f"x{suffix}"
    volume = _volume_file(vol)
    assert _predict(checkpoint, f"{vol}:image", f"{vol}:pred") == 0
    np.testing.assert_array_equal(_read(f"{vol}:image"), volume.image)
    np.testing.assert_array_equal(_read(f"{vol}:label"), volume.labels)
    assert _read(f"{vol}:pred").shape == (2, *volume.image.shape)
    if suffix == ".h5":
        with h5py.File(vol) as f:
            assert sorted(f) == ["image", "label", "pred"] and list(f.attrs["resolution"]) == [30, 8, 8]
            assert f["label"].dtype == volume.labels.dtype
    else:
        assert sorted(zarr.open_group(str(vol), mode="r").array_keys()) == ["image", "label", "pred"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [vol.name], "no temporaries left"


def test_out_and_instances_in_one_file_keep_both(tmp_path, checkpoint, capsys):
    image = tmp_path / "x.h5"
    _volume_file(image)
    both = tmp_path / "b.h5"
    with h5py.File(both, "w") as f:
        f["notes"] = np.arange(5)
    assert _predict(checkpoint, f"{image}:image", f"{both}:probs", "--instances", f"{both}:inst") == 0
    with h5py.File(both) as f:
        assert sorted(f) == ["inst", "notes", "probs"]
        assert f["probs"].shape == (2, 8, 40, 40) and f["inst"].shape == (8, 40, 40)
        np.testing.assert_array_equal(f["notes"][:], np.arange(5))
    # The instances decode the probabilities that were kept beside them.
    capsys.readouterr()
    assert main(["evaluate", "--pred", f"{both}:inst", "--gt", f"{image}:label", "--json"]) == 0


def test_overwrite_replaces_only_the_named_dataset(tmp_path, checkpoint, capsys):
    vol = tmp_path / "x.h5"
    volume = _volume_file(vol)
    with h5py.File(vol, "a") as f:
        f["pred"] = np.full((2, 8, 40, 40), 7, np.uint8)
    before = _snapshot(tmp_path)
    assert _predict(checkpoint, f"{vol}:image", f"{vol}:pred") == 2
    _one_line_error(capsys, "already holds dataset 'pred'", "--overwrite")
    assert _snapshot(tmp_path) == before
    assert _predict(checkpoint, f"{vol}:image", f"{vol}:pred", "--overwrite") == 0
    assert not (_read(f"{vol}:pred") == 7).all()
    np.testing.assert_array_equal(_read(f"{vol}:image"), volume.image)
    np.testing.assert_array_equal(_read(f"{vol}:label"), volume.labels)
    whole = tmp_path / "old.h5"
    with h5py.File(whole, "w") as f:
        f["main"] = np.zeros(3)
    capsys.readouterr()
    assert _predict(checkpoint, f"{vol}:image", whole) == 2
    _one_line_error(capsys, "old.h5 already exists", "--overwrite")
    assert _predict(checkpoint, f"{vol}:image", whole, "--overwrite") == 0
    assert _read(f"{whole}:main").shape == (2, 8, 40, 40)


def test_zarr_array_replaced_in_place_of_the_old_one(tmp_path):
    store = tmp_path / "s.zarr"
    _volume_file(store)
    with create_output(f"{store}:image", (8, 40, 40), np.uint8) as out:
        out[:] = 9
    assert (_read(f"{store}:image") == 9).all()
    assert sorted(zarr.open_group(str(store), mode="r").array_keys()) == ["image", "label"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert not [p for p in store.iterdir() if p.name.startswith(".")], "no backup left in the store"
    with pytest.raises(OutputError, match="already exists; --overwrite replaces it"):
        create_output(store, (2, 2, 2), overwrite=False)
    with create_output(store, (2, 2, 2), overwrite=True) as out:  # the whole store, as told
        out[:] = 1
    assert sorted(zarr.open_group(str(store), mode="r").array_keys()) == ["main"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


# --- 2. refusals before any work: one line, exit 2, nothing touched ---------------------------


@pytest.mark.parametrize(
    "out, extra, message",
    [
        ("{vol}:image", [], "is the input dataset itself"),
        ("{vol}", [], "would replace the file --image reads"),
        ("{vol}", ["--overwrite"], "would replace the file --image reads"),
        ("{tmp}/b.h5", ["--instances", "{tmp}/b.h5"], "would overwrite each other"),
        ("{tmp}/b.h5:p", ["--instances", "{tmp}/b.h5:p"], "would overwrite each other"),
        ("{tmp}/b.h5:p", ["--instances", "{tmp}/b.h5"], "would overwrite each other"),
        ("{tmp}/folder.h5", ["--overwrite"], "is a folder, not an HDF5 file"),
        ("{tmp}/folder.zarr", ["--overwrite"], "is a folder that is not a zarr store"),
        ("{tmp}/notes.h5", ["--overwrite"], "is not an HDF5 file"),
        ("{tmp}/notes.h5:probs", ["--overwrite"], "is not an HDF5 file"),
        ("{tmp}/old.h5", [], "old.h5 already exists"),
        ("{tmp}/old.h5:main", [], "already holds dataset 'main'"),
        ("{tmp}/old.h5:grp", ["--overwrite"], "is a group"),
        ("{tmp}/p.h5", ["--instances", "{tmp}/old.h5"], "--instances {tmp}/old.h5 already exists"),
        ("{tmp}/p.h5", ["--instances", "{tmp}/nowhere/i.h5"], "no such folder for the output"),
        ("{tmp}/p.tif", [], "outputs are written as HDF5"),
        ("{tmp}/p.h5", ["--device", "tpu"], "--device 'tpu' is not a device"),
        ("{tmp}/p.h5", ["--block", "0", "8", "8"], "--block must be three positive sizes"),
        ("{tmp}/p.h5", ["--overlap", "1"], "--overlap must be a fraction in [0, 1)"),
        ("{tmp}/p.h5", ["--overlap", "nan"], "--overlap must be a fraction"),
        ("{tmp}/p.h5", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_refused_before_any_work(tmp_path, capsys, out, extra, message):
    vol = tmp_path / "x.h5"
    _volume_file(vol)
    (tmp_path / "folder.h5").mkdir()
    (tmp_path / "folder.h5" / "keep.txt").write_text("precious")
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "keep.txt").write_text("precious")
    (tmp_path / "notes.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f["main"] = np.arange(4)
        f.create_group("grp")
    before = _snapshot(tmp_path)
    fill = dict(vol=vol, tmp=tmp_path)
    # A checkpoint that does not exist: the refusal must come before it is even read.
    code = main(
        [
            "predict",
            "--checkpoint",
            str(tmp_path / "never-read.pt"),
            "--image",
            f"{vol}:image",
            "--out",
            out.format(**fill),
            *[a.format(**fill) for a in extra],
        ]
    )
    assert code == 2
    _one_line_error(capsys, message.format(**fill))
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible, so --device cuda is valid here")
def test_device_cuda_without_a_gpu(tmp_path, capsys):
    vol = tmp_path / "x.h5"
    _volume_file(vol)
    assert _predict(tmp_path / "never-read.pt", f"{vol}:image", tmp_path / "p.h5", "--device", "cuda") == 2
    _one_line_error(capsys, "--device cuda: no CUDA/ROCm GPU is visible here")


def test_empty_volume_is_a_clear_message(tmp_path, capsys):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("image", shape=(0, 40, 40), dtype=np.uint8)
    assert _predict(tmp_path / "never-read.pt", f"{tmp_path}/empty.h5:image", tmp_path / "p.h5") == 2
    _one_line_error(capsys, "empty.h5:image is empty (shape (0, 40, 40))")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.h5"]


def test_check_outputs_allows_distinct_datasets_and_names_the_argument(tmp_path):
    targets = check_outputs({"--out": f"{tmp_path}/b.h5:probs", "--instances": f"{tmp_path}/b.h5:inst"})
    assert [t.dataset for t in targets.values()] == ["probs", "inst"]
    with pytest.raises(OutputError, match=r"^--instances .* would overwrite each other"):
        check_outputs({"--instances": f"{tmp_path}/b.h5", "--out": f"{tmp_path}/b.h5"})


# --- 3. disks that cannot take the output -----------------------------------------------------


def test_full_disk_refused_before_the_first_window(tmp_path, checkpoint, capsys, monkeypatch):
    vol = tmp_path / "x.h5"
    _volume_file(vol, shape=(16, 96, 96))
    monkeypatch.setattr(segment, "probabilities", _no_prediction)
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        # 2 x 16 x 96 x 96 uint8 fit the disk, not with the room the estimate keeps.
        assert _predict(checkpoint, f"{vol}:image", disk / "p.h5") == 2
        _one_line_error(capsys, "--out need about", "are free in")
        assert _predict(checkpoint, f"{vol}:image", tmp_path / "p.h5", "--instances", disk / "i.h5") == 2
        _one_line_error(capsys, "--instances need about")
        assert list(disk.iterdir()) == [] and not (tmp_path / "p.h5").exists()


def test_copy_on_write_counts_the_copy(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(segment, "probabilities", _no_prediction)
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        vol = disk / "x.h5"
        with h5py.File(vol, "w") as f:
            f["image"] = np.random.default_rng(0).integers(0, 255, (8, 40, 40), np.uint8)
            f["big"] = np.random.default_rng(1).integers(0, 255, 2_500_000, np.uint8)  # 2.4 MiB to copy
        before = _snapshot(disk)
        assert _predict(checkpoint, f"{vol}:image", f"{vol}:pred") == 2
        _one_line_error(capsys, "--out need about")
        assert _snapshot(disk) == before


def _no_prediction(*args, **kwargs):
    raise AssertionError("a window ran although the output had to be refused first")


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_disk_filling_up_while_writing(tmp_path, checkpoint, capsys, monkeypatch, suffix):
    """The disk fills after the free-space check (another process): one line, nothing left."""
    from stt_model.data import outputs

    vol = tmp_path / "x.h5"
    _volume_file(vol, shape=(16, 96, 96))
    monkeypatch.setattr(outputs, "check_space", lambda plans: None)
    with _tmpfs(tmp_path / "disk", "128k") as disk:
        assert _predict(checkpoint, f"{vol}:image", disk / f"p{suffix}", "--block", "4", "32", "32") == 2
        _one_line_error(capsys, "No space left on device", f"p{suffix}")
        assert list(disk.iterdir()) == []


def test_read_only_folder(tmp_path, checkpoint, capsys):
    vol = tmp_path / "x.h5"
    _volume_file(vol)
    with _tmpfs(tmp_path / "ro", "1m") as ro:
        inside = ro / "y.h5"
        _volume_file(inside)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = _snapshot(ro)
        assert _predict(checkpoint, f"{vol}:image", ro / "p.h5") == 2
        _one_line_error(capsys, "--out cannot write in", "Read-only file system")
        assert _predict(checkpoint, f"{inside}:image", f"{inside}:pred") == 2
        _one_line_error(capsys, "--out", "y.h5 is read-only")
        assert _predict(checkpoint, f"{vol}:image", tmp_path / "p.h5", "--instances", ro / "i.h5") == 2
        _one_line_error(capsys, "--instances cannot write in")
        assert _snapshot(ro) == before and not (tmp_path / "p.h5").exists()


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway; the read-only tmpfs case covers this"
)
def test_folder_without_write_permission(tmp_path, checkpoint, capsys):
    vol = tmp_path / "x.h5"
    _volume_file(vol)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert _predict(checkpoint, f"{vol}:image", locked / "p.h5") == 2
        _one_line_error(capsys, "cannot write in", "Permission denied")
    finally:
        locked.chmod(0o755)


# --- 6. leftovers of killed runs --------------------------------------------------------------


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_leftovers_of_dead_runs_removed_live_ones_kept(tmp_path, checkpoint, capsys):
    vol = tmp_path / "x.h5"
    _volume_file(vol)
    dead, live = _dead_pid(), subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / f".p.h5.tmp-{dead}").write_bytes(b"x" * 1000)
        (tmp_path / f".p.h5.tmp-{live.pid}").write_bytes(b"y")
        (tmp_path / f".other.h5.tmp-{dead}").write_bytes(b"z")  # another output's: not this run's business
        assert _predict(checkpoint, f"{vol}:image", tmp_path / "p.h5") == 0
        err = capsys.readouterr().err
        assert f"removed {tmp_path}/.p.h5.tmp-{dead}" in err and f"tmp-{live.pid}" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f".other.h5.tmp-{dead}", f".p.h5.tmp-{live.pid}", "p.h5", "x.h5"]
        )
    finally:
        live.kill()
        live.wait()


def test_zarr_backup_of_a_killed_replacement_is_put_back(tmp_path):
    store = tmp_path / "s.zarr"
    volume = _volume_file(store)
    dead = _dead_pid()
    os.rename(store / "label", store / f".label.old-{dead}")  # killed between the two renames
    (tmp_path / f".s.zarr.tmp-{dead}").mkdir()
    done = remove_leftovers(output_target(f"{store}:label"))
    assert done == [f"removed {tmp_path}/.s.zarr.tmp-{dead}", f"restored {store}/label from .label.old-{dead}"]
    np.testing.assert_array_equal(_read(f"{store}:label"), volume.labels)


# --- signals and kill -9 in a real process ----------------------------------------------------


def _sigint_as_in_a_terminal() -> None:
    # A background job (`cmd &` without job control, nohup) starts with SIGINT ignored, and
    # stt respects that; the test's process must get Ctrl-C as a foreground one does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(checkpoint, image, out, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stt_model.cli",
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--image",
            str(image),
            "--out",
            str(out),
            *extra,
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )


def _wait_for(path, process, timeout=120.0):
    """Seconds until ``path`` exists (the run's temporary), polling; fails if the run ends first."""
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared: {process.communicate()}"
        assert time.monotonic() - start < timeout
        time.sleep(0.005)
    return time.monotonic() - start


def _fixture_with_old_prediction(folder):
    vol = folder / "x.h5"
    volume = _volume_file(vol, shape=(16, 96, 96))
    old = np.random.default_rng(7).integers(0, 255, (2, 16, 96, 96), np.uint8)
    with h5py.File(vol, "a") as f:
        f["pred"] = old
    return vol, volume, old


def _assert_intact(vol, volume, allowed):
    with h5py.File(vol, "r") as f:
        assert sorted(f) == ["image", "label", "pred"]
        np.testing.assert_array_equal(f["image"][:], volume.image)
        np.testing.assert_array_equal(f["label"][:], volume.labels)
        pred = f["pred"][:]
    assert any(np.array_equal(pred, a) for a in allowed), "pred is neither the old nor the complete new one"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_removes_the_temporary(tmp_path, checkpoint, signum, code):
    vol, volume, old = _fixture_with_old_prediction(tmp_path)
    run = _spawn(checkpoint, f"{vol}:image", f"{vol}:pred", "--overwrite", "--tta")
    _wait_for(tmp_path / f".x.h5.tmp-{run.pid}", run)
    time.sleep(0.3)  # into the windows
    run.send_signal(signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == code, err
    assert "stt predict: interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]
    _assert_intact(vol, volume, [old])


def test_kill_9_at_random_moments_loses_nothing(tmp_path, checkpoint, capsys):
    vol, volume, old = _fixture_with_old_prediction(tmp_path)
    reference = tmp_path / "ref.h5"
    started = time.monotonic()
    assert _predict(checkpoint, f"{vol}:image", reference, "--tta") == 0
    duration = time.monotonic() - started  # about how long the temporary lives
    new = _read(f"{reference}:main")
    reference.unlink()
    rng = np.random.default_rng(15)
    # -1: before the temporary exists (start-up); random moments may fall after a run finished
    # (under load), so the last kill lands just as the temporary appears, leaving one behind.
    moments = [-1.0, *rng.uniform(0, duration, 2), 0.0]
    leftovers = 0
    for moment in moments:
        run = _spawn(checkpoint, f"{vol}:image", f"{vol}:pred", "--overwrite", "--tta")
        if moment < 0:
            time.sleep(1.0)
        else:
            _wait_for(tmp_path / f".x.h5.tmp-{run.pid}", run)
            time.sleep(moment)
        run.kill()
        run.communicate(timeout=60)
        _assert_intact(vol, volume, [old, new])
        leftovers += (tmp_path / f".x.h5.tmp-{run.pid}").exists()
    assert leftovers >= 1, "some kills should land while the temporary exists"
    # Each run removed the leftovers of the runs killed before it; the last ones are still here.
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "x.h5")
    assert left and all(name.startswith(".x.h5.tmp-") for name in left)
    capsys.readouterr()
    assert _predict(checkpoint, f"{vol}:image", f"{vol}:pred", "--overwrite", "--tta") == 0
    err = capsys.readouterr().err
    assert "left by killed runs" in err and all(f"removed {tmp_path / name}" in err for name in left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]
    _assert_intact(vol, volume, [new])


# --- stt demo's output folder -----------------------------------------------------------------


def test_demo_refuses_a_file_and_an_earlier_demo_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "file"), "--minutes", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stt demo: error: --out") and "is not a folder" in err and "\n" not in err
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text("{}")
    (earlier / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    assert main(["demo", "--out", str(earlier), "--minutes", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a demo's outputs (metrics.json)" in err and "--overwrite" in err
    assert _snapshot(tmp_path) == before


def test_demo_folder_checks(tmp_path):
    from stt_model.demo import check_demo_folder

    check_demo_folder(tmp_path / "new" / "out")  # created later, under a writable folder
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "notes.txt").write_text("mine")
    check_demo_folder(tmp_path / "others")  # other files are no demo outputs
    (tmp_path / "others" / "run").mkdir()
    with pytest.raises(OutputError, match=r"already holds a demo's outputs \(run\)"):
        check_demo_folder(tmp_path / "others")
    check_demo_folder(tmp_path / "others", overwrite=True)
    (tmp_path / "others" / "probabilities.h5").mkdir()
    with pytest.raises(OutputError, match="probabilities.h5 is a folder, not a demo output"):
        check_demo_folder(tmp_path / "others", overwrite=True)


def test_ranks_parts_merge_into_a_dataset_of_an_existing_file(tmp_path):
    from stt_model import parallel_predict as ranks
    from stt_model.infer import InferOptions, rank_blocks

    vol = tmp_path / "x.h5"
    volume = _volume_file(vol)
    shape, window = (2, 8, 40, 40), (4, 16, 16)
    options = dict(overlap=0.25, batch_size=1, flip_tta=False, block=(4, 16, 16))
    for rank in range(2):  # each rank fills its own blocks with its rank + 1
        with create_output(ranks.part_spec(f"{vol}:pred", rank, 2), shape, np.uint8) as part:
            for block in rank_blocks(shape[1:], InferOptions(window=window, rank=rank, world=2, **options)):
                part[(slice(None), *block)] = rank + 1
    ranks.merge(f"{vol}:pred", shape, window, options, 2, overwrite=False)
    pred = _read(f"{vol}:pred")
    assert set(np.unique(pred)) == {1, 2}, "every voxel from one rank or the other"
    np.testing.assert_array_equal(_read(f"{vol}:image"), volume.image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"], "parts deleted"


def test_ranks_parts_merge_bridges_blank_slices(tmp_path):
    from stt_model import parallel_predict as ranks
    from stt_model.infer import InferOptions, rank_blocks

    shape, window = (1, 8, 32, 32), (4, 16, 16)
    image = np.random.default_rng(0).integers(0, 255, shape[1:], dtype=np.uint8)
    image[5] = 77  # a missing section
    options = dict(overlap=0.25, batch_size=1, block=(4, 16, 16), bridge_blank=True)
    spec = f"{tmp_path / 'p.h5'}"

    def parts() -> None:  # probabilities 10 * z: bridged, slice 5 becomes the mean of slices 4 and 6
        for rank in range(2):
            with create_output(ranks.part_spec(spec, rank, 2), shape, np.uint8) as part:
                for block in rank_blocks(shape[1:], InferOptions(window=window, rank=rank, world=2, **options)):
                    z = np.arange(block[0].start, block[0].stop, dtype=np.uint8)[:, None, None]
                    part[(slice(None), *block)] = np.broadcast_to(10 * z, part[(slice(None), *block)].shape[1:])

    parts()
    assert ranks.merge(spec, shape, window, options, 2, image=image) == [5]
    pred = _read(f"{spec}:main")[0]
    assert (pred[5] == 50).all() and (pred[4] == 40).all() and (pred[6] == 60).all()
    parts()
    assert ranks.merge(spec, shape, window, {**options, "bridge_blank": False}, 2, image=image) == []
    assert (_read(f"{spec}:main")[0] == 10 * np.arange(8, dtype=np.uint8)[:, None, None]).all()


def test_demo_removes_leftovers_of_a_killed_demo(tmp_path, monkeypatch, capsys):
    from stt_model import demo

    dead = _dead_pid()
    (tmp_path / f".probabilities.h5.tmp-{dead}").write_bytes(b"x")
    monkeypatch.setattr(demo, "_volumes", _no_demo_work)  # the first step after the checks
    with pytest.raises(AssertionError, match="stop here"):
        demo.run_demo(tmp_path)
    assert f"removed {tmp_path}/.probabilities.h5.tmp-{dead}" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def _no_demo_work(*args, **kwargs):
    raise AssertionError("stop here")
