"""Decoding thresholds tuned on a validation volume, and where they are kept.

``stt tune`` predicts a labelled validation volume once, then searches the thresholds that turn
those probabilities into the answer: for a model with a contour channel, the seeded watershed's
foreground, seed and contour thresholds by MitoEM AP-75, and those of the distance-transform
watershed (foreground, contour, peak height, neck merge ratio; ``Thresholds.decoder = "distance"``), keeping the
decoder that scores better, and the semantic mask threshold by Jaccard; for a one-channel
(Lucchi-style, semantic) model, the mask threshold by Jaccard, which then also cuts the
foreground its instances are the connected components of. The search is a grid (the
default) or Optuna's TPE sampler when ``optuna`` is installed. The current thresholds are
always one of the candidates, so the score after is never below the score before.

The result is kept in a *sidecar* beside the checkpoint (``last.pt`` ->
``last.thresholds.json``), never in the checkpoint itself: it records the checkpoint's SHA-256,
and ``stt predict`` uses it only for that exact checkpoint. Precedence everywhere: threshold
flags, then the sidecar, then the defaults of :class:`~stt_model.segment.Thresholds`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from stt_kernels.atomic_file import atomic_write

from .errors import UserInputError
from .metrics import instance_ap, jaccard
from .segment import Thresholds, instances, score

SIDECAR_FORMAT = "stt-thresholds/1"
# CLI flag -> Thresholds field.
THRESHOLD_FLAGS = {
    "--fg-threshold": "foreground",
    "--seed-threshold": "seed",
    "--contour-threshold": "contour",
    "--mask-threshold": "mask",
    "--min-size": "min_size",
    "--decoder": "decoder",
    "--peak-height": "peak_height",
    "--anisotropy": "anisotropy",
    "--merge-ratio": "merge_ratio",
}
DECODERS = ("watershed", "distance")
# Search ranges (inclusive) of the tuned fields.
RANGES = {
    "foreground": (0.3, 0.9),
    "seed": (0.5, 0.95),
    "contour": (0.2, 0.8),
    "mask": (0.1, 0.9),
    "peak_height": (1.0, 4.0),
    "merge_ratio": (0.5, 1.0),  # 1 merges nothing; under 0.5 a touching pair's contact merges too
}


class TuneError(UserInputError):
    """A sidecar or a tuning request that cannot be used; the message names the file or argument."""


def sidecar_path(checkpoint: Union[str, Path]) -> Path:
    """Where the thresholds tuned for ``checkpoint`` are kept: ``<stem>.thresholds.json`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.thresholds.json")


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_thresholds(values: dict[str, Any], source: str) -> Thresholds:
    """A :class:`Thresholds` from a dict of its fields (missing ones default), or a
    :class:`TuneError` naming ``source`` and the field."""
    fields = {f.name for f in dataclasses.fields(Thresholds)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TuneError(f"{source}: unknown threshold {unknown[0]!r}; expected some of {', '.join(sorted(fields))}")
    for name, value in values.items():
        if name == "min_size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TuneError(f"{source}: min_size must be a whole number of voxels >= 0; got {value!r}")
        elif name == "decoder":
            if value not in DECODERS:
                raise TuneError(f"{source}: decoder must be one of {', '.join(DECODERS)}; got {value!r}")
        elif name in ("peak_height", "anisotropy"):
            low_ok = value >= 0 if name == "peak_height" else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low_ok or value != value:
                raise TuneError(
                    f"{source}: {name} must be a number {'>= 0' if name == 'peak_height' else '> 0'}; got {value!r}"
                )
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise TuneError(f"{source}: {name} must be a probability in [0, 1]; got {value!r}")
    return Thresholds(**values)


def read_sidecar(path: Union[str, Path]) -> dict[str, Any]:
    """The sidecar at ``path``, checked: its format and thresholds."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TuneError(f"{path} is not a readable thresholds file: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != SIDECAR_FORMAT
        or not isinstance(data.get("thresholds"), dict)
    ):
        raise TuneError(f"{path} is not an stt thresholds file (format {SIDECAR_FORMAT!r} with 'thresholds')")
    check_thresholds(data["thresholds"], str(path))
    return data


def sidecar_thresholds(checkpoint: Union[str, Path]) -> tuple[Optional[Thresholds], str]:
    """The thresholds of ``checkpoint``'s sidecar, and one line saying what was (not) used.

    A sidecar tuned for other weights (its SHA-256 differs: training went on, or the file was
    replaced) is not used: its thresholds belong to another model."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return None, ""
    data = read_sidecar(path)
    if data.get("checkpoint_sha256") != file_sha256(checkpoint):
        return None, (
            f"{path} was tuned for other weights than {checkpoint} (SHA-256 differs); not used, "
            f"the default thresholds are (stt tune --overwrite tunes them again)"
        )
    thresholds = check_thresholds(data["thresholds"], str(path))
    metric = data.get("metric")
    scores = ""
    if metric in data.get("before", {}) and metric in data.get("after", {}):
        scores = f"; {metric} {data['before'][metric]:.3f} -> {data['after'][metric]:.3f} on validation"
    return thresholds, f"thresholds from {path} ({describe(thresholds)}{scores})"


def describe(thresholds: Thresholds) -> str:
    names = (
        ("foreground", "seed", "contour", "mask", "min_size")
        if thresholds.decoder == "watershed"
        else ("foreground", "contour", "peak_height", "merge_ratio", "anisotropy", "mask", "min_size")
    )
    return f"decoder={thresholds.decoder}, " + ", ".join(f"{name}={getattr(thresholds, name):g}" for name in names)


def add_threshold_arguments(parser: argparse.ArgumentParser, mask: bool = True) -> None:
    """The threshold flags, each overriding the sidecar's value and the default."""
    group = parser.add_argument_group("decoding thresholds (flags > the checkpoint's sidecar > defaults)")
    helps = {
        "foreground": "foreground: mask probability above which a voxel belongs to an instance",
        "seed": "watershed seeds: mask probability above this (and contour below --contour-threshold)",
        "contour": "contour probability below which a voxel may be a seed",
        "mask": "semantic mask probability scored by Jaccard/DSC",
        "min_size": "instances with fewer voxels are removed",
        "decoder": "with a contour channel: watershed (seeded, MitoEM baseline) or distance (distance-transform "
        "watershed of the mask-and-not-contour core: splits touching instances at their neck)",
        "peak_height": "distance decoder: how far (xy voxels) a distance peak must rise to seed an instance",
        "anisotropy": "distance decoder: z voxel size / xy voxel size",
        "merge_ratio": "distance decoder: touching regions merge where their neck's distance exceeds this "
        "times the lower of their peaks (in [0, 1]; 1 merges none)",
    }
    for flag, name in THRESHOLD_FLAGS.items():
        if name == "mask" and not mask:
            continue
        default = getattr(Thresholds(), name)
        if name == "decoder":
            group.add_argument(
                flag, dest=f"threshold_{name}", choices=DECODERS, help=f"{helps[name]} (default {default})"
            )
            continue
        group.add_argument(
            flag,
            dest=f"threshold_{name}",
            type=int if name == "min_size" else float,
            metavar="N" if name in ("min_size", "peak_height", "anisotropy") else "P",
            help=f"{helps[name]} (default {default:g})",
        )


def threshold_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The threshold flags given on the command line, as Thresholds fields, checked."""
    given = {
        name: getattr(args, f"threshold_{name}")
        for name in THRESHOLD_FLAGS.values()
        if getattr(args, f"threshold_{name}", None) is not None
    }
    flag_of = {name: flag for flag, name in THRESHOLD_FLAGS.items()}
    for name, value in given.items():
        try:
            check_thresholds({name: value}, flag_of[name])
        except TuneError as exc:
            raise TuneError(str(exc).replace(f"{flag_of[name]}: {name}", flag_of[name])) from None
    return given


def with_flags(base: Thresholds, flags: dict[str, Any]) -> Thresholds:
    return dataclasses.replace(base, **flags)


@dataclasses.dataclass
class TuneResult:
    thresholds: Thresholds
    metric: str  # "ap75" (instances) or "jaccard" (semantic)
    before: dict[str, float]  # score() of the starting thresholds
    after: dict[str, float]  # score() of the tuned ones
    evaluations: int
    search: str


def _grid(points: int, names: tuple[str, ...]) -> list[dict[str, float]]:
    axes = [np.round(np.linspace(*RANGES[name], points), 4).tolist() for name in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*axes)]


def _optuna_search(
    objective: Callable[[dict[str, float]], float], names: tuple[str, ...], trials: int, start: dict[str, float]
) -> list[dict[str, float]]:
    try:
        import optuna
    except ModuleNotFoundError:
        raise TuneError("--search optuna needs optuna (pip install optuna); the grid search needs nothing") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(start)
    tried: list[dict[str, float]] = []

    def trial_objective(trial: Any) -> float:
        candidate = {name: trial.suggest_float(name, *RANGES[name]) for name in names}
        tried.append(candidate)
        return objective(candidate)

    study.optimize(trial_objective, n_trials=trials)
    return tried


def search_thresholds(
    probs: np.ndarray,
    gt: np.ndarray,
    start: Thresholds = Thresholds(),
    search: str = "grid",
    points: int = 5,
    trials: int = 60,
    log: Optional[Callable[[str], None]] = None,
) -> TuneResult:
    """Thresholds for probabilities ``probs (C, Z, Y, X)`` (uint8 or float) against ground-truth
    instances ``gt (Z, Y, X)``: see the module doc. ``points`` per threshold for the grid,
    ``trials`` for Optuna; ``start`` is both the first candidate and the fields not tuned."""
    probs, gt = np.asarray(probs), np.asarray(gt)
    if probs.ndim != 4 or probs.shape[1:] != gt.shape:
        raise TuneError(
            f"probabilities {probs.shape} and labels {gt.shape} do not match: expected (C, Z, Y, X) "
            "and (Z, Y, X) of the same volume"
        )
    if search not in ("grid", "optuna"):
        raise TuneError(f"--search must be grid or optuna; got {search!r}")
    if points < 2 or trials < 1:
        raise TuneError(f"--points must be >= 2 and --trials >= 1; got {points} and {trials}")
    semantic = probs.shape[0] == 1
    unit = probs[0].astype(np.float32) / 255.0 if probs.dtype == np.uint8 else probs[0]
    fg_gt = gt > 0
    evaluations = 0
    cache: dict[tuple, float] = {}

    def mask_score(candidate: dict[str, float]) -> float:
        return jaccard(unit >= candidate["mask"], fg_gt)

    def instance_score(candidate: dict[str, Any]) -> float:
        nonlocal evaluations
        key = tuple(sorted(candidate.items()))
        if key not in cache:
            evaluations += 1
            labels = instances(probs, dataclasses.replace(start, **candidate))
            cache[key] = instance_ap(labels, gt)["ap75"]
        return cache[key]

    def best_of(
        objective: Callable[[dict[str, Any]], float], names: tuple[str, ...], fixed: Optional[dict[str, Any]] = None
    ) -> tuple[dict[str, Any], float]:
        fixed = fixed or {}
        first = {**{name: getattr(start, name) for name in names}, **fixed}
        if search == "grid":
            candidates = [first] + [
                {**c, **fixed} for c in _grid(points, names) if c.get("seed", 1) >= c.get("foreground", 0)
            ]
        else:
            candidates = [first] + [
                {**c, **fixed}
                for c in _optuna_search(
                    lambda c: objective({**c, **fixed}), names, trials, {n: first[n] for n in names}
                )
            ]
        best, best_score = first, objective(first)
        for candidate in candidates[1:]:
            value = objective(candidate)
            if value > best_score:  # strictly: ties keep the earlier (the start first)
                best, best_score = candidate, value
        if log is not None:
            log(f"{'/'.join(names)}: best {best_score:.4f} at " + ", ".join(f"{k}={v}" for k, v in best.items()))
        return best, best_score

    mask, _ = best_of(mask_score, ("mask",))
    tuned = dataclasses.replace(start, **mask)
    if semantic:
        # A semantic model's instances are the components of its mask.
        tuned = dataclasses.replace(tuned, foreground=tuned.mask)
    else:
        # Each decoder's own search; the start's decoder first, so a tie keeps it.
        searches = {
            "watershed": ("foreground", "seed", "contour"),
            "distance": ("foreground", "contour", "peak_height", "merge_ratio"),
        }
        order = sorted(DECODERS, key=lambda d: d != start.decoder)
        results = [best_of(instance_score, searches[d], {"decoder": d}) for d in order]
        best = max(range(len(results)), key=lambda i: (results[i][1], -i))
        tuned = dataclasses.replace(tuned, **results[best][0])
    return TuneResult(
        tuned, "jaccard" if semantic else "ap75", score(probs, gt, start), score(probs, gt, tuned), evaluations, search
    )


def write_sidecar(
    path: Union[str, Path],
    result: TuneResult,
    checkpoint: Union[str, Path],
    details: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``result`` as the sidecar ``path`` of ``checkpoint`` (atomically; an existing one
    only with ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise TuneError(f"{path} exists; --overwrite replaces it")
    data = {
        "format": SIDECAR_FORMAT,
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "thresholds": dataclasses.asdict(result.thresholds),
        "metric": result.metric,
        "before": result.before,
        "after": result.after,
        "search": result.search,
        "evaluations": result.evaluations,
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **details,
    }
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="the trained checkpoint to tune for")
    parser.add_argument("--image", required=True, help="validation volume (held out from training; read whole)")
    parser.add_argument("--label", required=True, help="its labels (instance ids, or a binary mask)")
    parser.add_argument(
        "--out",
        type=Path,
        help="the thresholds file (default: <checkpoint stem>.thresholds.json "
        "beside the checkpoint, where stt predict finds it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing thresholds file")
    parser.add_argument(
        "--search",
        choices=("grid", "optuna"),
        default="grid",
        help="grid (default) or optuna (TPE; needs optuna installed)",
    )
    parser.add_argument("--points", type=int, default=5, help="grid points per threshold (default 5)")
    parser.add_argument("--trials", type=int, default=60, help="optuna trials per search (default 60)")
    add_prediction_arguments(parser)
    add_threshold_arguments(parser)


def add_prediction_arguments(parser: argparse.ArgumentParser, model_defaults: bool = False) -> None:
    """Sliding-window flags shared by ``stt predict`` and ``stt tune`` (thresholds are tuned on
    probabilities predicted the way ``stt predict`` will predict them). With ``model_defaults``,
    ``--tta`` defaults to None: the shipped model's choice with ``--model``, else 1."""
    parser.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--tta",
        type=int,
        nargs="?",
        const=4,
        default=None if model_defaults else 1,
        choices=(1, 4, 8, 16),
        metavar="N",
        help="test-time augmentation: 4 (xy flips; --tta alone), 8 (and z flips) or 16 (and the "
        "xy transpose; square windows), N times slower (default 1: none"
        + ("; with --model, the variants its card was scored with)" if model_defaults else ")"),
    )
    parser.add_argument(
        "--tta-reduce",
        choices=("mean", "min", "max"),
        default="mean",
        help="how the variants' probabilities are combined (default mean)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    add_bridge_argument(parser)


def add_bridge_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-bridge-blank-slices`` (``args.bridge_blank``, default True): see
    :data:`stt_model.infer.BLANK_SLICE_STD`."""
    parser.add_argument(
        "--no-bridge-blank-slices",
        dest="bridge_blank",
        action="store_false",
        help="keep the probabilities of blank input slices (missing sections: std under 0.01 of the "
        "range) as predicted; by default they are interpolated from the neighbouring slices before decoding",
    )


def tune_command(args: argparse.Namespace) -> int:
    """``stt tune``: see the module doc."""
    import os

    from .build import build_model
    from .checkpoint import checkpoint_config, load_checkpoint, load_model_weights
    from .data import check_labels, instances_from_binary, open_volume
    from .segment import probabilities

    out = args.out or sidecar_path(args.checkpoint)
    # Refused before the model runs: an existing file, a folder it cannot be written to, bad flags.
    if out.exists() and not args.overwrite:
        raise TuneError(f"--out {out} exists; --overwrite replaces it")
    if out.is_dir():
        raise TuneError(f"--out {out} is a folder; expected the thresholds file's path")
    if not os.access(out.parent if str(out.parent) else Path("."), os.W_OK):
        raise TuneError(f"--out {out}: cannot write in {out.parent}")
    if not 0 <= args.overlap < 1:
        raise TuneError(f"--overlap must be a fraction in [0, 1); got {args.overlap}")
    if args.points < 2:
        raise TuneError(f"--points must be >= 2; got {args.points}")
    if args.trials < 1:
        raise TuneError(f"--trials must be >= 1; got {args.trials}")
    start = with_flags(Thresholds(), threshold_flags(args))
    image, label = open_volume(args.image), open_volume(args.label)
    if tuple(image.shape) != tuple(label.shape) or len(image.shape) != 3:
        raise TuneError(
            f"--image {tuple(image.shape)} and --label {tuple(label.shape)} must be 3-d volumes of the same shape"
        )
    check_labels(label, name="--label")
    state = load_checkpoint(args.checkpoint)
    config = checkpoint_config(state)
    model = build_model(config)
    load_model_weights(model, state, args.checkpoint)
    del state
    gt = np.asarray(label[:])
    gt = instances_from_binary(gt > 0) if gt.max() <= 1 else gt
    started = time.monotonic()
    probs = probabilities(
        model,
        config,
        image,
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta=args.tta,
        tta_reduce=args.tta_reduce,
        device=args.device,
        progress=False,
        bridge_blank=args.bridge_blank,
    )
    print(
        f"stt tune: predicted {args.image} {tuple(image.shape)} in {time.monotonic() - started:.0f} s "
        f"(tta {args.tta}, {args.tta_reduce}); searching ({args.search}) ..."
    )
    result = search_thresholds(
        probs,
        gt,
        start,
        search=args.search,
        points=args.points,
        trials=args.trials,
        log=lambda line: print("  " + line),
    )
    metric = result.metric
    print(f"before: {metric} {result.before[metric]:.4f} ({describe(start)})")
    print(f"after:  {metric} {result.after[metric]:.4f} ({describe(result.thresholds)})")
    print("  all scores after: " + ", ".join(f"{k}={v:.3f}" for k, v in result.after.items()))
    details = {
        "validation": {"image": args.image, "label": args.label, "shape": list(image.shape)},
        "prediction": {
            "tta": args.tta,
            "tta_reduce": args.tta_reduce,
            "overlap": args.overlap,
            "bridge_blank": args.bridge_blank,
        },
    }
    write_sidecar(out, result, args.checkpoint, details, overwrite=args.overwrite)
    print(
        f"thresholds -> {out}"
        + (
            ""
            if out == sidecar_path(args.checkpoint)
            else f" (stt predict reads {sidecar_path(args.checkpoint).name} beside the checkpoint)"
        )
    )
    return 0


def decode_thresholds(
    args: argparse.Namespace, checkpoint: Optional[Path] = None, sidecar: Optional[Path] = None
) -> tuple[Thresholds, str]:
    """The thresholds a command decodes with, and where they came from: the threshold flags over
    ``sidecar`` (a thresholds file named by the user) or else ``checkpoint``'s own sidecar (used
    only when tuned for those exact weights), over the defaults."""
    thresholds, source = Thresholds(), "the default thresholds"
    if sidecar is not None:
        thresholds = check_thresholds(read_sidecar(sidecar)["thresholds"], str(sidecar))
        source = f"thresholds from {sidecar}"
    elif checkpoint is not None and Path(checkpoint).is_file():
        found, line = sidecar_thresholds(checkpoint)
        if found is not None:
            thresholds, source = found, line
        elif line:
            source = f"the default thresholds ({line})"
    flags = threshold_flags(args)
    if flags:
        thresholds = with_flags(thresholds, flags)
        named = ", ".join(
            f"{flag} {getattr(args, f'threshold_{name}')}" for flag, name in THRESHOLD_FLAGS.items() if name in flags
        )
        source = f"{source}, overridden by {named}"
    return thresholds, source
