"""What a training run shows of itself beside ``train_log.csv``: ``train_curves.png`` (the loss
terms and the validation scores by step, redrawn at each validation and at the end) and, when
asked, TensorBoard event files in ``tensorboard/``.

Both follow the run folder's rule for a run that replaces another (``--overwrite``): nothing of
the old run is touched before the new run's first checkpoint. Until then the curves are not
drawn and the TensorBoard scalars are held in memory; at the first checkpoint the old run's
event files are removed and the held scalars written. A resumed run's TensorBoard log hides the
steps after its checkpoint (``purge_step``), as its CSV log drops their rows.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from stt_kernels.atomic_file import atomic_write

from .run_folder import RunFolder

CURVES = "train_curves.png"
TENSORBOARD = "tensorboard"
# The log's columns that are losses (drawn in the upper panel, in this order); every
# ``val_<metric>`` column goes to the lower one.
LOSS_COLUMNS = ("loss", "seg", "adv", "d_loss")
# What stt_model.metrics scores when a setting has no ground truth (COCO's convention): not a score.
UNDEFINED_SCORE = -1.0


class TensorBoardUnavailable(RuntimeError):
    """TensorBoard logging was asked for and cannot be had here; the message says how to get it."""


def require_tensorboard() -> None:
    """Raise :class:`TensorBoardUnavailable` unless ``torch.utils.tensorboard`` can write events."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TensorBoardUnavailable(
            "TensorBoard logging needs the tensorboard package, which is not installed: "
            "pip install tensorboard (or pip install 'stt-kernels[tensorboard]')"
        )
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise TensorBoardUnavailable(
            f"torch cannot use the installed tensorboard ({' '.join(str(exc).split())}); "
            "pip install --upgrade tensorboard"
        ) from None


def read_curves(log: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The series of ``log`` (a ``train_log.csv``) to draw: each loss column and each ``val_*``
    column as ``(steps, values)`` over the rows that have a value for it (a score of -1, undefined,
    counts as none)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with log.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step = int(row.get("step") or "")
            except ValueError:
                continue  # a row a kill cut short
            for column, text in row.items():
                if column is None or not text or not (column in LOSS_COLUMNS or column.startswith("val_")):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if column.startswith("val_") and value == UNDEFINED_SCORE:
                    continue
                steps, values = series.setdefault(column, ([], []))
                steps.append(step)
                values.append(value)
    return series


def _smoothed(values: list[float]) -> Any:
    """A centred running mean over about 2% of the points: one step's loss is mostly batch noise."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    width = max(1, len(data) // 50) | 1
    if width == 1:
        return data
    padded = np.pad(data, width // 2, mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def plot_curves(log: Path, out: Path) -> Path:
    """Draw ``log``'s loss terms (raw and smoothed) and validation scores by step into the PNG
    ``out``, written atomically. Needs matplotlib (``ImportError`` otherwise); pyplot and the
    global backend are left alone (an Agg canvas of its own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_curves(log)
    losses = [c for c in LOSS_COLUMNS if c in series]
    scores = sorted(c for c in series if c.startswith("val_"))
    figure = Figure(figsize=(8, 6.5 if scores else 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if scores else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    for index, column in enumerate(losses):
        steps, values = series[column]
        colour = f"C{index}"
        top.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        top.plot(steps, _smoothed(values), color=colour, linewidth=1.6, label=column)
    top.set_ylabel("training loss")
    top.set_title(f"{log.parent.name or log.parent}: {log.name}")
    if losses:
        top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    if scores:
        bottom = axes[1]
        for index, column in enumerate(scores):
            steps, values = series[column]
            bottom.plot(steps, values, marker="o", markersize=3, color=f"C{index}", label=column[len("val_") :])
        bottom.set_ylabel("validation score")
        if all(0 <= v <= 1 for column in scores for v in series[column][1]):
            bottom.set_ylim(-0.02, 1.02)  # fractions (Jaccard, DSC, AP): their whole range, run after run
        bottom.legend(loc="best", fontsize="small")
        bottom.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return atomic_write(out, lambda tmp: figure.savefig(tmp, format="png"))


class RunReport:
    """The curves and TensorBoard log of the run training into ``folder`` (rank 0's).

    ``resumed_step``: the checkpoint's step when the run continues one. ``stream`` receives the
    one line said when matplotlib is missing (then no curves are drawn).
    """

    def __init__(
        self,
        folder: RunFolder,
        tensorboard: bool = False,
        resumed_step: Optional[int] = None,
        stream: Optional[TextIO] = None,
    ):
        if tensorboard:
            require_tensorboard()
        self.folder = folder
        self.tensorboard = tensorboard
        self._stream = stream if stream is not None else sys.stderr
        self._purge_step = resumed_step + 1 if resumed_step is not None else None
        self._writer: Any = None
        self._held: list[tuple[str, float, int]] = []
        self._drawn_step: Optional[int] = None
        self._can_draw = True
        # Only the replaced run's event files go at the first checkpoint, never ones this run wrote.
        events = self.tensorboard_dir.glob("events.out.tfevents.*") if self.tensorboard_dir.is_dir() else []
        self._replaced_events = sorted(events) if folder.replacing and tensorboard else []
        # The folder is locked by this run: a temporary of the curves here is a killed run's.
        for leftover in folder.path.glob(f".{CURVES}.*.tmp"):
            leftover.unlink(missing_ok=True)

    @property
    def curves(self) -> Path:
        return self.folder.path / CURVES

    @property
    def tensorboard_dir(self) -> Path:
        return self.folder.path / TENSORBOARD

    def scalars(self, step: int, values: dict[str, float], group: str) -> None:
        """Log ``values`` at ``step`` as ``<group>/<name>`` (``train/loss``, ``val/jaccard``)."""
        if not self.tensorboard:
            return
        self._held += [(f"{group}/{name}", float(value), step) for name, value in values.items()]
        if not self.folder.replacing:
            self._write_held()

    def _write_held(self) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        for tag, value, step in self._held:
            self._writer.add_scalar(tag, value, step)
        self._held.clear()

    def published(self) -> None:
        """The run's first checkpoint replaced the old run: its event files go, the held scalars are written."""
        for path in self._replaced_events:
            path.unlink(missing_ok=True)
        self._replaced_events = []
        if self._held:
            self._write_held()

    def refresh(self, step: int) -> Optional[Path]:
        """Redraw the curves (and flush the TensorBoard log) as of ``step``; ``None`` while the
        log is not yet the folder's or when matplotlib is missing."""
        if self._writer is not None:
            self._writer.flush()
        if self.folder.replacing or not self._can_draw or self._drawn_step == step:
            return None
        if not self.folder.log.path.exists():
            return None
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self._can_draw = False
            print(
                f"stt train: matplotlib is not installed; {CURVES} is not drawn (pip install matplotlib)",
                file=self._stream,
            )
            return None
        self._drawn_step = step
        return plot_curves(self.folder.log.path, self.curves)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
