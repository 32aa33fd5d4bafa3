"""Registers, shared memory and spills of every Triton kernel configuration, compiled offline.

No GPU is needed: each configuration that autotuning may choose is compiled with
``triton.compile`` for an explicit target (NVIDIA sm_80 / sm_90 through the ptxas bundled with
Triton, AMD gfx90a / gfx942 through Triton's own LLVM), and the usage is read from the binary:
``cuobjdump --dump-resource-usage`` (``REG``; ``STACK`` + ``LOCAL`` as spills) and the kernel's
``shared`` metadata on NVIDIA, the AMDGPU metadata (``.vgpr_count``, ``.vgpr_spill_count``, ``.sgpr_spill_count``) and
``shared`` on AMD.

A configuration fails the check when

* it needs more registers than the target has per thread (255 on NVIDIA, 512 unified VGPRs per
  lane on CDNA2/3), or more than a block's register file (64 K on NVIDIA);
* the run-time pruning (``attention.fits_shared``) would keep it on a device of that target
  although its compiled shared memory exceeds the device's limit (the estimate was too low, and
  the launch would raise OutOfResources);
* it does not compile.

A kernel and shape fails when pruning would leave none of its default configurations on a
device, or none that spills at most :data:`SPILL_ALLOWANCE` bytes per thread: autotuning must
always have a candidate that neither fails to launch nor spills (the others it may measure
and reject; the table lists every one's spills).

``python -m stt_kernels.triton.resources`` checks :data:`CI_GROUPS` (what CI runs,
``tests/test_triton_resources.py``, ~90 s on 2 cores); ``--defaults`` the default autotuning
lists at :data:`SHAPES_DEFAULTS` on every target; ``--full`` every configuration of the
``STT_TRITON_FULL_TUNE=1`` lists at every dtype and head dim; ``--targets``, ``--kernels``,
``--dtypes``, ``--head-dims`` narrow a run. It writes one markdown row per compilation (``--out``)
and exits 1 naming each problem. It must run with ``TRITON_INTERPRET`` unset: the
interpreter's kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclasses.dataclass(frozen=True)
class Target:
    """One compilation target and the limits a kernel must respect on the devices it covers."""

    name: str
    backend: str  # "cuda" or "hip": the autotuning list that applies
    arch: object  # GPUTarget's arch: 80 / 90 or "gfx90a" / "gfx942"
    warp_size: int
    shared_limits: tuple[tuple[str, int], ...]  # (devices, opt-in shared memory per block in bytes)
    max_registers: int  # per thread
    registers_per_block: Optional[int]

    def gpu_target(self) -> GPUTarget:
        return GPUTarget("cuda" if self.backend == "cuda" else "hip", self.arch, self.warp_size)


KB = 1024
# sm_86/89 (A10, L4, RTX 30/40, 99 KB) run the sm_80 binary's code generation, so the sm_80
# compile is checked against both limits.
TARGETS = {
    "sm_80": Target("sm_80", "cuda", 80, 32, (("sm_80", 163 * KB), ("sm_86/89", 99 * KB)), 255, 64 * KB),
    "sm_90": Target("sm_90", "cuda", 90, 32, (("sm_90", 227 * KB),), 255, 64 * KB),
    "gfx90a": Target("gfx90a", "hip", "gfx90a", 64, (("gfx90a", 64 * KB),), 512, None),
    "gfx942": Target("gfx942", "hip", "gfx942", 64, (("gfx942", 64 * KB),), 512, None),
}

# Bytes of local memory per thread that still count as not spilling: a few words cost little
# next to a kernel's traffic.
SPILL_ALLOWANCE = 128

_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One compilation: ``kernel`` (a name in :data:`KERNELS`) with ``config`` at ``dtype`` and
    ``head_dim`` (the padded head dim BLOCK_D; 0 for the deformable kernels) and, for the packed
    kernels, the padded sequence length ``t_pad``; ``default`` if the config is in the default list."""

    kernel: str
    config: triton.Config
    dtype: str
    head_dim: int
    t_pad: int
    target: str
    default: bool

    def config_text(self) -> str:
        parts = [f"{k}={v}" for k, v in self.config.kwargs.items()]
        parts += [f"warps={self.config.num_warps}", f"stages={self.config.num_stages}"]
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Usage:
    registers: int  # per thread (NVIDIA) / VGPRs per lane (AMD)
    spills: int  # bytes of local memory / scratch per thread
    shared: int  # bytes per block
    seconds: float


@dataclasses.dataclass(frozen=True)
class Result:
    case: Case
    usage: Optional[Usage]
    problems: tuple[str, ...]
    pruned_on: tuple[str, ...]  # devices whose shared-memory limit the run-time pruning drops it for


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _nvidia_usage(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    figures = {k: re.search(rf"{k}:(\d+)", report) for k in ("REG", "STACK", "LOCAL")}
    if not all(figures.values()):
        raise RuntimeError(f"cuobjdump printed no REG/STACK/LOCAL figures:\n{report}")
    regs, stack, local = (int(figures[k].group(1)) for k in ("REG", "STACK", "LOCAL"))
    # ptxas puts spills in the stack frame: a kernel that spills kilobytes reports few registers
    # and a large STACK, and the driver's local size (Triton's n_spills) is both together.
    return regs, stack + local


def _amd_usage(amdgcn: str) -> tuple[int, int]:
    def field(name: str) -> int:
        found = re.search(rf"\.{name}:\s+(\d+)", amdgcn)
        if found is None:
            raise RuntimeError(f"the AMDGPU metadata has no .{name}")
        return int(found.group(1))

    # A spilled VGPR costs 4 bytes of scratch per lane; SGPR spills go to VGPR lanes first.
    scratch = re.search(r"ScratchSize:\s+(\d+)", amdgcn)
    spills = 4 * (field("vgpr_spill_count") + field("sgpr_spill_count"))
    return field("vgpr_count"), max(spills, int(scratch.group(1)) if scratch else 0)


def compile_kernel(case: Case):
    """``case`` compiled for its target: Triton's CompiledKernel (its ``asm`` holds every stage)."""
    from . import attention, deform_conv2d  # noqa: F401 - the kernels register on import

    spec = KERNELS[case.kernel]
    fn = spec.jit_function()
    signature, constexprs, attrs = spec.signature(fn, case)
    options = dict(num_warps=case.config.num_warps, num_stages=case.config.num_stages)
    for key, value in case.config.kwargs.items():
        if key not in fn.arg_names:  # backend options such as AMD's waves_per_eu
            options[key] = value
    return triton.compile(
        ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
        target=TARGETS[case.target].gpu_target(),
        options=options,
    )


def compile_case(case: Case) -> Usage:
    """Compile ``case`` for its target and read its usage (seconds: the compile's wall time)."""
    start = time.perf_counter()
    compiled = compile_kernel(case)
    seconds = time.perf_counter() - start
    if TARGETS[case.target].backend == "cuda":
        regs, spills = _nvidia_usage(compiled.asm["cubin"])
    else:
        regs, spills = _amd_usage(compiled.asm["amdgcn"])
    return Usage(regs, spills, compiled.metadata.shared, seconds)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel offline: which arguments are tensors of the input dtype or of
    float32, which are float scalars, which the common call passes as 1 (Triton specialises
    those into constants, so the binary that runs is the one without them), and which are
    tuples of ints (strides, sizes): name -> (length, indices of the elements that are 1)."""

    module: str
    name: str
    tensors: tuple[str, ...]
    float32_tensors: tuple[str, ...]
    float_scalars: tuple[str, ...]
    unit: tuple[str, ...]
    int_tuples: dict[str, tuple[int, tuple[int, ...]]] = dataclasses.field(default_factory=dict)

    def kernel(self):
        from . import attention, deform_conv2d

        return getattr({"attention": attention, "deform_conv2d": deform_conv2d}[self.module], self.name)

    def jit_function(self) -> triton.runtime.JITFunction:
        kernel = self.kernel()
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(
                f"{self.name} is not a compilable Triton kernel here ({type(fn).__name__}); "
                "run with TRITON_INTERPRET unset"
            )
        return fn

    def signature(self, fn: triton.runtime.JITFunction, case: Case) -> tuple[dict, dict, dict]:
        constexprs = {k: v for k, v in self.constants(case).items() if k in fn.arg_names}
        constexprs.update({k: v for k, v in case.config.kwargs.items() if k in fn.arg_names})
        signature: dict[str, object] = {}
        attrs: dict[tuple[int], list] = {}
        for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
            if name in self.int_tuples:
                length, units = self.int_tuples[name]
                signature[name] = tuple("constexpr" if i in units else "i32" for i in range(length))
                constexprs.update({(index, unit): 1 for unit in units})
            elif param.is_constexpr or name in self.unit:
                signature[name] = "constexpr"
                if name in self.unit:
                    constexprs[name] = 1
            elif name in self.tensors or name in self.float32_tensors:
                signature[name] = "*" + (_TYPES[case.dtype] if name in self.tensors else "fp32")
                attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
            elif name in self.float_scalars:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        missing = [n for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr and n not in constexprs]
        if missing:
            raise RuntimeError(f"{self.name}: no value for the constexpr arguments {missing}")
        return signature, constexprs, attrs

    def constants(self, case: Case) -> dict:
        if self.module == "deform_conv2d":
            return dict(HAS_MASK=True, HAS_BIAS=True, DOT_PRECISION="ieee" if case.dtype == "float32" else None)
        # float32 products: IEEE unless the user allowed TF32 (attention._precision); AMD never TF32.
        precision = "tf32" if case.dtype == "float32+tf32" else "ieee"
        values = dict(BLOCK_D=case.head_dim, PRECISION=precision)
        if case.t_pad:
            values["T_PAD"] = case.t_pad
        return values


_Q = ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")
# (B, Z, N, heads, d) strides, whose head-dim stride is 1 for the views of a packed projection,
# and the contiguous (B, Z, heads, N) lse's.
_STRIDES = {**{name: (5, (4,)) for name in ("sq", "sk", "sv", "so", "sg", "sdq", "sdk", "sdv")}, "sl": (4, (3,))}
_ATTENTION = dict(
    module="attention",
    tensors=_Q,
    float32_tensors=("LSE", "DELTA"),
    float_scalars=("qk_scale", "scale"),
    unit=(),
    int_tuples=_STRIDES,
)
# The deformable convolutions of the model: 3x3, stride 1, padding 1, dilation 1 (every
# element of `sampling`; `sizes` has none that is 1).
_DEFORM = dict(
    module="deform_conv2d",
    tensors=("x_ptr", "off_ptr", "mask_ptr", "w_ptr", "b_ptr", "out_ptr", "gout_ptr"),
    float32_tensors=("gx_ptr", "goff_ptr", "gmask_ptr", "gw_ptr"),
    float_scalars=(),
    unit=(),
    int_tuples={"sizes": (10, ()), "sampling": (6, (0, 1, 2, 3, 4, 5))},
)

_ATTENTION_KERNELS = (
    "_flash_forward",
    "_flash_backward_dkdv",
    "_flash_backward_dq",
    "_packed_forward",
    "_packed_backward",
)
_DEFORM_KERNELS = ("_forward_kernel", "_grad_input_kernel", "_grad_weight_kernel")
KERNELS: dict[str, KernelSpec] = {
    **{name: KernelSpec(name=name, **_ATTENTION) for name in _ATTENTION_KERNELS},
    **{name: KernelSpec(name=name, **_DEFORM) for name in _DEFORM_KERNELS},
}


HEAD_DIMS_FULL = (16, 32, 64, 128, 256)
DTYPES_FULL = ("float32", "float32+tf32", "float16", "bfloat16")
# The (dtype, padded head dim) pairs of --defaults: 16-bit at the largest head dim (every tile,
# and with them shared memory and registers, grows with d), and float32 IEEE (FMA products,
# operands in shared memory) at the model's head dims (7-16). float32 at d = 128 compiles for
# minutes per large-tile configuration (11 minutes at 128 x 128 on sm_80), so it is left to --full.
SHAPES_DEFAULTS = (("bfloat16", 128), ("float32", 16))
# What CI compiles in its ~90 s on 2 cores (each compile takes 3-18 s there), as (targets,
# kernels, shapes): every default attention list at bf16 d = 128 on sm_80 (the code sm_86/89 run
# too, so checked against 163 KB and 99 KB), the forward's on gfx90a (64 KB of LDS), the
# deformable kernels in float32 on both. sm_90, gfx942 and the other shapes are --defaults/--full.
CI_GROUPS = (
    (("sm_80",), _ATTENTION_KERNELS, (("bfloat16", 128),)),
    (("gfx90a",), ("_flash_forward",), (("bfloat16", 128),)),
    (("sm_80", "gfx90a"), _DEFORM_KERNELS, (("float32", 0),)),
)


def _packed_shapes(budget: int, head_dims: Iterable[int]) -> list[tuple[int, int]]:
    """(T_PAD, BLOCK_D) pairs that the packed kernel with ``budget`` takes."""
    from . import attention

    return [(t, d) for t in (16, 32, 64, 128, 256) for d in head_dims if attention._packed_fits(t, d, budget)]


def cases(targets: Sequence[str], kernels: Sequence[str], shapes: Sequence[tuple[str, int]], full: bool) -> list[Case]:
    """Every configuration autotuning may choose for each kernel, (dtype, head dim) and target:
    the default list (and with ``full`` the ``STT_TRITON_FULL_TUNE=1`` list), after the kernel's
    own shape pruning at the sequence lengths that keep the most configurations."""
    from . import attention, deform_conv2d

    out = []
    for target_name in targets:
        target = TARGETS[target_name]
        for kernel in kernels:
            for dtype in dict.fromkeys(d for d, _ in shapes):
                head_dims = [h for d, h in shapes if d == dtype]
                if dtype == "float32+tf32" and target.backend == "hip":
                    continue  # attention._precision never asks AMD for TF32
                if KERNELS[kernel].module == "deform_conv2d":
                    if dtype == "float32+tf32":
                        continue  # float32 deformable products are always IEEE
                    out.append(Case(kernel, deform_conv2d.block_config(kernel), dtype, 0, 0, target_name, True))
                    continue
                tuning = attention.TUNING[kernel]
                default = tuning.configs("default", target.backend)
                listed = tuning.configs("full", target.backend) if full else default
                if kernel.startswith("_packed"):
                    sizes = _packed_shapes(attention.packed_budget(kernel), head_dims)
                else:
                    sizes = [(0, d) for d in head_dims]
                for t_pad, d in sizes:
                    chosen = listed
                    if t_pad:
                        chosen = attention._prune_packed(kernel)(listed, {}, T_PAD=t_pad, BLOCK_D=d)
                    out.extend(Case(kernel, c, dtype, d, t_pad, target_name, c in default) for c in chosen)
    return out


def ci_cases() -> list[Case]:
    """The cases of :data:`CI_GROUPS`."""
    return [c for targets, kernels, shapes in CI_GROUPS for c in cases(targets, kernels, shapes, False)]


def _element_size(dtype: str) -> int:
    return 4 if dtype.startswith("float32") else 2


def judge(case: Case, usage: Optional[Usage], error: Optional[str]) -> Result:
    """The problems of one compiled case, and the devices on which run-time pruning drops it."""
    from . import attention

    if usage is None:
        return Result(case, None, (f"compile failed: {error}",), ())
    target = TARGETS[case.target]
    problems = []
    if usage.registers > target.max_registers:
        problems.append(f"{usage.registers} registers > {target.max_registers}")
    threads = case.config.num_warps * target.warp_size
    if target.registers_per_block and usage.registers * threads > target.registers_per_block:
        problems.append(f"{usage.registers} registers x {threads} threads > {target.registers_per_block}")
    pruned = []
    for device, limit in target.shared_limits:
        if KERNELS[case.kernel].module == "attention":
            keep = attention.fits_shared(
                case.kernel, case.config, _element_size(case.dtype), case.head_dim, case.t_pad, limit, target.backend
            )
        else:
            keep = True  # fixed blocks: nothing to fall back on
        if not keep:
            pruned.append(device)
        elif usage.shared > limit:
            problems.append(
                f"{usage.shared / KB:.1f} KB shared > {limit // KB} KB on {device}, yet run-time pruning keeps it"
            )
    return Result(case, usage, tuple(problems), tuple(pruned))


def empty_choices(results: Sequence[Result]) -> list[str]:
    """Kernel/shape/device combinations for which pruning leaves no default configuration that
    spills at most :data:`SPILL_ALLOWANCE` bytes."""
    groups: dict[tuple, list[bool]] = {}
    for r in results:
        if not r.case.default:
            continue
        for device, _ in TARGETS[r.case.target].shared_limits:
            key = (r.case.kernel, r.case.dtype, r.case.head_dim, r.case.t_pad, device)
            groups.setdefault(key, []).append(
                device not in r.pruned_on and not r.problems and r.usage.spills <= SPILL_ALLOWANCE
            )
    return [
        f"{k} d={d} t={t} {dtype} on {device}: no default configuration fits without spilling"
        for (k, dtype, d, t, device), ok in groups.items()
        if not any(ok)
    ]


def _run(case: Case) -> tuple[Case, Optional[Usage], Optional[str]]:
    try:
        return case, compile_case(case), None
    except Exception as exc:  # noqa: BLE001 - reported as that case's failure
        return case, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def check(selected: Sequence[Case], jobs: int) -> list[Result]:
    """Compile ``selected`` with ``jobs`` processes and judge each."""
    if jobs <= 1:
        done = [_run(c) for c in selected]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            done = list(pool.map(_run, selected, chunksize=1))
    return [judge(*d) for d in done]


def table(results: Sequence[Result]) -> str:
    """A markdown table, one row per compiled case."""
    lines = [
        "| kernel | config | dtype | head dim | T_PAD | target | registers | shared (KB) | spills (B) "
        "| compile (s) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        c, u = r.case, r.usage
        verdict = "; ".join(r.problems) if r.problems else "ok"
        if r.pruned_on and not r.problems:
            verdict = "pruned on " + ", ".join(r.pruned_on)
        figures = f"{u.registers} | {u.shared / KB:.1f} | {u.spills} | {u.seconds:.1f}" if u else "- | - | - | -"
        lines.append(
            f"| {c.kernel} | {c.config_text()}{'' if c.default else ' (full)'} | {c.dtype} "
            f"| {c.head_dim or '-'} | {c.t_pad or '-'} | {c.target} | {figures} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stt_kernels.triton.resources",
        description="Compile every Triton kernel configuration offline and check registers, shared memory "
        "and spills against each target's limits.",
        epilog="examples:\n  python -m stt_kernels.triton.resources --out table.md\n"
        "  python -m stt_kernels.triton.resources --full --targets sm_90 --kernels _flash_forward",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--defaults",
        action="store_true",
        help="the default lists in bfloat16 at head dim 128 and float32 at 16 on every target (216 compiles, ~10 minutes on 2 cores)",
    )
    scope.add_argument(
        "--full",
        action="store_true",
        help="the STT_TRITON_FULL_TUNE=1 lists at every head dim and dtype (hours on 2 cores)",
    )
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="default: all (CI: its groups)")
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), help="default: all (CI: its groups)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES_FULL,
        help="compile these dtypes, each at every --head-dims (all four if not given); without either, "
        "the scope's own (dtype, head dim) pairs",
    )
    parser.add_argument(
        "--head-dims",
        nargs="+",
        type=int,
        choices=HEAD_DIMS_FULL,
        help="padded head dims (BLOCK_D), each with every --dtypes (all five if not given)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument(
        "--out", type=Path, help="write the table to this file (refused if it exists, unless --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter's kernels cannot be compiled; unset it")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.out is not None and args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    chosen = [args.full, args.defaults, args.targets, args.kernels, args.dtypes, args.head_dims]
    if not any(chosen):
        selected = ci_cases()
    else:
        if args.full or args.dtypes or args.head_dims:
            shapes = [(d, h) for d in args.dtypes or DTYPES_FULL for h in args.head_dims or HEAD_DIMS_FULL]
        else:
            shapes = list(SHAPES_DEFAULTS)
        selected = cases(args.targets or list(TARGETS), args.kernels or list(KERNELS), shapes, args.full)
    start = time.perf_counter()
    results = check(selected, args.jobs)
    failures = [
        f"{r.case.kernel} [{r.case.config_text()}] {r.case.dtype} d={r.case.head_dim} "
        f"t={r.case.t_pad} {r.case.target}: {p}"
        for r in results
        for p in r.problems
    ]
    failures += empty_choices(results)
    text = table(results)
    if args.out is not None:
        _write(args.out, text)
    else:
        sys.stdout.write(text)
    print(
        f"{len(results)} compilations in {time.perf_counter() - start:.0f} s, {len(failures)} problems", file=sys.stderr
    )
    for line in failures:
        print("FAIL " + line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
