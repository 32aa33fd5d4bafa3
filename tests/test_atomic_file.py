"""stt_kernels.atomic_file: the one writer that publishes files (umask, fsync, rename, clean-up)."""

import os
import stat
import subprocess
import sys

import pytest

from stt_kernels import atomic_file
from stt_kernels.atomic_file import atomic_write, atomic_write_text


def test_the_published_file_has_the_mode_the_umask_gives(tmp_path):
    # In a child process: the umask is per process, and this one's must stay as it is.
    code = (
        "import os, stat, sys; from stt_kernels.atomic_file import atomic_write_text\n"
        "for mask in (0o022, 0o077, 0o002):\n"
        "    os.umask(mask); p = atomic_write_text(f'{sys.argv[1]}/{mask:o}.txt', 'x')\n"
        "    print(oct(stat.S_IMODE(p.stat().st_mode)))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0o644", "0o600", "0o664"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc")
def test_the_umask_is_read_without_being_changed(monkeypatch):
    # Setting the umask to read it would, for a moment, give other threads' new files none.
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask called"))
    assert atomic_file._umask() == int(subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True).stdout, 8)


def test_content_is_replaced_whole_and_the_old_one_kept_until_the_rename(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old\n")
    seen = []

    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write("new ")
            seen.append(target.read_text())  # mid-write, readers still see the old file
            handle.write("content\n")

    assert atomic_write(target, write) == target
    assert seen == ["old\n"] and target.read_text() == "new content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failing_writer_leaves_no_temporary_and_the_target_untouched(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"mine")
    temporaries = []

    def write(tmp):
        temporaries.append(tmp)
        open(tmp, "wb").write(b"half")
        raise KeyboardInterrupt  # BaseException too: Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    name = os.path.basename(temporaries[0])
    assert name.startswith(".ckpt.pt.") and name.endswith(".tmp") and os.path.dirname(temporaries[0]) == str(tmp_path)


def test_the_file_and_its_folder_are_flushed_to_disk(tmp_path, monkeypatch):
    flushed = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    atomic_write_text(tmp_path / "sub" / "a.txt", b"\x00\x01")
    assert flushed == [False, True]  # the temporary file before the rename, then the folder
    assert (tmp_path / "sub" / "a.txt").read_bytes() == b"\x00\x01"
