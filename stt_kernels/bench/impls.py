"""The implementations under test: ours (the public ops and the block on every backend, the
``reference`` backend among them) and the peers (torch's SDPA on each of its backends,
FlexAttention, flash-attn and xformers where installed, torchvision's deformable convolution),
and :func:`prepare`, which turns one combination into a step to time, or says why it cannot run.

Attention peers get the strided ``(B, T, H, W, heads, d)`` views ours get and return the same
contiguous layout: the permutes and copies their own layouts need are timed with them. Spatial
attention maps onto their batch of sequences as a view; temporal attention needs a copy.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F

import stt_kernels
from stt_kernels.backend import CAPABILITIES, BackendUnavailableError, claimed_dtypes

from ..ops.kernels import attention_kernels, deform_conv2d_kernels
from .cases import Case, Shape, sst_module

KINDS = ("ours", "reference", "peer")


class Unsupported(Exception):
    """This implementation cannot run this combination; the row is ``skipped`` with the message."""


@dataclass(frozen=True)
class Implementation:
    """One way to compute a case.

    ``call`` takes the case's arguments and returns its output; ``make_step``, instead, for work
    that is not one differentiable call (a training step): given the shape, the leaves and the
    pass it sets up and returns the step to time. ``devices``: the device types it is listed for;
    ``unsupported(device, dtype, pass)``: why it cannot run a listed combination, or ``None``;
    ``context``: entered around every call (an SDPA backend choice).
    """

    name: str
    op: str
    kind: str
    call: Optional[Callable[..., torch.Tensor]] = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    unsupported: Callable[[torch.device, torch.dtype, str], Optional[str]] = lambda device, dtype, pass_: None
    context: Callable[[], ContextManager[object]] = field(default=contextlib.nullcontext)
    make_step: Optional[Callable[[Shape, Sequence[torch.Tensor], str], Callable[[], None]]] = None

    def __post_init__(self) -> None:
        if (self.call is None) == (self.make_step is None):
            raise ValueError(f"{self.name}: give exactly one of call and make_step")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")


IMPLEMENTATIONS: list[Implementation] = []


def register_implementation(implementation: Implementation) -> Implementation:
    if any(i.op == implementation.op and i.name == implementation.name for i in IMPLEMENTATIONS):
        raise ValueError(f"{implementation.name!r} is registered for {implementation.op!r} already")
    IMPLEMENTATIONS.append(implementation)
    return implementation


def find(op: str, name: str) -> Implementation:
    return next(i for i in IMPLEMENTATIONS if i.op == op and i.name == name)


# --- ours -------------------------------------------------------------------------------------

BACKEND_DEVICES = {name: tuple(d for d in cap.devices if d != "meta") for name, cap in CAPABILITIES.items()}


def backend_unsupported(backend: str, device: torch.device, dtype: torch.dtype, pass_: str,
                        ops: Sequence[str] = ("attention", "deform_conv2d")) -> Optional[str]:
    """Why ``backend`` cannot run ``ops`` here in ``dtype``, or ``None``; cases built on our ops
    (the block, the model's training step) share it."""
    status = stt_kernels.backends()[backend]
    if not status.available:
        return f"backend {backend!r} unavailable: {status.reason}"
    if ops == ("attention", "deform_conv2d") and backend not in (attention_kernels.implemented()
                                                                 & deform_conv2d_kernels.implemented()):
        return f"backend {backend!r} lacks a kernel for one of the block's ops"
    missing = [op for op in ops if dtype not in claimed_dtypes(backend, op)]
    return f"backend {backend!r} does not claim {dtype} for {missing[0]}" if missing else None


def register_backends(op: str, call: Optional[Callable[[str], Callable[..., torch.Tensor]]] = None,
                      make_step: Optional[Callable[..., Callable[[], None]]] = None,
                      unsupported: Callable[..., Optional[str]] = backend_unsupported) -> None:
    """``ours:<backend>`` and ``reference`` for ``op``: ``call(backend)`` gives the callable, or
    ``make_step(backend, shape, leaves, pass)`` the step."""
    for backend, devices in BACKEND_DEVICES.items():
        register_implementation(Implementation(
            "reference" if backend == "reference" else f"ours:{backend}", op,
            "reference" if backend == "reference" else "ours", call=call(backend) if call else None,
            make_step=functools.partial(make_step, backend) if make_step else None, devices=devices,
            unsupported=functools.partial(unsupported, backend)))


for _name in ("spatial_attention", "temporal_attention", "deform_conv2d"):
    register_backends(_name, lambda b, op=getattr(stt_kernels, _name): functools.partial(op, backend=b),
                      unsupported=lambda b, device, dtype, pass_, op=_name: backend_unsupported(b, device, dtype,
                                                                                                pass_, (op,)))


def _block_step(backend: str, shape: Shape, leaves: Sequence[torch.Tensor], pass_: str) -> Callable[[], None]:
    module = sst_module(shape.channels, shape.heads, leaves[0].dtype, leaves[0].device)
    params = [leaves[0].requires_grad_(pass_ != "forward"), *module.parameters()]

    def step() -> None:
        with stt_kernels.use_backend(backend), torch.set_grad_enabled(pass_ != "forward"):
            out = module(leaves[0])
            if pass_ != "forward":
                torch.autograd.grad(out, params, torch.ones_like(out))
    return step


register_backends("sst_attention", make_step=_block_step)


# --- peers ------------------------------------------------------------------------------------

def to_sequences(x: torch.Tensor, op: str) -> torch.Tensor:
    """``(B, T, H, W, heads, d)`` -> ``(sequences, N, heads, d)``; a view for spatial attention."""
    b, t, h, w, heads, d = x.shape
    if op == "spatial_attention":
        return x.flatten(0, 1).flatten(1, 2)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b * h * w, t, heads, d)


def from_sequences(out: torch.Tensor, like: torch.Tensor, op: str) -> torch.Tensor:
    b, t, h, w, heads, d = like.shape
    if op == "spatial_attention":
        return out.reshape(b, t, h, w, heads, d).contiguous()
    return out.reshape(b, h, w, t, heads, d).permute(0, 3, 1, 2, 4, 5).contiguous()


def _heads_first(op: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An adapter for attention functions on ``(sequences, heads, N, d)``."""
    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = fn(*(to_sequences(x, op).transpose(1, 2) for x in (q, k, v)))
        return from_sequences(out.transpose(1, 2), q, op)
    return call


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
            raise Unsupported(f"SDPA's {backend} backend declined on {qkv[0].device.type} "
                              f"({qkv[0].dtype}, d={qkv[0].shape[-1]}): {why}") from None


def _sdpa_context(backend: str) -> ContextManager[object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend])


@functools.lru_cache(maxsize=1)
def _flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # eager flex_attention is a slow reference


def _flash_attn(*qkv: torch.Tensor) -> torch.Tensor:  # flash-attn and xformers take (sequences, N, heads, d)
    from flash_attn import flash_attn_func

    return flash_attn_func(*(x.transpose(1, 2) for x in qkv)).transpose(1, 2)


def _xformers(*qkv: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(*(x.transpose(1, 2) for x in qkv)).transpose(1, 2)


def _needs(module: str, half_only: bool = False) -> Callable[[torch.device, torch.dtype, str], Optional[str]]:
    def unsupported(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{module.split('.')[0]} is not installed"
        if module == "torchvision":
            import torchvision  # noqa: F401  (loads its compiled ops, or fails to)

            if not hasattr(torch.ops.torchvision, "deform_conv2d"):
                return "torchvision's compiled ops did not load (built for another torch?)"
        if half_only and dtype not in (torch.float16, torch.bfloat16):
            return f"{module} runs float16/bfloat16 only"
        return None
    return unsupported


def _torchvision(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


for _op in ("spatial_attention", "temporal_attention"):
    for _backend in ("math", "efficient", "flash", "cudnn"):
        register_implementation(Implementation(
            f"sdpa:{_backend}", _op, "peer", _heads_first(_op, functools.partial(_sdpa, _backend)),
            unsupported=_needs("torch.nn.attention"), context=functools.partial(_sdpa_context, _backend)))
    register_implementation(Implementation("flex_attention", _op, "peer",
                                           _heads_first(_op, lambda *qkv: _flex()(*qkv)), ("cuda",)))
    register_implementation(Implementation("flash-attn", _op, "peer", _heads_first(_op, _flash_attn), ("cuda",),
                                           _needs("flash_attn", half_only=True)))
    register_implementation(Implementation("xformers", _op, "peer", _heads_first(_op, _xformers), ("cuda",),
                                           _needs("xformers")))
register_implementation(Implementation("torchvision", "deform_conv2d", "peer", _torchvision,
                                       unsupported=_needs("torchvision")))


# --- one combination --------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    """An allocation failure on any device (a capped CPU allocator raises a plain RuntimeError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (isinstance(exc, RuntimeError) and any(
        m in str(exc).lower() for m in ("out of memory", "can't allocate memory", "cannot allocate memory")))


def classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` of a failed combination: ``OOM``, ``skipped`` or ``error``."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if is_oom(exc):
        return "OOM", f"{type(exc).__name__}: {first_line}"
    if isinstance(exc, Unsupported):
        return "skipped", first_line
    return "error", f"{type(exc).__name__}: {first_line}"


def prepare(case: Case, implementation: Implementation, shape: Shape, dtype: torch.dtype,
            device: torch.device, pass_: str, seed: int = 0) -> Callable[[], None]:
    """The step that runs one pass (gradients of every leaf by ``torch.autograd.grad``, so nothing
    accumulates between steps), run once here so that a combination that cannot run fails now.

    Raises :class:`Unsupported` where the implementation declines (any failure of a peer's first
    call too: their limits are theirs to document); OOM and our own errors go through.
    """
    if (reason := implementation.unsupported(device, dtype, pass_)) is not None:
        raise Unsupported(reason)
    generator = torch.Generator().manual_seed(seed)
    leaves = case.leaves(shape, dtype, device, generator)

    def forward() -> torch.Tensor:
        with implementation.context():
            return implementation.call(*case.arguments(leaves))

    try:
        if implementation.make_step is not None:
            step = implementation.make_step(shape, leaves, pass_)
        elif pass_ == "forward":
            def step() -> None:
                with torch.no_grad():
                    forward()
        else:
            for leaf in leaves:
                leaf.requires_grad_(True)
            with torch.no_grad():
                out = forward()
            grad_out = torch.randn(out.shape, generator=generator).to(device=device, dtype=out.dtype)

            def step() -> None:
                torch.autograd.grad(forward(), leaves, grad_out)
        step()
    except (NotImplementedError, BackendUnavailableError) as exc:
        raise Unsupported(str(exc)) from None
    except Exception as exc:
        if implementation.kind == "peer" and not is_oom(exc) and not isinstance(exc, Unsupported):
            raise Unsupported(f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
        raise
    return step

