"""``stt export``: a trained STT-UNET as a file that runs without this package's Python code.

Formats (``--format``):

- ``onnx``: the dynamo ONNX exporter, each ``stt`` op written in standard operators
  (:mod:`stt_kernels.onnx`, opset 20); runs in onnxruntime or any ONNX runtime with
  ``DeformConv``. Batch, T, H and W stay dynamic unless ``--static``.
- ``torchscript``: ``torch.jit.trace`` at ``--batch`` x ``--input-shape``; a trace records the
  sizes it saw, so the file runs at that input shape only. Loading it needs the ``stt`` ops
  registered (``import stt_kernels`` in Python).
- ``pt2``: a ``torch.export`` program saved with ``torch.export.save`` (``torch.export.load``),
  dynamic like ``onnx``.
- ``aoti``: that program compiled ahead of time by AOTInductor into a ``.pt2`` package
  (``torch._inductor.aoti_load_package``, or ``AOTIModelPackageLoader`` in C++); a minute or
  more of compiling on a CPU.

The graph records the ops' backend as ``'auto'``, resolved by device where it runs, whatever
``STT_BACKEND``, a ``use_backend`` block or the checkpoint's ``model.backend`` said while it
was traced; ``--backend NAME`` records that name instead. Before the file is published it is
loaded back and run on fresh random input against the eager model; a mismatch is an error and
nothing is written. The file goes to a temporary name beside ``--out`` and is renamed over it.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from stt_kernels import use_backend
from stt_kernels.atomic_file import atomic_write

from .build import build_model
from .checkpoint import checkpoint_config, load_checkpoint, load_model_weights
from .config import Config
from .errors import UserInputError

FORMATS = ("onnx", "torchscript", "pt2", "aoti")
DYNAMIC_FORMATS = ("onnx", "pt2", "aoti")
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# Exported output against eager on the same input; AOTInductor fuses and reorders float32 sums.
_RTOL, _ATOL = 1e-4, 1e-4


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_checkpoint` writes: ``format`` (one of :data:`FORMATS`), the example
    input ``batch`` x ``(T, H, W)`` (``None``: the checkpoint's ``data.patch``), ``dynamic``
    batch/T/H/W (ignored by ``torchscript``), the backend recorded in the graph, the device
    traced on."""

    format: str
    input_shape: Optional[tuple[int, int, int]] = None
    batch: int = 1
    dynamic: bool = True
    backend: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    input_shape: tuple[int, ...]  # (B, C, T, H, W) traced
    dynamic: bool
    max_difference: Optional[float]  # max |exported - eager| on fresh input; None: not run (no onnxruntime)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stt export`` options."""
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx (standard operators, opset 20), torchscript (torch.jit.trace), pt2 "
        "(torch.export program) or aoti (AOTInductor package)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--input-shape", metavar="T,H,W", help="example input size traced (default: the checkpoint's data.patch)"
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="example batch size (default 1; torchscript runs at this size only)"
    )
    parser.add_argument(
        "--static", action="store_true", help="onnx/pt2/aoti: fix batch, T, H, W at the example's (default: dynamic)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="torchscript/pt2/aoti: the kernels' backend recorded in the graph (default: auto, "
        "chosen by device where the graph runs)",
    )
    parser.add_argument("--device", default="cpu", help="trace (and for aoti compile) on this device (default cpu)")


def run(args: argparse.Namespace) -> int:
    """``stt export``: everything that can be refused is refused before the model is built."""
    options = ExportOptions(
        format=args.format,
        input_shape=parse_input_shape(args.input_shape),
        batch=args.batch,
        dynamic=not args.static,
        backend=args.backend,
        device=args.device,
    )
    check_output(args.out, args.checkpoint, overwrite=args.overwrite)
    result = export_checkpoint(args.checkpoint, args.out, options)
    shape = "x".join(map(str, result.input_shape))
    sizes = "dynamic batch, T, H, W" if result.dynamic else f"input {shape} only"
    check = (
        f"max |exported - eager| = {result.max_difference:.2g}"
        if result.max_difference is not None
        else "not run back (onnxruntime not installed)"
    )
    print(f"{options.format} -> {result.path} (traced at {shape}, {sizes}, backend {options.backend}; {check})")
    return 0


def parse_input_shape(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``"T,H,W"`` -> ``(T, H, W)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise UserInputError(f"--input-shape must be three positive sizes T,H,W (e.g. 8,64,64); got {text!r}")
    return sizes  # type: ignore[return-value]


def check_output(out: Path, checkpoint: Path, *, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a folder, the checkpoint itself, or exists without ``overwrite``."""
    if out.is_dir():
        raise UserInputError(f"--out {out} is a folder; name the file to write")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise UserInputError(f"--out {out} is the --checkpoint; the export would replace it")
    if out.exists() and not overwrite:
        raise UserInputError(f"--out {out} exists; pass --overwrite to replace it")


def _check_options(options: ExportOptions) -> None:
    if options.format not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}; got {options.format!r}")
    if options.batch < 1:
        raise UserInputError(f"--batch must be >= 1; got {options.batch}")
    if options.format == "onnx" and options.backend != "auto":
        raise UserInputError(
            "--backend does not apply to --format onnx: the ONNX graph is standard operators, run "
            "by the ONNX runtime's own kernels"
        )
    if options.format == "onnx":
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise UserInputError(f"--format onnx needs {' and '.join(missing)}: pip install 'stt-kernels[onnx]'")
    try:
        device = torch.device(options.device)
    except RuntimeError:
        raise UserInputError(f"--device must be a torch device such as cpu or cuda; got {options.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {options.device}: no GPU is visible to torch here")


def multiples(config: Config) -> tuple[int, int, int]:
    """What T, H and W of the network's input must be divisible by."""
    ft, fh, fw = config.model.input_downsample
    down = 2 ** (len(config.model.channels) - 1)
    return ft, fh * down, fw * down


def example_input(config: Config, options: ExportOptions, seed: int = 0) -> torch.Tensor:
    """A random ``(B, C, T, H, W)`` input of the export's example shape.

    A dynamic export traces at batch >= 2: torch.export fixes a size traced as 1.
    """
    shape = options.input_shape or tuple(config.data.patch)
    step = multiples(config)
    if any(n % m for n, m in zip(shape, step)):
        raise UserInputError(
            f"--input-shape {','.join(map(str, shape))} must be divisible by {','.join(map(str, step))} "
            f"(T by model.input_downsample, H and W by it times 2^(levels-1))"
        )
    dynamic = options.dynamic and options.format in DYNAMIC_FORMATS
    if dynamic and min(shape[1] // step[1], shape[2] // step[2]) < 2:
        raise UserInputError(
            f"--input-shape {','.join(map(str, shape))}: a dynamic export traces H and W of at least "
            f"two multiples ({2 * step[1]},{2 * step[2]}); give a larger one, or --static"
        )
    batch = max(options.batch, 2) if dynamic else options.batch
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, config.model.in_channels, *shape), generator=generator)
    return x.to(options.device)


def dynamic_shapes(config: Config) -> tuple[dict[int, Any]]:
    """``torch.export`` dynamic shapes of the network's one input: batch, T, H, W, each a
    multiple of what :func:`multiples` says; H and W at least two multiples (at one, the
    coarsest level is 1 pixel wide, which torch.export specialises, and a program traced
    larger asserts against it)."""
    Dim = torch.export.Dim
    ft, fh, fw = multiples(config)

    def size(name: str, multiple: int, least: int) -> Any:
        return Dim(name, min=least) if multiple == 1 else multiple * Dim(f"{name}_blocks", min=least)

    return ({0: Dim("batch", min=1), 2: size("t", ft, 1), 3: size("h", fh, 2), 4: size("w", fw, 2)},)


def load_for_export(checkpoint: Path, device: str = "cpu") -> tuple[torch.nn.Module, Config]:
    """The checkpoint's network in eval mode, built to record ``'auto'`` (its config's
    ``model.backend`` is what training ran with, not a choice for the exported graph)."""
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state)
    config.model.backend = "auto"
    model = build_model(config)
    load_model_weights(model, state, checkpoint)
    return model.eval().to(device), config


def export_checkpoint(checkpoint: Path, out: Path, options: ExportOptions) -> ExportResult:
    """Export the network of ``checkpoint`` to ``out`` as ``options`` say, check it against eager, publish it."""
    _check_options(options)
    model, config = load_for_export(checkpoint, options.device)
    return export_model(model, config, out, options)


def export_model(model: torch.nn.Module, config: Config, out: Path, options: ExportOptions) -> ExportResult:
    """Export ``model`` (``config``'s STT-UNET, eval mode) to ``out``; see the module docstring."""
    _check_options(options)
    model = contiguous_copy(model)
    x = example_input(config, options)
    dynamic = options.dynamic and options.format in DYNAMIC_FORMATS
    shapes = dynamic_shapes(config) if dynamic else None
    checks = [example_input(config, options, seed=1)]
    if dynamic:
        checks.append(checks[0][:1])  # another batch size than the one traced
    difference: list[Optional[float]] = [None]

    def write(tmp: str) -> None:
        # use_backend wins over STT_BACKEND and the modules' defaults: the graph records exactly this.
        with use_backend(options.backend), torch.no_grad():
            _WRITERS[options.format](model, x, shapes, tmp)
            run = _load(options.format, tmp)
            if run is not None:
                difference[0] = _compare(model, run, checks, out)

    path = atomic_write(out, write)
    return ExportResult(path, tuple(x.shape), dynamic, difference[0])


def contiguous_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are all contiguous.

    STT-UNET keeps its Conv3d weights channels-last for oneDNN in eager CPU runs; a graph should
    not carry that choice to other runtimes, and AOTInductor (torch 2.14.1) compiles a
    channels-last Conv3d weight with a dynamic batch into code that is wrong at batch 1 (by
    ~1.5 on a unit-scale 8-channel conv; right at the other sizes).
    """
    import copy

    copied = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in (*copied.parameters(), *copied.buffers()):
            if not tensor.is_contiguous():
                tensor.data = tensor.data.contiguous()
    return copied


def _write_onnx(model: torch.nn.Module, x: torch.Tensor, shapes: Any, tmp: str) -> None:
    import stt_kernels.onnx

    # One self-contained file (no external-data sidecar beside the temporary name).
    stt_kernels.onnx.export(
        model,
        (x,),
        tmp,
        dynamic_shapes=shapes,
        external_data=False,
        verbose=False,
        input_names=["image"],
        output_names=["logits"],
    )


def _write_torchscript(model: torch.nn.Module, x: torch.Tensor, shapes: Any, tmp: str) -> None:
    torch.jit.save(torch.jit.trace(model, (x,), check_trace=False), tmp)


def _exported_program(model: torch.nn.Module, x: torch.Tensor, shapes: Any) -> torch.export.ExportedProgram:
    return torch.export.export(model, (x,), dynamic_shapes=shapes)


def _write_pt2(model: torch.nn.Module, x: torch.Tensor, shapes: Any, tmp: str) -> None:
    # File objects here and in _load: torch.export warns about a path not ending in .pt2.
    with open(tmp, "wb") as handle:
        torch.export.save(_exported_program(model, x, shapes), handle)


def _write_aoti(model: torch.nn.Module, x: torch.Tensor, shapes: Any, tmp: str) -> None:
    program = _exported_program(model, x, shapes)
    # A file object: AOTInductor takes a path only if it ends in .pt2, and the temporary's does not.
    with open(tmp, "wb") as handle:
        torch._inductor.aoti_compile_and_package(program, package_path=handle)


_WRITERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Any, str], None]] = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "pt2": _write_pt2,
    "aoti": _write_aoti,
}


def load_exported(path: str, format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A file written by ``stt export`` as a function ``(B, C, T, H, W)`` -> logits (ONNX through
    onnxruntime on the CPU)."""
    run = _load(format, path)
    if run is None:
        raise UserInputError("loading an ONNX export needs onnxruntime: pip install 'stt-kernels[onnx]'")
    return run


def _load(format: str, path: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if format == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0]).to(x.device)

        return run_onnx
    if format == "torchscript":
        return torch.jit.load(path)
    if format == "pt2":
        with open(path, "rb") as handle:
            return torch.export.load(handle).module()
    if format == "aoti":
        with open(path, "rb") as handle:
            return torch._inductor.aoti_load_package(handle)
    raise UserInputError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")


def _compare(
    model: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor], out: Path
) -> float:
    worst = 0.0
    for x in inputs:
        expected, got = model(x), run(x)
        if got.shape != expected.shape:
            raise UserInputError(
                f"the export for {out} gives shape {tuple(got.shape)} on input {tuple(x.shape)}, eager "
                f"{tuple(expected.shape)}; nothing written"
            )
        error = (got - expected).abs()
        worst = max(worst, float(error.max()))
        if not bool((error <= _ATOL + _RTOL * expected.abs()).all()):
            raise UserInputError(
                f"the export for {out} differs from the eager model by up to {float(error.max()):.3g} "
                f"on input {tuple(x.shape)}; nothing written"
            )
    return worst
