"""The ``stt`` command: ``demo``, ``train``, ``predict``, ``evaluate``, ``tune``, ``models``, ``export``, ``bench``.

Volumes are named as ``file.h5[:dataset]``, ``file.zarr``, ``stack.tif`` or a folder of slices.
Every failure the user can fix prints one line, ``stt <command>: error: ...``, and exits 2
(``STT_DEBUG=1`` shows the traceback instead);
outputs are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

# The [model] extra of pyproject.toml (package: import name), which every command needs. Nothing
# but the standard library is imported at the top, so that without them `stt` still starts and says so.
MODEL_EXTRA_MODULES = {
    "numpy": "numpy",
    "h5py": "h5py",
    "scipy": "scipy",
    "scikit-image": "skimage",
    "tifffile": "tifffile",
    "pillow": "PIL",
    "zarr": "zarr",
    "pyyaml": "yaml",
    "connected-components-3d": "cc3d",
    "matplotlib": "matplotlib",
}


def missing_model_extras() -> list[str]:
    """The packages of the [model] extra that are not installed (looked up, not imported)."""
    return [package for package, module in MODEL_EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


EXAMPLES = {
    "demo": """examples:
  stt demo                                  # the shipped synthetic-demo model on held-out synthetic EM -> demo_out/
  stt demo --train --minutes 4              # train tiny-cpu from scratch first (today's 4-minute run)
  stt demo --data lucchi_pp_train.h5 --minutes 20   # a real volume: trains on its first 80 %""",
    "train": """examples:
  stt train --config tiny-cpu --image train.h5:image --label train.h5:label --out runs/tiny
  stt train --config my.yaml --image vol.h5:image --label vol.h5:label --val-z 130:165 --out runs/a
  stt train --resume runs/a/last.pt --image vol.h5:image --label vol.h5:label --out runs/a
  stt train --config my.yaml --image vol.h5:image --label vol.h5:label --out runs/a --overwrite
  stt train --config lucchi --set train.lr=3e-4 --set model.channels=[8,16,24,32] ... --tensorboard
  torchrun --nproc_per_node=4 -m stt_model.cli train --config mitoem-r ...""",
    "predict": """examples:
  stt predict --checkpoint runs/tiny/last.pt --image test.h5:image --out pred.h5
  stt predict --checkpoint last.pt --image slices/ --out pred.zarr --overlap 0.5 --tta 16 --tta-reduce mean
  stt predict --model synthetic-demo --image vol.h5:image --out pred.h5 --instances inst.h5
  stt predict ... --fg-threshold 0.6 --seed-threshold 0.8   # flags > last.thresholds.json (stt tune) > defaults
  stt predict ... --instances inst.h5                     # also post-process into 3D instances
  stt predict ... --image vol.h5:image --out vol.h5:probs --instances vol.h5:inst  # add both to vol.h5
  torchrun --nproc_per_node=4 -m stt_model.cli predict ... # ranks split the blocks, one output""",
    "evaluate": """examples:
  stt evaluate --pred inst.h5:main --gt gt.h5:label
  stt evaluate --pred inst.tif --gt gt_slices/ --json
  stt evaluate --pred probs.h5:main --gt gt.h5:label --thresholds last.thresholds.json --fg-threshold 0.6""",
    "tune": """examples:
  stt tune --checkpoint runs/a/last.pt --image val.h5:image --label val.h5:label   # -> runs/a/last.thresholds.json
  stt tune --checkpoint last.pt --image val.h5:image --label val.h5:label --tta 16 --points 7 --overwrite
  stt tune ... --search optuna --trials 100                                        # needs optuna""",
    "models": """examples:
  stt models                     # the shipped models and their held-out scores
  stt models synthetic-demo      # one model's whole card""",
    "export": """examples:
  stt export --checkpoint runs/a/last.pt --format onnx --out stt.onnx            # onnxruntime, opset 20
  stt export --checkpoint last.pt --format pt2 --out stt.pt2 --input-shape 8,64,64
  stt export --checkpoint last.pt --format aoti --out stt_aoti.pt2               # AOTInductor package
  stt export --checkpoint last.pt --format torchscript --out stt.ts --batch 2    # traced: this shape only""",
    "bench": """examples:
  stt bench --quick --out bench_out
  stt bench --suite levels train-step --out bench_out      # also one STT-UNET training step
  stt bench --suite issue-shapes --threads 1 --out bench_issue
  stt bench --full --out bench_h100""",
}


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def _parser() -> argparse.ArgumentParser:
    from .threads import add_threads_argument
    from .tune import add_bridge_argument, add_prediction_arguments, add_threshold_arguments, add_tune_arguments

    parser = argparse.ArgumentParser(prog="stt", description="STT-UNET: 3D mitochondria instance segmentation in EM.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    demo = command(
        "demo",
        "Segment a held-out synthetic EM volume with the shipped synthetic-demo model (or, with "
        "--train, a tiny-cpu model trained first), evaluate, write demo_out/.",
    )
    demo.add_argument(
        "--train",
        action="store_true",
        help="train tiny-cpu from scratch for --minutes instead of using the shipped model "
        "(implied by --data and --minutes)",
    )
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    demo.add_argument("--data", help="run on a real HDF5 volume with 'image' and 'label' datasets instead")
    demo.add_argument("--minutes", type=float, help="training time budget with --train (default: 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier demo in --out (other files there are left alone)",
    )
    add_bridge_argument(demo)

    train = command("train", "Train STT-UNET on a labelled volume.")
    train.add_argument(
        "--config",
        help="preset name or YAML file (default: tiny-cpu; with --resume, the "
        "checkpoint's own config, which a different --config may not change)",
    )
    train.add_argument("--image", required=True, help="image volume")
    train.add_argument("--label", required=True, help="label volume (instance ids, or a binary mask)")
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run folder: last.pt and train_log.csv of one run (locked while training)",
    )
    train.add_argument("--val-z", help="slices z0:z1 held out for validation (not trained on)")
    train.add_argument(
        "--resume",
        type=Path,
        help="continue from a checkpoint (exactly); its rows after the "
        "checkpoint's step are dropped from train_log.csv",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out; the old last.pt and train_log.csv stay until "
        "the new run's first checkpoint replaces them",
    )
    train.add_argument("--minutes", type=float, help="time budget (> 0); a checkpoint is written when it runs out")
    train.add_argument("--iterations", type=int, help="override train.iterations")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="set one config field by dotted key, the value read as YAML (train.lr=3e-4, "
        "model.channels=[8,16]); repeatable; checked as a YAML config is",
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log the losses and validation scores for TensorBoard into --out/tensorboard "
        "(needs the tensorboard package); train_curves.png is written either way",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="train the network through torch.compile (inductor): a minute or more of compiling "
        "first, faster steps after",
    )
    add_threads_argument(train)

    predict = command("predict", "Segment a volume with a trained checkpoint (sliding windows, out of core).")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a checkpoint (its thresholds file beside it is used)")
    which.add_argument("--model", help="a shipped model by name (stt models lists them), verified by SHA-256")
    predict.add_argument("--image", required=True, help="volume to segment")
    predict.add_argument(
        "--out",
        required=True,
        help="probabilities (uint8): out.h5 or out.zarr (a whole file), or out.h5:name / "
        "out.zarr:name (a dataset added to the file, the rest of it kept)",
    )
    predict.add_argument("--instances", help="also write 3D instances (uint32) here (the same forms)")
    predict.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out/--instances: the named dataset, or the whole file when "
        "none is named (without it, existing outputs are refused)",
    )
    predict.add_argument(
        "--block",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="output block predicted at a time; memory grows with it (default: 4 windows per axis)",
    )
    add_prediction_arguments(predict, model_defaults=True)
    add_threads_argument(predict)
    add_threshold_arguments(predict, mask=False)

    evaluate = command("evaluate", "Score instances against ground truth: MitoEM AP and Lucchi Jaccard/DSC.")
    evaluate.add_argument("--pred", required=True, help="predicted instances (or a binary mask)")
    evaluate.add_argument("--gt", required=True, help="ground-truth instances (or a binary mask)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument(
        "--thresholds",
        type=Path,
        help="with probabilities as --pred: a thresholds file "
        "(stt tune's) to decode them with; the flags below override it",
    )
    add_threshold_arguments(evaluate)

    add_tune_arguments(
        command(
            "tune",
            "Tune the decoding thresholds of a checkpoint on a labelled validation volume "
            "(AP-75, or Jaccard for one-channel models); writes a thresholds file beside it.",
        )
    )
    models = command("models", "List the shipped models with their cards.")
    models.add_argument("name", nargs="?", help="show this model's whole card")

    from .export import add_arguments as add_export_arguments

    add_export_arguments(
        command(
            "export",
            "Export a checkpoint's network as ONNX, TorchScript, a torch.export "
            "program or an AOTInductor package, checked against eager before it is written.",
        )
    )

    from stt_kernels.bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(command("bench", "Benchmark the kernels against the reference and the peers."))
    return parser


def _evaluate(args: argparse.Namespace) -> int:
    from .data import open_volume
    from .metrics import evaluate
    from .tune import decode_thresholds

    pred, gt = open_volume(args.pred), open_volume(args.gt)
    # Probabilities (C, Z, Y, X) are decoded with the thresholds first; instances are scored as they are.
    if len(pred.shape) == 4 and tuple(pred.shape[1:]) == tuple(gt.shape):
        from .segment import score

        thresholds, source = decode_thresholds(args, sidecar=args.thresholds)
        print(f"stt evaluate: decoding {args.pred} with {source}", file=sys.stderr)
        scores = score(pred[:], gt[:], thresholds)
    else:
        if tuple(pred.shape) != tuple(gt.shape):
            raise UsageError(
                f"--pred has shape {tuple(pred.shape)} but --gt has {tuple(gt.shape)} (or (C, Z, Y, X) "
                "probabilities of it)"
            )
        if args.thresholds is not None or any(
            v is not None for k, v in vars(args).items() if k.startswith("threshold_")
        ):
            raise UsageError(
                f"the thresholds decode probabilities (C, Z, Y, X); --pred {args.pred} holds instances "
                f"{tuple(pred.shape)}, scored as they are"
            )
        scores = evaluate(pred, gt)
    if args.json:
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            print(f"{key:>12}  {value:.4f}")
    return 0


def _z_range(text: str, depth: int) -> tuple[int, int]:
    try:
        z0, z1 = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"--val-z must look like z0:z1 (e.g. 130:165); got {text!r}") from None
    if not 0 <= z0 < z1 <= depth:
        raise UsageError(f"--val-z {text} is not inside the volume's {depth} slices")
    return z0, z1


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two ``Config.to_dict()`` trees."""
    keys = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _config_differences(a[key], b[key], f"{name}.")
        elif a.get(key) != b.get(key):
            keys.append(name)
    return keys


def _train(args: argparse.Namespace) -> int:
    import contextlib
    import math

    import numpy as np

    from .checkpoint import checkpoint_config, load_checkpoint
    from .config import apply_overrides, load_config
    from .data import PatchSampler, ZRange, check_labels, instances_from_binary, open_volume
    from .run_folder import RunFolder
    from .segment import validator
    from .threads import set_threads
    from .train import Trainer, TrainOptions, check_backend, check_resumable, training_device
    from .train_report import TensorBoardUnavailable, require_tensorboard

    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UsageError(f"--minutes must be a time budget > 0 minutes; got {args.minutes:g}")
    set_threads("stt train", args.threads)
    if args.iterations is not None and args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1; got {args.iterations}")
    if args.tensorboard:
        try:
            require_tensorboard()
        except TensorBoardUnavailable as exc:
            raise UsageError(f"--tensorboard: {exc}") from None
    if args.resume is not None:
        state = load_checkpoint(args.resume)
        check_resumable(state, args.resume)
        config = checkpoint_config(state)
        del state
    else:
        config = apply_overrides(load_config(args.config or "tiny-cpu"), args.overrides)
    if args.iterations is not None:
        config.train.iterations = args.iterations
        config.validate()
    if args.resume is not None and (args.config is not None or args.overrides):
        # The checkpoint's config is the one resumed (its optimiser state belongs to it); a
        # --config or --set that agrees with it is harmless, one that does not would be ignored.
        given = apply_overrides(load_config(args.config) if args.config is not None else config, args.overrides)
        if args.iterations is not None:
            given.train.iterations = args.iterations
        differ = [
            k for k in _config_differences(given.to_dict(), config.to_dict()) if k != "name" or args.config is None
        ]
        if differ:
            given_by = [f"--config {args.config}"] * (args.config is not None) + [f"--set {o}" for o in args.overrides]
            flags = "/".join(["--config"] * (args.config is not None) + ["--set"] * bool(args.overrides))
            further = " (to train further, give --iterations)" if "train.iterations" in differ else ""
            raise UsageError(
                f"{' '.join(given_by)} differs from the config stored in {args.resume} "
                f"({', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''}); a resumed run "
                f"keeps its checkpoint's config{further}: drop {flags}, or start a new run"
            )
    check_backend(config, training_device(None))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # Rank 0 alone writes the run folder, so it alone claims it, before any data is read.
    claim = RunFolder(args.out, resume=args.resume, overwrite=args.overwrite) if rank == 0 else None
    with claim if claim is not None else contextlib.nullcontext() as folder:
        if folder is not None and folder.removed:
            print(
                f"stt train: removed {len(folder.removed)} temporary file(s) a killed run left in {args.out}: "
                + ", ".join(p.name for p in folder.removed),
                file=sys.stderr,
            )
        image, label = open_volume(args.image), open_volume(args.label)
        if tuple(image.shape) != tuple(label.shape):
            raise UsageError(f"--image has shape {tuple(image.shape)} but --label has {tuple(label.shape)}")
        pairs, validate = [(image, label)], None
        if args.val_z:
            z0, z1 = _z_range(args.val_z, image.shape[0])
            pairs = [(ZRange(image, a, b), ZRange(label, a, b)) for a, b in ((0, z0), (z1, image.shape[0])) if b > a]
            # The sampler checks the slices it trains on; the held-out ones are only scored.
            check_labels(ZRange(label, z0, z1), name="--label")
            gt = np.asarray(ZRange(label, z0, z1)[:])
            gt = instances_from_binary(gt > 0) if gt.max() <= 1 else gt
            validate = validator(config, ZRange(image, z0, z1)[:], gt)
        source = PatchSampler.from_config(pairs, config, rank=rank, world_size=world)
        options = TrainOptions(
            out_dir=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            validate=validate,
            time_budget=args.minutes * 60 if args.minutes else None,
            folder=folder,
            compile=args.compile,
            tensorboard=args.tensorboard,
        )
        result = Trainer(config, source, options).run()
    if rank == 0:
        print(f"trained to step {result.step}; checkpoint {result.checkpoint}")
        if result.metrics:
            print("validation: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from . import parallel_predict as ranks
    from .build import build_model
    from .checkpoint import checkpoint_config, load_checkpoint, load_model_weights
    from .data import create_output, open_volume
    from .data.outputs import DISK_ERRNOS, check_outputs, check_space, output_target, remove_leftovers
    from .infer import bridged_line
    from .pretrained import model_card, verified_weights
    from .segment import instances_into, probabilities
    from .threads import set_threads
    from .tune import decode_thresholds

    # Everything that can be refused is refused here, before the model is built or a window runs.
    _check_predict_options(args)
    set_threads("stt predict", args.threads)
    if args.model is not None:
        args.checkpoint = verified_weights(args.model)
    if args.tta is None:
        args.tta = model_card(args.model)["held_out"].get("prediction", {}).get("tta", 1) if args.model else 1
        if args.tta > 1:
            print(
                f"stt predict: test-time augmentation {args.tta} (as {args.model}'s card; --tta 1 for none)",
                file=sys.stderr,
            )
    thresholds, threshold_source = decode_thresholds(args, checkpoint=args.checkpoint)
    device = ranks.device_for_rank(args.device)
    image = open_volume(args.image)
    if len(image.shape) != 3:
        raise UsageError(f"--image must be a 3-d volume (Z, Y, X); got shape {tuple(image.shape)}")
    named = {"--out": args.out, **({"--instances": args.instances} if args.instances else {})}
    targets = check_outputs(named, {"--image": image}, overwrite=args.overwrite)
    state = load_checkpoint(args.checkpoint)
    config = checkpoint_config(state)
    shape = (config.model.out_channels, *image.shape)
    rank, world = ranks.rank_and_world()
    voxels = int(np.prod(image.shape))
    plans = [("--out", targets["--out"], shape[0] * voxels)]
    if world > 1:
        plans.insert(
            0, (f"the {world} ranks' parts", output_target(ranks.part_spec(args.out, 0, world)), shape[0] * voxels)
        )
    if args.instances:
        plans.append(("--instances", targets["--instances"], 4 * voxels))
    if rank == 0:
        cleaned = [line for target in targets.values() for line in remove_leftovers(target)]
        if cleaned:
            print(f"stt predict: left by killed runs: {'; '.join(cleaned)}", file=sys.stderr)
    check_space(plans)
    model = build_model(config)
    load_model_weights(model, state, args.checkpoint)
    options = dict(
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta=args.tta,
        tta_reduce=args.tta_reduce,
        block=tuple(args.block) if args.block else None,
        bridge_blank=args.bridge_blank,
    )
    if args.instances and rank == 0:
        print(f"stt predict: instances will be decoded with {threshold_source}", file=sys.stderr)
    if world > 1:
        ranks.start()
    writing = args.out
    try:
        if world == 1:
            spec, where = args.out, dict(overwrite=args.overwrite)
        else:
            spec = ranks.part_spec(args.out, rank, world)
            where = dict(reserve=ranks.part_bytes(shape[0] * voxels, world))
        with create_output(spec, shape, np.uint8, **where) as out:
            probabilities(
                model.to(device),
                config,
                image,
                out,
                device=device,
                rank=rank,
                world=world,
                progress=rank == 0,
                **options,
            )
        if world > 1:
            ranks.barrier()
            if rank == 0:
                bridged = ranks.merge(
                    args.out,
                    shape,
                    config.data.patch,
                    options,
                    world,
                    overwrite=args.overwrite,
                    image=image,
                    intensity=config.data.intensity,
                )
                if bridged:
                    print(bridged_line(bridged), file=sys.stderr)
            ranks.barrier()
        if rank == 0:
            print(f"probabilities {shape} -> {args.out}" + (f" ({world} ranks)" if world > 1 else ""))
        if args.instances and rank == 0:
            writing = args.instances
            probs = open_volume(args.out)
            with create_output(args.instances, probs.shape[1:], np.uint32, overwrite=args.overwrite) as out:
                count, method = instances_into(probs, out, thresholds)
            print(f"{count} instances ({method}, {threshold_source}) -> {args.instances}")
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise UsageError(
            f"cannot write {writing}: {exc.strerror or exc}; it is left as it was and the temporary file is removed"
        ) from None
    finally:
        ranks.finish()
    return 0


def _check_predict_options(args: argparse.Namespace) -> None:
    if not 0 <= args.overlap < 1:  # NaN fails too
        raise UsageError(f"--overlap must be a fraction in [0, 1); got {args.overlap}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.block is not None and min(args.block) < 1:
        raise UsageError(f"--block must be three positive sizes Z Y X; got {' '.join(map(str, args.block))}")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    train = args.train or args.data is not None or args.minutes is not None
    run_demo(
        args.out,
        data=args.data,
        minutes=4.0 if args.minutes is None else args.minutes,
        seed=args.seed,
        overwrite=args.overwrite,
        train=train,
        bridge_blank=args.bridge_blank,
    )
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .tune import tune_command

    return tune_command(args)


def _models(args: argparse.Namespace) -> int:
    from .pretrained import describe_card, list_models, model_card

    cards = [model_card(args.name)] if args.name else list_models()
    print("\n\n".join(describe_card(card, full=bool(args.name)) for card in cards) or "no models are installed")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from stt_kernels.bench.cli import NothingMeasured, options_from_args, run_measuring

    from . import train_step_bench  # noqa: F401  (registers the train-step and predict-volume suites)

    try:
        options = options_from_args(args, ["stt", *sys.argv[1:]])
    except ValueError as exc:  # a bad option, named in the message
        raise UsageError(str(exc)) from None
    try:
        path = run_measuring(options)
    except NothingMeasured as exc:
        print(f"stt bench: error: {exc}", file=sys.stderr)
        return 1
    print(f"results -> {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import run

    return run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _demo,
    "train": _train,
    "predict": _predict,
    "evaluate": _evaluate,
    "tune": _tune,
    "models": _models,
    "export": _export,
    "bench": _bench,
}


def _one_line(exc: BaseException) -> str:
    """The error as one line; an OSError names its path (``path: No space left on device``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        paths = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{paths}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``stt`` command; returns the exit status: 0, 2 for an error the user can fix (one
    line on stderr), 130 for Ctrl-C and 143 for SIGTERM (``stt <cmd>: interrupted (...)``)."""
    if missing := missing_model_extras():
        print(
            f"stt: error: {', '.join(missing)} not installed; the stt commands need the model extras: "
            "pip install 'stt-kernels[model]'",
            file=sys.stderr,
        )
        return 2
    from stt_kernels import BackendUnavailableError

    from .errors import UserInputError
    from .interrupts import describe, exit_code, raising_on_sigterm
    from .run_folder import RunFolderError
    from .train import NonFiniteError

    parser = _parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("STT_DEBUG") == "1"
    try:
        # SIGTERM unwinds like Ctrl-C, so every command's with/finally clean-up runs for both.
        with raising_on_sigterm():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        notes = "; ".join(getattr(exc, "__notes__", []))
        print(f"stt {args.command}: interrupted ({describe(exc)})" + (f"; {notes}" if notes else ""), file=sys.stderr)
        return exit_code(exc)
    # Errors the user can fix are one line; anything else is a bug and keeps its traceback.
    except (UsageError, UserInputError, RunFolderError, BackendUnavailableError, NonFiniteError, OSError) as exc:
        if debug:
            raise
        print(f"stt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
