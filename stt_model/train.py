"""Training STT-UNET: Adam, warm-up + step LR schedule, AMP on GPU, gradient clipping, the
FG-BG adversarial game of Eq. 4, atomic resumable checkpoints and DDP through ``torchrun``.

The trainer draws batches from a :class:`BatchSource` (image ``(B, 1, T, H, W)`` float32,
targets ``(B, out, T, H, W)`` in {0, 1}, as a pair or as ``{"image", "target"}`` like
:class:`stt_model.data.PatchSampler` yields); its ``state_dict`` goes into the checkpoint so
a resumed run sees the same batches. Under ``torchrun`` every rank draws its own batches (the
source is built per rank) and only rank 0 writes logs and checkpoints, into a run folder it
claims first (:class:`stt_model.run_folder.RunFolder`: one run per folder, locked), with
``train_curves.png`` beside the log and, with ``TrainOptions.tensorboard``, TensorBoard events
(:mod:`stt_model.train_report`).

Nothing non-finite is saved: a loss term or gradient norm that goes NaN/Inf stops the run
with :class:`NonFiniteError` before the optimiser takes the step. Ctrl-C and SIGTERM are held
until the step in flight ends, a final checkpoint is written and the interrupt goes on.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Union

import torch
import torch.distributed as dist
from torch import nn

from stt_kernels.backend import BACKENDS, resolve
from stt_kernels.nn.attention import module_backend

from .build import build_discriminator, build_model
from .checkpoint import checkpoint_config, load_checkpoint, load_model_weights
from .config import Config
from .errors import UserInputError
from .interrupts import HeldInterrupts
from .losses import discriminator_loss, generator_loss, segmentation_loss, straight_through_binary
from .progress import Progress
from .run_folder import RunFolder, RunLog
from .train_report import RunReport, require_tensorboard
from .weight_average import WeightAverage


class BatchSource(Protocol):
    def __iter__(self) -> Iterator[Union[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Validator = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainOptions:
    out_dir: Path
    resume: Optional[Path] = None
    overwrite: bool = False  # replace a run already in out_dir (at the first new checkpoint)
    time_budget: Optional[float] = None  # seconds; stop (and checkpoint) when exceeded
    max_steps: Optional[int] = None  # stop after this step even if iterations is larger
    device: Optional[str] = None  # default: cuda if available, else cpu
    validate: Optional[Validator] = None  # called every train.val_every steps
    progress: bool = True
    folder: Optional[RunFolder] = None  # out_dir, claimed already (the CLI does before loading data)
    compile: bool = False  # run the network's forward/backward through torch.compile (inductor)
    tensorboard: bool = False  # also log scalars into out_dir/tensorboard (needs tensorboard)


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # total loss of every step run here
    checkpoint: Optional[Path] = None
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteError(FloatingPointError):
    """A loss term, the gradient norm or the weights went NaN/Inf; the message names the step,
    the term and what was (not) saved."""


# What --resume needs besides the weights; with the FG-BG loss also the discriminator's.
RESUME_KEYS = ("step", "optimizer", "scheduler", "rng", "source")
RESUME_KEYS_ADVERSARIAL = ("discriminator", "optimizer_d", "scheduler_d")


def check_resumable(state: dict[str, Any], path: Union[str, Path], adversarial: Optional[bool] = None) -> None:
    """Raise ``ValueError`` saying what is missing if checkpoint ``state`` cannot be resumed by a
    run with (``adversarial``; default: as the checkpoint's config says) or without the FG-BG loss."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise UserInputError(
            f"{path} cannot be resumed: it has no {', '.join(missing)} (a weights-only "
            "checkpoint?); --resume needs a last.pt written by stt train"
        )
    if adversarial is None:
        adversarial = checkpoint_config(state).loss.adversarial_weight > 0
    if adversarial:
        if "discriminator" not in state:
            raise UserInputError(f"{path} has no discriminator state; it was trained without the FG-BG loss")
        missing = [k for k in RESUME_KEYS_ADVERSARIAL if k not in state]
        if missing:
            raise UserInputError(f"{path} cannot be resumed: it has a discriminator but no {', '.join(missing)}")


def training_device(name: Optional[str]) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``) checked to be usable here; default: cuda if a GPU
    is visible, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device must be cpu or cuda[:index]; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {name!r} is not available: no GPU is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"device {name!r} is not available: {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UserInputError(f"device must be cpu or cuda[:index]; got {name!r}")
    return device


def check_backend(config: Config, device: torch.device) -> None:
    """Raise ``BackendUnavailableError`` (the backend report's reason) now, not at the first
    step, if the model's SST ops cannot run their configured backend on ``device``."""
    if any(config.model.sst_levels):
        resolve(
            module_backend(config.model.backend),
            device,
            "the model's SST attention (model.backend)",
            frozenset(BACKENDS),
        )


def lr_factor(step: int, warmup: int, milestones: list[int], gamma: float) -> float:
    """Linear warm-up to the base LR over ``warmup`` steps, then ``gamma`` at each milestone."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * gamma ** sum(step >= m for m in milestones)


def _distributed() -> bool:
    return dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # weights_only loading returns lists where random.getstate() gave tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


class Trainer:
    """Owns the networks, optimisers and schedule of one run; :meth:`run` trains."""

    def __init__(self, config: Config, source: BatchSource, options: TrainOptions):
        self.cfg, self.source, self.options = config, source, options
        if options.tensorboard:
            require_tensorboard()
        self.device = training_device(options.device)
        if _distributed() and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        check_backend(config, self.device)
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        self.model = build_model(config).to(self.device)
        self.adversarial = config.loss.adversarial_weight > 0
        self.disc = build_discriminator(config).to(self.device) if self.adversarial else None
        t = config.train
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=t.lr)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t.lr) if self.disc is not None else None
        schedule = lambda step: lr_factor(step, t.warmup, t.lr_steps, t.lr_gamma)  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, schedule) if self.opt_d else None
        # Inference's network: the average when train.ema_decay is set (checkpoints store it as
        # "model", the weights every reader loads), else the trained network itself.
        self.average = WeightAverage(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.step = 0
        self._saved: Optional[tuple[Path, int]] = None  # the checkpoint this run last wrote or resumed, its step
        self._report: Optional[RunReport] = None  # rank 0's, while run() runs
        if options.resume is not None:
            self._resume(options.resume)
        self.net, self.disc_net = self.model, self.disc
        if dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.disc is not None:
                self.disc_net = nn.parallel.DistributedDataParallel(self.disc, device_ids=ids)
        if options.compile:
            # Only the training step's network: checkpoints, validation and resume use self.model.
            self.net = torch.compile(self.net)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _amp_dtype(self) -> Optional[torch.dtype]:
        if not self.cfg.train.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.inference_model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": _rng_state(),
            "source": self.source.state_dict(),
        }
        if self.average is not None:
            state.update(training_model=self.model.state_dict(), weight_average=self.average.state_dict())
        if self.disc is not None:
            state.update(
                discriminator=self.disc.state_dict(),
                optimizer_d=self.opt_d.state_dict(),
                scheduler_d=self.sched_d.state_dict(),
            )
        return state

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if checkpoint_config(state).model != self.cfg.model:
            raise UserInputError(
                f"{path} was trained with another model config; resume it with the config stored inside it"
            )
        check_resumable(state, path, adversarial=self.disc is not None)
        # A checkpoint written with a weight average holds the trained weights beside it; one
        # written without starts the average (if this run keeps one) from its weights.
        trained = {"model": state["training_model"]} if "training_model" in state else state
        load_model_weights(self.model, trained, path)
        if self.average is not None:
            if "weight_average" in state:
                self.average.load(state["model"], state["weight_average"])
            else:
                self.average.load(self.model.state_dict(), {"updates": 0})
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.disc is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["optimizer_d"])
            self.sched_d.load_state_dict(state["scheduler_d"])
        self.source.load_state_dict(state["source"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._saved = (Path(path), self.step)

    def save(self, folder: Optional[RunFolder]) -> Optional[Path]:
        """Write ``last.pt`` into ``folder`` (rank 0's; ``None`` on the other ranks), refusing
        to replace a good checkpoint with non-finite weights."""
        if folder is None:
            return None
        nets = [("model", self.model)] + ([("discriminator", self.disc)] if self.disc is not None else [])
        nets += [("weight average", self.average.model)] if self.average is not None else []
        for net_name, net in nets:
            for name, tensor in net.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteError(f"step {self.step}: the {net_name}'s {name} holds NaN/Inf; {self._kept()}")
        replacing = folder.replacing
        path = folder.save(self.state_dict())
        self._saved = (path, self.step)
        if replacing and self._report is not None:
            self._report.published()
        return path

    def _kept(self) -> str:
        if self._saved is None:
            return "no checkpoint of this run was written"
        return f"nothing saved after step {self._saved[1]} ({self._saved[0]})"

    # -- one step ----------------------------------------------------------------------------
    def adversarial_weight(self) -> float:
        """lambda for the step about to be taken: an untrained discriminator's verdicts are
        noise, so ``loss.adversarial_warmup`` ramps lambda up linearly over its first steps."""
        loss_cfg = self.cfg.loss
        if loss_cfg.adversarial_warmup == 0:
            return loss_cfg.adversarial_weight
        return loss_cfg.adversarial_weight * min(1.0, (self.step + 1) / loss_cfg.adversarial_warmup)

    def train_step(self, image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        image, target = image.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
        loss_cfg = self.cfg.loss
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with autocast:
            logits = self.net(image)
            seg = segmentation_loss(logits.float(), target, loss_cfg.contour_pos_weight, loss_cfg.dice_weight)
        values = {"seg": seg.item()}
        self._check_finite("seg", values["seg"], image)
        loss = seg
        if self.disc is not None:
            mask_gt, mask_pred = target[:, :1], torch.sigmoid(logits[:, :1].float())
            if loss_cfg.discriminator_binary:
                mask_pred = straight_through_binary(mask_pred)
            # Discriminator: ascend Eq. 4 against a detached prediction.
            with autocast:
                d_loss = discriminator_loss(
                    self.disc_net(image, mask_gt).float(),
                    self.disc_net(image, mask_pred.detach()).float(),
                    loss_cfg.lambda1,
                )
            values["d_loss"] = d_loss.item()
            self._check_finite("d_loss", values["d_loss"], image)
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler.scale(d_loss).backward()
            self.scaler.step(self.opt_d)
            self.sched_d.step()
            # Segmentation network: descend Eq. 4 through its prediction; D is held fixed (and
            # called unwrapped: DDP must not wait for gradients D does not get here).
            self.disc.requires_grad_(False)
            with autocast:
                real = self.disc(image, mask_gt).float() if loss_cfg.adversarial_objective == "minimax" else None
                adv = generator_loss(
                    real, self.disc(image, mask_pred).float(), loss_cfg.lambda1, loss_cfg.adversarial_objective
                )
            loss = seg + self.adversarial_weight() * adv
            values["adv"] = adv.item()
            self._check_finite("adv", values["adv"], image)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.disc is not None:
            self.disc.requires_grad_(True)
        self.scaler.unscale_(self.opt)
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip))
        if not self.scaler.is_enabled():
            # With float16 loss scaling an Inf norm is routine: the scaler skips that step.
            self._check_finite("grad_norm", grad_norm, image)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.average is not None:
            self.average.update(self.model)
        values.update(loss=loss.item(), grad_norm=grad_norm, lr=self.sched.get_last_lr()[0])
        return values

    TERMS = {
        "seg": "the segmentation loss",
        "adv": "the FG-BG (adversarial) loss",
        "d_loss": "the discriminator's loss",
        "grad_norm": "the gradient norm",
    }

    def _check_finite(self, term: str, value: float, image: torch.Tensor) -> None:
        """Stop before a non-finite value reaches the weights, naming the step, the term and
        whether the batch (a NaN/Inf voxel) or the training (the weights diverged) is to blame."""
        if math.isfinite(value):
            return
        bad = int((~torch.isfinite(image)).sum())
        cause = (
            f"the batch's image holds {bad} NaN/Inf voxels (check the input volume)"
            if bad
            else "the image is finite, so training diverged (lower train.lr or train.grad_clip)"
        )
        raise NonFiniteError(f"step {self.step + 1}: {self.TERMS[term]} ({term}) is {value}; {cause}; {self._kept()}")

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to ``train.iterations`` (or ``max_steps``, or the time budget), checkpointing
        into the run folder. On Ctrl-C/SIGTERM the step in flight finishes, ``last.pt`` is
        written and the interrupt is re-raised with a note naming the checkpoint."""
        folder = self.options.folder
        claimed = folder is None and _rank() == 0
        if claimed:
            folder = RunFolder(self.options.out_dir, resume=self.options.resume, overwrite=self.options.overwrite)
        elif _rank() != 0:
            folder = None
        try:
            if folder is not None and self.options.resume is not None:
                folder.log.keep_through(self.step)
            with HeldInterrupts() as held:
                return self._loop(folder, held)
        finally:
            if claimed:
                folder.release()

    def _loop(self, folder: Optional[RunFolder], held: HeldInterrupts) -> TrainResult:
        t = self.cfg.train
        last = min(t.iterations, self.options.max_steps or t.iterations)
        result = TrainResult(step=self.step)
        log = folder.log if folder is not None else None
        if folder is not None:
            self._report = RunReport(
                folder,
                tensorboard=self.options.tensorboard,
                resumed_step=self.step if self.options.resume is not None else None,
            )
        progress = Progress(last, "train", start=self.step) if folder is not None and self.options.progress else None
        started = time.monotonic()
        batches = iter(self.source)
        self.model.train()
        mid_step = False
        try:
            while self.step < last:
                # Drawing the batch moves the sampler's state: it belongs to the step.
                with held.section():
                    mid_step = True
                    batch = next(batches)
                    image, target = (batch["image"], batch["target"]) if isinstance(batch, dict) else batch
                    values = self.train_step(image, target)
                    self.step += 1
                    result.losses.append(values["loss"])
                    if log is not None:
                        log.write(step=self.step, seconds=round(time.monotonic() - started, 3), **values)
                        self._report.scalars(self.step, values, "train")
                    mid_step = False
                if progress is not None:
                    progress.update(self.step, loss=values["loss"], lr=values["lr"])
                if self.options.validate is not None and self.step % t.val_every == 0:
                    result.metrics = self._validate(log)
                budget = self.options.time_budget
                out_of_time = budget is not None and time.monotonic() - started > budget
                if self.step % t.checkpoint_every == 0 or self.step == last or out_of_time:
                    result.checkpoint = self.save(folder)
                if out_of_time:
                    break
            if self.options.validate is not None and not result.metrics:
                result.metrics = self._validate(log)
            if self._report is not None:
                self._report.refresh(self.step)
        except KeyboardInterrupt as exc:
            exc.add_note(self._save_on_interrupt(folder, mid_step))
            if self._report is not None:
                self._report.refresh(self.step)
            raise
        finally:
            if progress is not None:
                progress.close()
            if self._report is not None:
                self._report.close()
                self._report = None
        result.step = self.step
        return result

    def _save_on_interrupt(self, folder: Optional[RunFolder], mid_step: bool) -> str:
        """Write the final checkpoint of an interrupted run if there is news to save; say what is on disk."""
        if folder is None:
            return "rank 0 writes the checkpoint"
        if mid_step:  # a second interrupt cut the step short: its state is not a resumable one
            return f"interrupted twice mid-step; {self._kept()}"
        if self.step > 0 and (self._saved is None or self._saved[1] != self.step):
            self.save(folder)
        if self._saved is None:
            return "no step was finished, nothing saved"
        return f"checkpoint {self._saved[0]} at step {self._saved[1]}"

    @property
    def inference_model(self) -> nn.Module:
        """The network validation scores and checkpoints store as ``"model"``."""
        return self.average.model if self.average is not None else self.model

    def _validate(self, log: Optional[RunLog]) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.options.validate(self.inference_model)
        self.model.train()
        if log is not None:
            log.write(step=self.step, **{f"val_{k}": v for k, v in metrics.items()})
            self._report.scalars(self.step, metrics, "val")
            self._report.refresh(self.step)
        return metrics


def train(config: Config, source: BatchSource, options: TrainOptions) -> TrainResult:
    """Train ``config`` on batches from ``source``; see :class:`TrainOptions`."""
    return Trainer(config, source, options).run()
