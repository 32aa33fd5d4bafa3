"""The implementations under test, ours (every case on every backend, ``reference`` among them) and
the peers (torch's SDPA on each of its backends, FlexAttention on GPUs, torchvision's deformable
convolution), and :func:`prepare`, which makes one combination a step to time or says why not.

Attention peers get the strided ``(B, T, H, W, heads, d)`` views ours get and return the same
contiguous layout: the permutes and copies their layouts need are timed with them (a view for
spatial attention, a copy for temporal attention).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F

import stt_kernels
from stt_kernels.backend import CAPABILITIES, BackendUnavailableError, claimed_dtypes

from ..ops.kernels import attention_kernels, deform_conv2d_kernels
from .cases import Case, Shape, sst_module

Declines = Callable[[torch.device, torch.dtype, str], Optional[str]]


class Unsupported(Exception):
    """This implementation cannot run this combination; the row is ``skipped`` with the message."""


@dataclass(frozen=True)
class Implementation:
    """One way to compute a case: ``call(*case.arguments(leaves))``, or for work that is not one
    differentiable call (a training step) ``make_step(shape, leaves, pass)``, which sets up and
    returns the step. ``devices``: the device types it is listed for; ``unsupported(device, dtype,
    pass)``: why it cannot run a listed combination, or ``None``; ``context``: entered around every
    call (an SDPA backend choice)."""

    name: str
    op: str
    kind: str  # ours | reference | peer
    call: Optional[Callable[..., torch.Tensor]] = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    unsupported: Declines = lambda device, dtype, pass_: None
    context: Callable[[], ContextManager[object]] = contextlib.nullcontext
    make_step: Optional[Callable[[Shape, Sequence[torch.Tensor], str], Callable[[], None]]] = None

    def __post_init__(self) -> None:
        if (self.call is None) == (self.make_step is None):
            raise ValueError(f"{self.name}: give exactly one of call and make_step")
        if self.kind not in ("ours", "reference", "peer"):
            raise ValueError(f"kind must be one of ours, reference, peer; got {self.kind!r}")


IMPLEMENTATIONS: list[Implementation] = []


def register_implementation(implementation: Implementation) -> Implementation:
    if any(i.op == implementation.op and i.name == implementation.name for i in IMPLEMENTATIONS):
        raise ValueError(f"{implementation.name!r} is registered for {implementation.op!r} already")
    IMPLEMENTATIONS.append(implementation)
    return implementation


def find(op: str, name: str) -> Implementation:
    return next(i for i in IMPLEMENTATIONS if i.op == op and i.name == name)


BOTH_OPS = ("attention", "deform_conv2d")


def backend_unsupported(backend: str, *combination: object, ops: Sequence[str] = BOTH_OPS) -> Optional[str]:
    """Why ``backend`` cannot run ``ops`` here in ``dtype``, or ``None``; cases built on both ops
    (the block, the model's training step) take the default."""
    status = stt_kernels.backends()[backend]
    if not status.available:
        return f"backend {backend!r} unavailable: {status.reason}"
    if backend not in attention_kernels.implemented() & deform_conv2d_kernels.implemented() and len(ops) == 2:
        return f"backend {backend!r} lacks a kernel for one of the block's ops"
    dtype = combination[1]  # (device, dtype, pass)
    missing = [op for op in ops if dtype not in claimed_dtypes(backend, op)]
    return f"backend {backend!r} does not claim {dtype} for {missing[0]}" if missing else None


def register_backends(
    op: str,
    call: Optional[Callable] = None,
    make_step: Optional[Callable] = None,
    unsupported: Callable[..., Optional[str]] = backend_unsupported,
) -> None:
    """``ours:<backend>`` and ``reference`` for ``op``: ``call(backend)`` gives the callable, or
    ``make_step(backend, shape, leaves, pass)`` the step."""
    for backend, cap in CAPABILITIES.items():
        name, kind = ("reference", "reference") if backend == "reference" else (f"ours:{backend}", "ours")
        step = functools.partial(make_step, backend) if make_step else None
        devices = tuple(d for d in cap.devices if d != "meta")
        declines = functools.partial(unsupported, backend)
        register_implementation(
            Implementation(name, op, kind, call and call(backend), devices, declines, make_step=step)
        )


def _op_call(op: str) -> Callable[[str], Callable[..., torch.Tensor]]:
    return lambda backend: functools.partial(getattr(stt_kernels, op), backend=backend)


def _op_unsupported(op: str) -> Callable[..., Optional[str]]:
    return lambda backend, *combination: backend_unsupported(backend, *combination, ops=(op,))


for _op in ("spatial_attention", "temporal_attention", "deform_conv2d"):
    register_backends(_op, _op_call(_op), unsupported=_op_unsupported(_op))


def _block_step(backend: str, shape: Shape, leaves: Sequence[torch.Tensor], pass_: str) -> Callable[[], None]:
    module = sst_module(shape.channels, shape.heads, leaves[0].dtype, leaves[0].device)
    x, backward = leaves[0], pass_ == "forward+backward"
    wrt = [x.requires_grad_(backward), *module.parameters()]

    def step() -> None:
        with stt_kernels.use_backend(backend), torch.set_grad_enabled(backward):
            out = module(x)
            if backward:
                torch.autograd.grad(out, wrt, torch.ones_like(out))

    return step


register_backends("sst_attention", make_step=_block_step)


def to_sequences(x: torch.Tensor, op: str) -> torch.Tensor:
    """``(B, T, H, W, heads, d)`` -> ``(sequences, heads, N, d)``; a view for spatial attention."""
    if op == "spatial_attention":
        return x.flatten(0, 1).flatten(1, 2).transpose(1, 2)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(-1, *x.shape[1:2], *x.shape[4:]).transpose(1, 2)


def from_sequences(out: torch.Tensor, like: torch.Tensor, op: str) -> torch.Tensor:
    """Back to a contiguous ``(B, T, H, W, heads, d)``."""
    b, t, h, w, heads, d = like.shape
    out = out.transpose(1, 2)
    if op == "spatial_attention":
        return out.reshape(b, t, h, w, heads, d).contiguous()
    return out.reshape(b, h, w, t, heads, d).permute(0, 3, 1, 2, 4, 5).contiguous()


def _sequences_peer(op: str, attend: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda q, k, v: from_sequences(attend(*(to_sequences(x, op) for x in (q, k, v))), q, op)


def _sdpa(backend: str, *qkv: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return F.scaled_dot_product_attention(*qkv)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in ("No available kernel", "No viable backend")):
                raise
            # On a GPU, SDPA says why each backend declined in warnings, not in the exception.
            why = "; ".join(str(w.message).splitlines()[0] for w in caught) or "no kernel for these inputs"
            where = f"{qkv[0].device.type} ({qkv[0].dtype}, d={qkv[0].shape[-1]})"
            raise Unsupported(f"SDPA's {backend} backend declined on {where}: {why}") from None


def _sdpa_context(backend: str) -> ContextManager[object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return sdpa_kernel(getattr(SDPBackend, names[backend]))


@functools.lru_cache(maxsize=1)
def _flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # uncompiled, flex_attention is a slow reference


def _torchvision_unsupported(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    import torchvision  # noqa: F401  (loads its compiled ops, or fails to)

    loaded = hasattr(torch.ops.torchvision, "deform_conv2d")
    return None if loaded else "torchvision's compiled ops did not load (built for another torch?)"


def _torchvision(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *weight_bias: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, *weight_bias, padding=1, mask=mask)


for _op in ("spatial_attention", "temporal_attention"):
    for _backend in ("math", "efficient", "flash", "cudnn"):
        _context = functools.partial(_sdpa_context, _backend)
        _call = _sequences_peer(_op, functools.partial(_sdpa, _backend))
        register_implementation(Implementation(f"sdpa:{_backend}", _op, "peer", _call, context=_context))
    register_implementation(
        Implementation("flex_attention", _op, "peer", _sequences_peer(_op, lambda *qkv: _flex()(*qkv)), ("cuda",))
    )
register_implementation(
    Implementation("torchvision", "deform_conv2d", "peer", _torchvision, unsupported=_torchvision_unsupported)
)


def is_oom(exc: BaseException) -> bool:
    """An allocation failure on any device (a capped CPU allocator raises a plain RuntimeError)."""
    oom_words = ("out of memory", "can't allocate memory", "cannot allocate memory")
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in oom_words)
    )


def classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` of a failed combination: ``OOM``, ``skipped`` or ``error``."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, Unsupported) and not is_oom(exc):
        return "skipped", first_line
    return "OOM" if is_oom(exc) else "error", f"{type(exc).__name__}: {first_line}"


def prepare(
    case: Case, implementation: Implementation, shape: Shape, dtype: torch.dtype, device: torch.device, pass_: str
) -> Callable[[], None]:
    """The step of one pass (gradients of every leaf by ``torch.autograd.grad``, so nothing
    accumulates between steps), run once here so that a combination that cannot run fails now:
    :class:`Unsupported` where the implementation declines (any failure of a peer's first call too:
    their limits are theirs to document); OOM and our own errors go through."""
    if (reason := implementation.unsupported(device, dtype, pass_)) is not None:
        raise Unsupported(reason)
    generator = torch.Generator().manual_seed(0)
    leaves = case.leaves(shape, dtype, device, generator)

    def forward() -> torch.Tensor:
        with implementation.context():
            return implementation.call(*case.arguments(leaves))

    try:
        if implementation.make_step is not None:
            step = implementation.make_step(shape, leaves, pass_)
        elif pass_ == "forward":
            step = torch.no_grad()(forward)
        else:
            with torch.no_grad():
                out = forward()
            grad_out = torch.randn(out.shape, generator=generator).to(device=device, dtype=out.dtype)
            for leaf in leaves:
                leaf.requires_grad_(True)
            step = lambda: torch.autograd.grad(forward(), leaves, grad_out)
        step()
    except (NotImplementedError, BackendUnavailableError) as exc:
        raise Unsupported(str(exc)) from None
    except Exception as exc:
        if implementation.kind == "peer" and not is_oom(exc) and not isinstance(exc, Unsupported):
            raise Unsupported(f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
        raise
    return step
