"""The implementations we compare against: PyTorch's SDPA (each of its backends),
torchvision's deformable convolution, and flash-attn, xformers and NATTEN when importable.

Attention peers get the same strided q, k, v views ours get, ``(B, T, H, W, heads, d)``, and
must return the same contiguous ``(B, T, H, W, heads, d)`` output: the permutes and copies
their own layouts need are part of what is timed. Spatial attention maps onto their batch
of sequences without a copy (``(B*T, H*W, heads, d)`` is a view); temporal attention needs
one (``(B*H*W, T, heads, d)`` is not).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from .implementation import Implementation, Unsupported

ATTENTION_OPS = ("spatial_attention", "temporal_attention")
_HALF = (torch.float16, torch.bfloat16)


def to_sequences(x: torch.Tensor, op: str) -> torch.Tensor:
    """``(B, T, H, W, heads, d)`` -> ``(batch of sequences, N, heads, d)``; a view for spatial."""
    b, t, h, w, heads, d = x.shape
    if op == "spatial_attention":
        return x.flatten(0, 1).flatten(1, 2)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b * h * w, t, heads, d)


def from_sequences(out: torch.Tensor, like: torch.Tensor, op: str) -> torch.Tensor:
    """Inverse of :func:`to_sequences`: a contiguous ``(B, T, H, W, heads, d)`` tensor."""
    b, t, h, w, heads, d = like.shape
    if op == "spatial_attention":
        return out.reshape(b, t, h, w, heads, d).contiguous()
    return out.reshape(b, h, w, t, heads, d).permute(0, 3, 1, 2, 4, 5).contiguous()


# --- torch.nn.functional.scaled_dot_product_attention ------------------------------------

_SDPA_BACKENDS = ("math", "efficient", "flash", "cudnn")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def _sdpa_context(name: str) -> ContextManager[object]:
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_sdpa_backend(name))


def _sdpa(op: str, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    seq = [to_sequences(t, op).transpose(1, 2) for t in (q, k, v)]  # (batch, heads, N, d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = F.scaled_dot_product_attention(*seq)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in ("No available kernel", "No viable backend")):
                raise
            # On the GPU, SDPA explains why each backend declined in warnings, not in the exception.
            why = "; ".join(str(w.message).splitlines()[0] for w in caught) or "no kernel for these inputs"
            raise Unsupported(f"SDPA's {backend} backend declined on {q.device.type} "
                              f"({q.dtype}, d={q.shape[-1]}): {why}") from None
    return from_sequences(out.transpose(1, 2), q, op)


def _sdpa_unsupported(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    try:
        importlib.import_module("torch.nn.attention")
    except ImportError:
        return "torch.nn.attention.sdpa_kernel needs torch >= 2.3"
    return None


def _sdpa_implementations() -> list[Implementation]:
    return [Implementation(name=f"sdpa:{backend}", op=op, kind="peer", call=functools.partial(_sdpa, op, backend),
                           unsupported=_sdpa_unsupported, context=functools.partial(_sdpa_context, backend))
            for op in ATTENTION_OPS for backend in _SDPA_BACKENDS]


# --- optional libraries ------------------------------------------------------------------

def _missing(module: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def _half_only(module: str) -> Callable[[torch.device, torch.dtype, str], Optional[str]]:
    def unsupported(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
        if (why := _missing(module)) is not None:
            return why
        if dtype not in _HALF:
            return f"{module} runs float16/bfloat16 only"
        return None
    return unsupported


def _flash_attn(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(*(to_sequences(t, op) for t in (q, k, v)))
    return from_sequences(out, q, op)


def _xformers(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(*(to_sequences(t, op) for t in (q, k, v)))
    return from_sequences(out, q, op)


def _natten(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Neighbourhood attention with the window as large as the input: global attention."""
    natten = importlib.import_module("natten")
    functional = getattr(natten, "functional", natten)
    b, t, h, w, heads, d = q.shape
    if op == "spatial_attention":
        na2d = getattr(functional, "na2d", None) or getattr(natten, "na2d", None)
        if na2d is None:
            raise Unsupported(f"natten {getattr(natten, '__version__', '?')} has no na2d")
        out = na2d(*(x.flatten(0, 1) for x in (q, k, v)), kernel_size=(h, w))
        return out.reshape(b, t, h, w, heads, d).contiguous()
    na1d = getattr(functional, "na1d", None) or getattr(natten, "na1d", None)
    if na1d is None:
        raise Unsupported(f"natten {getattr(natten, '__version__', '?')} has no na1d")
    out = na1d(*(to_sequences(x, op) for x in (q, k, v)), kernel_size=t)
    return from_sequences(out, q, op)


def _natten_unsupported(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    return _missing("natten")


def _optional_attention_implementations() -> list[Implementation]:
    found = []
    for op in ATTENTION_OPS:
        found += [
            Implementation("flash-attn", op, "peer", functools.partial(_flash_attn, op), ("cuda",),
                           _half_only("flash_attn")),
            Implementation("xformers", op, "peer", functools.partial(_xformers, op), ("cuda",),
                           lambda device, dtype, pass_: _missing("xformers")),
            Implementation("natten", op, "peer", functools.partial(_natten, op), ("cpu", "cuda"),
                           _natten_unsupported),
        ]
    return found


# --- torchvision.ops.deform_conv2d -------------------------------------------------------

def _torchvision_unsupported(device: torch.device, dtype: torch.dtype, pass_: str) -> Optional[str]:
    if (why := _missing("torchvision")) is not None:
        return why
    try:
        import torchvision  # noqa: F401 - loads torchvision's compiled ops

        torch.ops.torchvision.deform_conv2d.default  # noqa: B018 - raises if they did not load
    except (ImportError, RuntimeError, AttributeError) as exc:
        return f"torchvision is unusable here (built for another torch?): {exc}"
    return None


def _torchvision_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                               weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


def implementations() -> list[Implementation]:
    """Every peer, whether or not it can run here (``unsupported`` says at run time)."""
    return (_sdpa_implementations() + _optional_attention_implementations()
            + [Implementation("torchvision", "deform_conv2d", "peer", _torchvision_deform_conv2d,
                              unsupported=_torchvision_unsupported)])
