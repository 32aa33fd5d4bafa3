"""The implementations under test, ours (every case on every backend, ``reference`` among them) and
the peers: torch's SDPA on each of its backends, FlexAttention on GPUs, torchvision's deformable
convolution, and for the block ``stock``, the same block built from those stock parts. And
:func:`prepare`, which makes one combination a step to time or says why not.

Attention peers get the packed ``(B, T, H, W, 3, heads, d)`` projection ours get and return the
same contiguous ``(B, T, H, W, heads, d)``: the permutes and copies their layouts need are timed
with them (a view for spatial attention, a copy for temporal attention).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import stt_kernels
from stt_kernels.backend import CAPABILITIES, BackendUnavailableError, claimed_dtypes

from ..ops.kernels import attention_kernels, deform_conv2d_kernels
from .cases import Case, Shape, Tensors, sst_module

Step = Callable[[], object]
MakeStep = Callable[[Shape, Tensors, str], Step]  # (shape, leaves, pass) -> the step, set up


class Unsupported(Exception):
    """This implementation cannot run this combination; the row is ``skipped`` with the message."""


@dataclass(frozen=True)
class Implementation:
    """One way to compute a case: ``make_step(shape, leaves, pass)`` sets up the step to time
    (:func:`differentiable` makes it for one call). ``devices``: the device types it is listed
    for; ``unsupported(dtype)``: why it cannot run in ``dtype`` here, or ``None``."""

    name: str
    op: str
    kind: str  # ours | reference | peer
    make_step: MakeStep
    devices: tuple[str, ...] = ("cpu", "cuda")
    unsupported: Callable[[torch.dtype], Optional[str]] = lambda dtype: None

    def __post_init__(self) -> None:
        if self.kind not in ("ours", "reference", "peer"):
            raise ValueError(f"kind must be one of ours, reference, peer; got {self.kind!r}")


IMPLEMENTATIONS: list[Implementation] = []


def register_implementation(implementation: Implementation) -> Implementation:
    if any(i.op == implementation.op and i.name == implementation.name for i in IMPLEMENTATIONS):
        raise ValueError(f"{implementation.name!r} is registered for {implementation.op!r} already")
    IMPLEMENTATIONS.append(implementation)
    return implementation


def differentiable(call: Callable[..., torch.Tensor]) -> MakeStep:
    """The step of ``call(*leaves)``: the forward without autograd, or the forward and every leaf's
    gradient by ``torch.autograd.grad`` (nothing accumulates between steps) for a fixed ``dout``."""

    def make_step(shape: Shape, leaves: Tensors, pass_: str) -> Step:
        if pass_ == "forward":
            return torch.no_grad()(lambda: call(*leaves))
        with torch.no_grad():
            out = call(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        for leaf in leaves:
            leaf.requires_grad_(True)
        return lambda: torch.autograd.grad(call(*leaves), leaves, grad_out)

    return make_step


_TABLES = {"attention": attention_kernels, "deform_conv2d": deform_conv2d_kernels}


def backend_unsupported(backend: str, dtype: torch.dtype, ops: Sequence[str] = tuple(_TABLES)) -> Optional[str]:
    """Why ``backend`` cannot run ``ops`` (``attention``, ``deform_conv2d``) in ``dtype`` here, or
    ``None``; cases built on both (the block, the model's steps) take the default."""
    status = stt_kernels.backends()[backend]
    if not status.available:
        return f"backend {backend!r} unavailable: {status.reason}"
    if missing := [op for op in ops if backend not in _TABLES[op].implemented()]:
        return f"backend {backend!r} lacks a kernel for {missing[0]}"
    missing = [op for op in ops if dtype not in claimed_dtypes(backend, op)]
    return f"backend {backend!r} does not claim {dtype} for {missing[0]}" if missing else None


def register_backends(op: str, make_step: Callable[[str], MakeStep], ops: Sequence[str] = tuple(_TABLES)) -> None:
    """``ours:<backend>`` and ``reference`` for ``op``, running ``make_step(backend)``; ``ops``:
    the ops it is built on (a backend without one of them declines)."""
    for backend, capability in CAPABILITIES.items():
        name, kind = ("reference", "reference") if backend == "reference" else (f"ours:{backend}", "ours")
        devices = tuple(d for d in capability.devices if d != "meta")
        declines = functools.partial(backend_unsupported, backend, ops=ops)
        register_implementation(Implementation(name, op, kind, make_step(backend), devices, declines))


def _block_step(forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], backend: str = "auto") -> MakeStep:
    """The block's step: ``forward(block, x)`` of the seeded block of the shape on ``backend``, and
    in ``forward+backward`` the gradients of ``x`` and of every parameter."""

    def make_step(shape: Shape, leaves: Tensors, pass_: str) -> Step:
        (x,), backward = leaves, pass_ == "forward+backward"
        block = sst_module(shape.channels, shape.heads, x.dtype, x.device)
        wrt = [x.requires_grad_(backward), *block.parameters()]

        def step() -> None:
            with stt_kernels.use_backend(backend), torch.set_grad_enabled(backward):
                out = forward(block, x)
                if backward:
                    torch.autograd.grad(out, wrt, torch.ones_like(out))

        return step

    return make_step


def in_sequences(op: str, attend: Callable[..., torch.Tensor], qkv: torch.Tensor) -> torch.Tensor:
    """``attend(q, k, v)`` on the ``(sequences, heads, N, d)`` layout that SDPA takes, from a packed
    ``qkv (B, T, H, W, 3, heads, d)``; returns a contiguous ``(B, T, H, W, heads, d)``."""
    b, t, h, w, _, heads, d = qkv.shape
    if op == "spatial_attention":
        out = attend(*(x.flatten(0, 1).flatten(1, 2).transpose(1, 2) for x in qkv.unbind(4)))  # views
        return out.transpose(1, 2).reshape(b, t, h, w, heads, d).contiguous()
    out = attend(*(x.permute(0, 2, 3, 1, 4, 5).flatten(0, 2).transpose(1, 2) for x in qkv.unbind(4)))
    return out.transpose(1, 2).reshape(b, h, w, t, heads, d).permute(0, 3, 1, 2, 4, 5).contiguous()


SDPA_BACKENDS = dict(math="MATH", efficient="EFFICIENT_ATTENTION", flash="FLASH_ATTENTION", cudnn="CUDNN_ATTENTION")


def _sdpa(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend])), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in ("No available kernel", "No viable backend")):
                raise
            # On a GPU, SDPA says why each backend declined in warnings, not in the exception.
            why = "; ".join(str(w.message).splitlines()[0] for w in caught) or "no kernel for these inputs"
            where = f"{q.device.type} ({q.dtype}, d={q.shape[-1]})"
            raise Unsupported(f"SDPA's {backend} backend declined on {where}: {why}") from None


@functools.cache
def _flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # uncompiled, flex_attention is a slow reference


def _no_torchvision(dtype: torch.dtype) -> Optional[str]:
    try:
        import torchvision  # noqa: F401  (loads its compiled ops, or fails to)
    except ImportError:
        return "torchvision is not installed"
    loaded = hasattr(torch.ops.torchvision, "deform_conv2d")
    return None if loaded else "torchvision's compiled ops did not load (built for another torch?)"


def stock_sst_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` (an ``SSTAttention``, split order, deformable fusion) as a user would write it
    from stock parts, without stt_kernels: the block's own LayerNorm, projections and offset
    predictor, ``F.scaled_dot_product_attention`` for both attentions (on the layouts it takes, the
    copies included) and ``torchvision.ops.deform_conv2d`` for the fusion. The same weights, so the
    same numbers (``tests/test_bench.py`` checks it, forward and gradients)."""
    from torchvision.ops import deform_conv2d

    if block.order != "split" or block.fusion_kind != "deformable":
        raise ValueError(f"the stock block is the paper's (split, deformable); got {block.extra_repr()}")
    b, c, t, h, w = x.shape
    u = block.norm(x.permute(0, 2, 3, 4, 1))  # (B, T, H, W, C)

    def branch(attention: torch.nn.Module, op: str) -> torch.Tensor:
        qkv = attention.qkv(u).unflatten(-1, (3, attention.heads, attention.head_dim))
        return attention.proj(in_sequences(op, F.scaled_dot_product_attention, qkv).flatten(-2))

    spatial, temporal = branch(block.spatial, "spatial_attention"), branch(block.temporal, "temporal_attention")
    fusion, taps = block.fusion, block.fusion.offset_groups * block.fusion.kernel_size**2
    predicted = fusion.predictor(temporal.reshape(b * t, h, w, c).permute(0, 3, 1, 2))
    offset, mask = predicted.split([2 * taps, taps], dim=1)
    slices = spatial.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
    y = deform_conv2d(slices, offset, fusion.weight, fusion.bias, padding=fusion.kernel_size // 2, mask=mask.sigmoid())
    return x + y.unflatten(0, (b, t)).transpose(1, 2)


def _torchvision(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *weight_bias: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, *weight_bias, padding=1, mask=mask)


for _op in ("spatial_attention", "temporal_attention"):
    _ours = lambda backend, op=_op: differentiable(
        lambda qkv: getattr(stt_kernels, op)(*qkv.unbind(4), backend=backend)
    )
    register_backends(_op, _ours, ops=("attention",))
    for _backend in SDPA_BACKENDS:
        _call = functools.partial(in_sequences, _op, functools.partial(_sdpa, _backend))
        register_implementation(Implementation(f"sdpa:{_backend}", _op, "peer", differentiable(_call)))
    _call = functools.partial(in_sequences, _op, lambda *qkv: _flex()(*qkv))
    register_implementation(Implementation("flex_attention", _op, "peer", differentiable(_call), ("cuda",)))
_ours = lambda backend: differentiable(functools.partial(stt_kernels.deform_conv2d, backend=backend))
register_backends("deform_conv2d", _ours, ops=("deform_conv2d",))
_peer = differentiable(_torchvision)
register_implementation(Implementation("torchvision", "deform_conv2d", "peer", _peer, unsupported=_no_torchvision))
register_backends("sst_attention", lambda backend: _block_step(lambda block, x: block(x), backend))
_peer = _block_step(stock_sst_attention)
register_implementation(Implementation("stock", "sst_attention", "peer", _peer, unsupported=_no_torchvision))


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
) -> Step:
    """The step of one pass, run once here so that a combination that cannot run fails now:
    :class:`Unsupported` where the implementation declines (any failure of a peer's first call too:
    their limits are theirs to document); OOM and our own errors go through."""
    if (reason := implementation.unsupported(dtype)) is not None:
        raise Unsupported(reason)
    leaves = case.leaves(shape, dtype, device, torch.Generator().manual_seed(0))
    try:
        step = implementation.make_step(shape, leaves, pass_)
        step()
    except (NotImplementedError, BackendUnavailableError) as exc:
        raise Unsupported(str(exc)) from None
    except Exception as exc:
        if implementation.kind == "peer" and not is_oom(exc) and not isinstance(exc, Unsupported):
            raise Unsupported(f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
        raise
    return step
