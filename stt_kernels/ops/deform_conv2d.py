"""``deform_conv2d``: modulated deformable convolution (DCNv2), torchvision's numbers.

The op ``stt::deform_conv2d`` with a fake kernel and a backward op ``stt::deform_conv2d_backward``,
defined in C++ (``csrc/ops``) with their autograd and CPU/CUDA kernels, which hand each call to
the implementation here while Python is loaded (``kernels.register_ops``). Backend kernels are called as

    forward(x, offset, mask, weight, bias, sh, sw, ph, pw, dh, dw, G, weight_groups) -> out
    backward(grad_out, x, offset, mask, weight, sh, sw, ph, pw, dh, dw, G, weight_groups)
        -> (grad_x, grad_offset, grad_mask, grad_weight)

with ``mask``/``bias`` possibly ``None`` and ``grad_mask`` empty when ``mask`` is ``None``;
the bias gradient is a plain sum over ``grad_out`` and is taken here.

The ops return contiguous tensors whatever a kernel returns and whatever the inputs' strides
(the fake kernels promise the same). A layout that followed ``x`` would make the fake kernel
branch on strides, which under dynamic shapes turns into guards that specialise H and W. The
op's ``backend`` argument may be ``auto``, resolved by device when the op runs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference
from ..backend import requested_backend, resolve
from ..fx import leaf_call
from ..validation import IntPair, check_deform_conv2d, check_deform_conv2d_shapes, script_pair
from .kernels import Kernels, deform_conv2d_kernels, register_ops, spec_vjp


def _output_shape(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int]:
    return (x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def _forward(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    offset_groups: int,
    backend: str,
) -> torch.Tensor:
    groups = x.shape[1] // weight.shape[1]
    out = deform_conv2d_kernels.for_call(backend, x.device, x.dtype).forward(
        x, offset, mask, weight, bias, *stride, *padding, *dilation, offset_groups, groups
    )
    return out.contiguous()  # the layout the fake kernel promises


def _forward_fake(x, offset, mask, weight, bias, stride, padding, dilation, offset_groups, backend):
    return x.new_empty(_output_shape(x, offset, weight))


def _backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    offset_groups: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = x.shape[1] // weight.shape[1]
    backward = deform_conv2d_kernels.backward_for_call(backend, x.device, x.dtype, "deform_conv2d")
    grad_x, grad_offset, grad_mask, grad_weight = backward(
        grad_out, x, offset, mask, weight, *stride, *padding, *dilation, offset_groups, groups
    )
    return grad_x.contiguous(), grad_offset.contiguous(), grad_mask.contiguous(), grad_weight.contiguous()


def _backward_fake(grad_out, x, offset, mask, weight, stride, padding, dilation, offset_groups, backend):
    grad_mask = x.new_empty(mask.shape) if mask is not None else x.new_empty((0,))
    return x.new_empty(x.shape), x.new_empty(offset.shape), grad_mask, x.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, offset, mask, weight, bias, stride, padding, dilation, offset_groups, backend = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, offset_groups, backend)


def _autograd_backward(ctx, grad_out: torch.Tensor):
    x, offset, mask, weight = ctx.saved_tensors
    grad_x, grad_offset, grad_mask, grad_weight = torch.ops.stt.deform_conv2d_backward.default(
        grad_out, x, offset, mask, weight, *ctx.args
    )
    grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias else None
    return (
        grad_x,
        grad_offset,
        grad_mask if mask is not None else None,
        grad_weight,
        grad_bias,
        None,
        None,
        None,
        None,
        None,
    )


register_ops("deform_conv2d", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _autograd_backward)
_deform_conv2d_op = torch.ops.stt.deform_conv2d.default


def _reference_forward(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    sh: int,
    sw: int,
    ph: int,
    pw: int,
    dh: int,
    dw: int,
    offset_groups: int,
    weight_groups: int,
) -> torch.Tensor:
    return reference.deform_conv2d(x, offset, mask, weight, bias, (sh, sw), (ph, pw), (dh, dw))


def _reference_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    sh: int,
    sw: int,
    ph: int,
    pw: int,
    dh: int,
    dw: int,
    offset_groups: int,
    weight_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def spec(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
        return reference.deform_conv2d(x, offset, mask[0] if mask else None, weight, None, (sh, sw), (ph, pw), (dh, dw))

    grads = spec_vjp(spec, (x, offset, weight, *(() if mask is None else (mask,))), grad_out)
    grad_mask = grads[3] if mask is not None else x.new_empty((0,))
    return grads[0], grads[1], grad_mask, grads[2]


deform_conv2d_kernels.register("reference", Kernels(_reference_forward, _reference_backward))


def _autocast(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """The tensors as the op takes them under autocast on ``x``'s device: floating ones cast to
    the autocast dtype. A deformable convolution is a convolution, and autocast runs those in the
    lower precision (torch's conv2d is on its lower-precision list), so a bfloat16 activation
    meets a float32 weight parameter in bfloat16; the kernels still compute in float32. float64
    is left alone, as autocast leaves it. The casts are differentiable: float32 parameters get
    float32 gradients. The C++ op's Autocast kernel (``csrc/ops/deform_conv2d.cpp``) casts the
    same way for graphs that call ``torch.ops.stt.deform_conv2d`` itself."""
    # Anything but tensors is left for the checks to refuse.
    if (
        not isinstance(x, torch.Tensor)
        or not torch.amp.is_autocast_available(x.device.type)  # meta tensors have no autocast
        or not torch.is_autocast_enabled(x.device.type)
    ):
        return x, offset, mask, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(offset), cast(mask), cast(weight), cast(bias)


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 1,
    dilation: IntPair = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Modulated deformable convolution with the numbers of ``torchvision.ops.deform_conv2d``.

    ``x (N, C, H, W)``, ``offset (N, 2*G*Kh*Kw, H_out, W_out)`` (``G`` offset groups, inferred
    from it), ``mask (N, G*Kh*Kw, H_out, W_out)`` or ``None`` (no modulation),
    ``weight (C_out, C / weight_groups, Kh, Kw)``, ``bias (C_out,)`` or ``None``.
    Returns ``(N, C_out, H_out, W_out)``.

    Under ``torch.autocast``, float32 tensors are cast to the autocast dtype first (as
    ``conv2d``'s are), and the result has that dtype.

    Scripted (``torch.jit.script``), a ``backend`` of None is ``auto`` (a script reads no context
    or environment). Under ``torch.fx`` tracing the call is one node.
    """
    if torch.jit.is_scripting():
        pairs = (
            script_pair("stride", stride, 1),
            script_pair("padding", padding, 0),
            script_pair("dilation", dilation, 1),
        )
        groups, _ = check_deform_conv2d_shapes(x, offset, mask, weight, bias, pairs[0], pairs[1], pairs[2])
        return torch.ops.stt.deform_conv2d(
            x,
            offset,
            mask,
            weight,
            bias,
            list(pairs[0]),
            list(pairs[1]),
            list(pairs[2]),
            groups,
            backend if backend is not None else "auto",
        )
    traced = leaf_call(
        deform_conv2d, x, offset, mask, weight, bias, stride=stride, padding=padding, dilation=dilation, backend=backend
    )
    if traced is not None:
        return traced
    x, offset, mask, weight, bias = _autocast(x, offset, mask, weight, bias)
    stride, padding, dilation, offset_groups, _ = check_deform_conv2d(
        x, offset, mask, weight, bias, stride, padding, dilation
    )
    name = requested_backend(backend)
    if name != "auto":
        # A backend asked for is checked now and recorded in a traced graph; "auto" is resolved
        # by the op when it runs.
        name = resolve(name, x.device, "deform_conv2d", deform_conv2d_kernels.implemented(), x.dtype)
        if name == "reference":
            return reference.deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation)
    return _deform_conv2d_op(
        x, offset, mask, weight, bias, list(stride), list(padding), list(dilation), offset_groups, name
    )
