"""How many CPU threads a command's torch computes with, and a warning when the machine is
busier than its cores.

Every parallel region of torch (and of the ``cpu`` kernels) ends in a barrier: it finishes when
its slowest thread does. A thread that shares its core with another process waits for a
scheduler time slice (milliseconds) at each of the ~650 regions of a ``tiny-cpu`` training step,
so two threads beside one busy process run far slower than one thread (docs/threads.md, with the
measurements).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional, TextIO

from .errors import UserInputError

THREADS_HELP = (
    "CPU threads for torch (default: its choice, at most the CPUs this process may use; "
    "OMP_NUM_THREADS sets it too); on a machine shared with other work, fewer threads than cores "
    "is faster (docs/threads.md)"
)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on a command that computes on the CPU."""
    parser.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def free_cpus(load: float, usable: int, machine: int) -> int:
    """The CPUs of the ``usable`` ones left over when the machine's ``machine`` CPUs carry a
    1-minute load average of ``load`` runnable tasks of other processes; at least 1.

    Half a task counts as one: the measurements in docs/threads.md show one competing runnable
    task on one of two cores already costs a 2-thread step more than dropping to one thread."""
    return max(1, min(usable, int(machine - load + 0.5)))


def machine_load(samples: int = 5) -> Optional[float]:
    """The runnable tasks of other processes: the 1-minute load average, but no more than the
    tasks runnable at this moment besides this one (``/proc/loadavg``, the median of a few samples
    10 ms apart). The average alone still counts, for a minute, work that has just ended, such as
    the user's previous command; the instant alone would catch a passing spike. None without a
    load average (some platforms)."""
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    others = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as file:
                others.append(int(file.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):  # no /proc (macOS, BSD): the average alone
            return average
        time.sleep(0.01)
    return min(average, float(statistics.median(others)))


def busy_warning(command: str, threads: int, load: float, usable: int, machine: int) -> Optional[str]:
    """One line advising fewer threads when ``threads`` exceed the free CPUs, else None."""
    free = free_cpus(load, usable, machine)
    if threads <= free:
        return None
    return (
        f"{command}: warning: the machine looks busy (load average {load:.1f} on {machine} CPUs, "
        f"{usable} usable here): {threads} threads would wait on each other at every parallel "
        f"region; --threads {free} is likely faster (docs/threads.md)"
    )


def set_threads(
    command: str,
    requested: Optional[int],
    *,
    load: Optional[float] = None,
    usable: Optional[int] = None,
    machine: Optional[int] = None,
    stream: Optional[TextIO] = None,
) -> int:
    """Set torch's intra-op threads for ``command`` (``"stt train"``) and return how many.

    ``requested`` is ``--threads`` (None: torch's choice, capped at the usable CPUs). ``load``
    (the 1-minute load average), ``usable`` and ``machine`` (CPU counts) default to this
    machine's; tests pass their own. The busy warning goes to ``stream`` (stderr) only when the
    count was not chosen (neither ``--threads`` nor ``OMP_NUM_THREADS``) and ``STT_BUSY_WARNING``
    is not ``0`` (scripts and test suites that parse the output set it)."""
    import torch

    usable = usable_cpus() if usable is None else usable
    machine = (os.cpu_count() or usable) if machine is None else machine
    if requested is not None:
        if requested < 1:
            raise UserInputError(f"--threads must be >= 1; got {requested}")
        if requested > usable:
            raise UserInputError(
                f"--threads {requested} is more than the {usable} CPU(s) this process may use; threads "
                "beyond them only wait for each other (docs/threads.md)"
            )
        threads = requested
    else:
        threads = min(torch.get_num_threads(), usable)
    torch.set_num_threads(threads)
    if requested is None and "OMP_NUM_THREADS" not in os.environ and os.environ.get("STT_BUSY_WARNING") != "0":
        load = machine_load() if load is None else load
        if load is None:  # no load figures on this platform: nothing to judge by
            return threads
        if (line := busy_warning(command, threads, load, usable, machine)) is not None:
            print(line, file=stream or sys.stderr)
    return threads
