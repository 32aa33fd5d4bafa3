"""``spatial_attention`` and ``temporal_attention``: the paper's split attention (Eqs. 1, 2).

Both are one kernel, attention over the sequence axis of a 5-d strided view
``(B, Z, N, heads, d)``: spatial takes ``Z = T`` and ``N = H * W``; temporal takes
``Z = H * W`` and ``N = T``. The views are built without copies from the packed
``(B, T, H, W, heads, d)`` projection layout, so kernels read q, k, v in place.

Each op ``stt::<name>`` returns ``(out, lse)`` and has a fake kernel and a backward op
``stt::<name>_backward`` (flash style: recompute from the saved log-sum-exp), so
``torch.compile`` traces it; the ops, their autograd and CPU/CUDA kernels are defined in C++
(``csrc/ops``), which hands each call to the implementation here while Python is loaded
(``kernels.register_ops``). Every output is contiguous whatever the
inputs' strides: ``out`` and the gradients ``(B, T, H, W, heads, d)``, ``lse`` float32
(float64 for float64 inputs) ``(B, Z, heads, N)``. The op's ``backend`` argument may be
``auto``, resolved by device when the op runs. ``backend='reference'`` asked for by name
bypasses the custom op and runs the plain-PyTorch spec under ordinary autograd.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import reference
from ..backend import requested_backend, resolve
from ..fx import leaf_call
from ..validation import check_attention, check_attention_shapes, script_scale
from .kernels import Kernels, attention_kernels, register_ops, spec_vjp


def spatial_view(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, W, heads, d)`` -> ``(B, T, H*W, heads, d)``, a view whenever the strides allow."""
    return x.flatten(2, 3)


def temporal_view(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, W, heads, d)`` -> ``(B, H*W, T, heads, d)``, a view whenever the strides allow."""
    return x.flatten(2, 3).transpose(1, 2)


def _lse_shape(view: torch.Tensor) -> tuple[int, ...]:
    b, z, n, heads, _ = view.shape
    return (b, z, heads, n)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    # The kernels' accumulation type: a float32 lse would cap float64 gradients at ~1e-7 |lse|.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class _AttentionOp:
    """The Python halves of ``stt::<name>`` and ``stt::<name>_backward`` for one sequence layout."""

    def __init__(self, name: str, view: Callable[[torch.Tensor], torch.Tensor]):
        self.name = name
        self.view = view
        register_ops(
            name,
            self._forward,
            self._forward_fake,
            self._backward,
            self._backward_fake,
            self._setup_context,
            self._autograd_backward,
        )
        self.forward = getattr(torch.ops.stt, name).default
        self.backward = getattr(torch.ops.stt, f"{name}_backward").default

    def _forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(_lse_shape(self.view(q)), dtype=_lse_dtype(q), device=q.device)
        kernels = attention_kernels.for_call(backend, q.device, q.dtype, q.shape[-1])
        kernels.forward(self.view(q), self.view(k), self.view(v), self.view(out), lse, scale)
        return out, lse

    def _forward_fake(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            q.new_empty(_lse_shape(self.view(q)), dtype=_lse_dtype(q)),
        )

    def _backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        grad_out: torch.Tensor,
        scale: float,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
        views = [self.view(t) for t in (q, k, v, out, grad_out)]
        backward = attention_kernels.backward_for_call(backend, q.device, q.dtype, self.name, q.shape[-1])
        backward(*views, lse, scale, *(self.view(g) for g in grads))
        return grads[0], grads[1], grads[2]

    def _backward_fake(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        grad_out: torch.Tensor,
        scale: float,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # type: ignore[return-value]

    @staticmethod
    def _setup_context(ctx, inputs, output) -> None:
        q, k, v, scale, backend = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backend = scale, backend
        ctx.mark_non_differentiable(lse)

    def _autograd_backward(self, ctx, grad_out: torch.Tensor, _grad_lse: Optional[torch.Tensor]):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = self.backward(q, k, v, out, lse, grad_out, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None


_SPATIAL = _AttentionOp("spatial_attention", spatial_view)
_TEMPORAL = _AttentionOp("temporal_attention", temporal_view)


def _as_slice(x: torch.Tensor) -> torch.Tensor:
    """A ``(B, Z, N, heads, d)`` sequence view as the spec's ``(B, Z, N, 1, heads, d)`` slices."""
    return x.unsqueeze(3)


def _reference_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> None:
    # Attention along N of a sequence view is the spec's spatial attention on N x 1 slices.
    out.copy_(reference.spatial_attention(_as_slice(q), _as_slice(k), _as_slice(v), scale).squeeze(3))
    scores = torch.einsum("bznhd,bzmhd->bzhnm", q.to(lse.dtype), k.to(lse.dtype)) * scale
    lse.copy_(torch.logsumexp(scores, dim=-1))


def _reference_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
) -> None:
    grads = spec_vjp(
        lambda q, k, v: reference.spatial_attention(q, k, v, scale),
        (_as_slice(q), _as_slice(k), _as_slice(v)),
        _as_slice(grad_out),
    )
    for grad, value in zip((grad_q, grad_k, grad_v), grads):
        grad.copy_(value.squeeze(3))


attention_kernels.register("reference", Kernels(_reference_forward, _reference_backward))


def _run(
    op: _AttentionOp,
    spec: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float],
    backend: Optional[str],
) -> torch.Tensor:
    scale = check_attention(q, k, v, scale)
    name = requested_backend(backend)
    if name != "auto":
        # A backend asked for (argument, context or STT_BACKEND) is checked now and recorded in
        # a traced graph; "auto" is passed on and resolved by the op when it runs.
        name = resolve(name, q.device, op.name, attention_kernels.implemented(), q.dtype, q.shape[-1])
        if name == "reference":
            return spec(q, k, v, scale)
    return op.forward(q, k, v, scale, name)[0]


def spatial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """Self-attention among the ``H * W`` tokens of each slice, per ``(b, t, head)``.

    ``q, k, v``: ``(B, T, H, W, heads, d)`` with any strides (views of one packed
    ``(B, T, H, W, 3, heads, d)`` projection are read in place). ``scale`` defaults to
    ``1 / sqrt(d)``. Returns ``(B, T, H, W, heads, d)``.

    Scripted (``torch.jit.script``), a ``backend`` of None is ``auto`` (a script reads no context
    or environment). Under ``torch.fx`` tracing the call is one node.
    """
    if torch.jit.is_scripting():
        scale = script_scale(scale, check_attention_shapes(q, k, v))
        return torch.ops.stt.spatial_attention(q, k, v, scale, backend if backend is not None else "auto")[0]
    traced = leaf_call(spatial_attention, q, k, v, scale=scale, backend=backend)
    if traced is not None:
        return traced
    return _run(_SPATIAL, reference.spatial_attention, q, k, v, scale, backend)


def temporal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """Self-attention among the ``T`` tokens at each pixel, per ``(b, h, w, head)``.

    Shapes, TorchScript and ``torch.fx`` as :func:`spatial_attention`.
    """
    if torch.jit.is_scripting():
        scale = script_scale(scale, check_attention_shapes(q, k, v))
        return torch.ops.stt.temporal_attention(q, k, v, scale, backend if backend is not None else "auto")[0]
    traced = leaf_call(temporal_attention, q, k, v, scale=scale, backend=backend)
    if traced is not None:
        return traced
    return _run(_TEMPORAL, reference.temporal_attention, q, k, v, scale, backend)
