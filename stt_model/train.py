"""Training STT-UNET: Adam, warm-up + step LR schedule, AMP on GPU, gradient clipping, the
FG-BG adversarial game of Eq. 4, atomic resumable checkpoints and DDP through ``torchrun``.

The trainer draws batches from a :class:`BatchSource` (image ``(B, 1, T, H, W)`` float32,
targets ``(B, out, T, H, W)`` in {0, 1}, as a pair or as ``{"image", "target"}`` like
:class:`stt_model.data.PatchSampler` yields); its ``state_dict`` goes into the checkpoint so
a resumed run sees the same batches. Under ``torchrun`` every rank draws its own batches (the
source is built per rank) and only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import csv
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

from .build import build_discriminator, build_model
from .checkpoint import atomic_save, checkpoint_config, load_checkpoint, load_model_weights
from .config import Config
from .losses import discriminator_loss, generator_loss, segmentation_loss, straight_through_binary
from .progress import Progress


class BatchSource(Protocol):
    def __iter__(self) -> Iterator[Union[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Validator = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainOptions:
    out_dir: Path
    resume: Optional[Path] = None
    time_budget: Optional[float] = None        # seconds; stop (and checkpoint) when exceeded
    max_steps: Optional[int] = None            # stop after this step even if iterations is larger
    device: Optional[str] = None               # default: cuda if available, else cpu
    validate: Optional[Validator] = None       # called every train.val_every steps
    progress: bool = True


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)   # total loss of every step run here
    checkpoint: Optional[Path] = None
    metrics: dict[str, float] = field(default_factory=dict)


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
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if _distributed() and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
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
        self.step = 0
        if options.resume is not None:
            self._resume(options.resume)
        self.net, self.disc_net = self.model, self.disc
        if dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.disc is not None:
                self.disc_net = nn.parallel.DistributedDataParallel(self.disc, device_ids=ids)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _amp_dtype(self) -> Optional[torch.dtype]:
        if not self.cfg.train.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "config": self.cfg.to_dict(), "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": _rng_state(), "source": self.source.state_dict(),
        }
        if self.disc is not None:
            state.update(discriminator=self.disc.state_dict(), optimizer_d=self.opt_d.state_dict(),
                         scheduler_d=self.sched_d.state_dict())
        return state

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if checkpoint_config(state).model != self.cfg.model:
            raise ValueError(f"{path} was trained with another model config; resume it with the config "
                             "stored inside it")
        load_model_weights(self.model, state, path)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.disc is not None:
            if "discriminator" not in state:
                raise ValueError(f"{path} has no discriminator state; it was trained without the FG-BG loss")
            self.disc.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["optimizer_d"])
            self.sched_d.load_state_dict(state["scheduler_d"])
        self.source.load_state_dict(state["source"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])

    def save(self, name: str) -> Optional[Path]:
        if _rank() != 0:
            return None
        return atomic_save(self.state_dict(), self.options.out_dir / name)

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
        loss = seg
        if self.disc is not None:
            mask_gt, mask_pred = target[:, :1], torch.sigmoid(logits[:, :1].float())
            if loss_cfg.discriminator_binary:
                mask_pred = straight_through_binary(mask_pred)
            # Discriminator: ascend Eq. 4 against a detached prediction.
            with autocast:
                d_loss = discriminator_loss(self.disc_net(image, mask_gt).float(),
                                            self.disc_net(image, mask_pred.detach()).float(), loss_cfg.lambda1)
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler.scale(d_loss).backward()
            self.scaler.step(self.opt_d)
            self.sched_d.step()
            # Segmentation network: descend Eq. 4 through its prediction; D is held fixed (and
            # called unwrapped: DDP must not wait for gradients D does not get here).
            self.disc.requires_grad_(False)
            with autocast:
                real = self.disc(image, mask_gt).float() if loss_cfg.adversarial_objective == "minimax" else None
                adv = generator_loss(real, self.disc(image, mask_pred).float(), loss_cfg.lambda1,
                                     loss_cfg.adversarial_objective)
            loss = seg + self.adversarial_weight() * adv
            values.update(adv=adv.item(), d_loss=d_loss.item())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.disc is not None:
            self.disc.requires_grad_(True)
        self.scaler.unscale_(self.opt)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        values.update(loss=loss.item(), grad_norm=float(grad_norm), lr=self.sched.get_last_lr()[0])
        return values

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t = self.cfg.train
        last = min(t.iterations, self.options.max_steps or t.iterations)
        result = TrainResult(step=self.step)
        rank0 = _rank() == 0
        log = _CsvLog(self.options.out_dir / "train_log.csv") if rank0 else None
        progress = Progress(last, "train", start=self.step) if rank0 and self.options.progress else None
        started = time.monotonic()
        batches = iter(self.source)
        self.model.train()
        while self.step < last:
            batch = next(batches)
            image, target = (batch["image"], batch["target"]) if isinstance(batch, dict) else batch
            values = self.train_step(image, target)
            self.step += 1
            result.losses.append(values["loss"])
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"the loss became {values['loss']} at step {self.step}; "
                                         "lower train.lr or enable gradient clipping")
            if log is not None:
                log.write(step=self.step, seconds=round(time.monotonic() - started, 3), **values)
            if progress is not None:
                progress.update(self.step, loss=values["loss"], lr=values["lr"])
            if self.options.validate is not None and self.step % t.val_every == 0:
                result.metrics = self._validate(log)
            out_of_time = self.options.time_budget is not None and time.monotonic() - started > self.options.time_budget
            if self.step % t.checkpoint_every == 0 or self.step == last or out_of_time:
                result.checkpoint = self.save("last.pt")
            if out_of_time:
                break
        if progress is not None:
            progress.close()
        if self.options.validate is not None and not result.metrics:
            result.metrics = self._validate(log)
        result.step = self.step
        return result

    def _validate(self, log: Optional["_CsvLog"]) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.options.validate(self.model)
        self.model.train()
        if log is not None:
            log.write(step=self.step, **{f"val_{k}": v for k, v in metrics.items()})
        return metrics


class _CsvLog:
    """Appends one row per call; new columns extend the header in a rewritten file."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        if path.exists():
            with path.open() as handle:
                self.columns = next(csv.reader(handle), [])

    def write(self, **row: Any) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            rows = list(csv.DictReader(self.path.open())) if self.path.exists() else []
            self.columns += new
            tmp = self.path.with_suffix(".tmp")
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, self.columns)
                writer.writeheader()
                writer.writerows(rows)
            tmp.replace(self.path)
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(row)


def train(config: Config, source: BatchSource, options: TrainOptions) -> TrainResult:
    """Train ``config`` on batches from ``source``; see :class:`TrainOptions`."""
    return Trainer(config, source, options).run()
