"""Input checks shared by every backend, so bad input fails here with a sentence,
never deep inside a kernel.

The shape checks are TorchScript-compatible (``check_rank``, ``check_same``,
``check_attention_shapes``, ``check_deform_conv2d_shapes``, ``script_pair``): a scripted caller
of the ops runs them too, with the same sentences (raised as ``torch.jit.Error`` there, and a
dtype named by its code). The type checks of Python objects are eager only.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from .backend import MAX_HEAD_DIM

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Sequences of two ints come as tuples or lists; TorchScript has no Sequence type.
IntPair = Union[int, Tuple[int, int], List[int]]


def _dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)


def shape_text(t: torch.Tensor) -> str:
    """``t``'s shape as Python prints a tuple of it, ``(2, 3)`` or ``(3,)``, in eager and script."""
    sizes = [str(size) for size in t.shape]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}; got shape {shape_text(t)}")


def check_floating(name: str, t: torch.Tensor) -> None:
    """For scripted callers, where ``FLOAT_DTYPES`` cannot be read: any floating dtype."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64); got {t.dtype}")


def check_tensor(name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}; got {type(t).__name__}")
    check_rank(name, t, rank, layout)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({_dtype_names()}); got {t.dtype}")
    return t


def check_same(reference_name: str, reference: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != reference.dtype:
        raise TypeError(f"{name} must have the dtype of {reference_name} ({reference.dtype}); got {t.dtype}")
    if t.device != reference.device:
        raise ValueError(f"{name} must be on the device of {reference_name} ({reference.device}); got {t.device}")


def check_scale(scale: Optional[float], head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(d)`` by default, else a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number; got {scale}")
    return float(scale)


ATTENTION_LAYOUT = "(B, T, H, W, heads, d)"


def check_attention(q: object, k: object, v: object, scale: Optional[float]) -> float:
    """Validate ``q, k, v`` of shape ``(B, T, H, W, heads, d)``; returns the softmax scale."""
    q = check_tensor("q", q, 6, ATTENTION_LAYOUT)
    k = check_tensor("k", k, 6, ATTENTION_LAYOUT)
    v = check_tensor("v", v, 6, ATTENTION_LAYOUT)
    return check_scale(scale, check_attention_shapes(q, k, v))


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_head_dim: int = MAX_HEAD_DIM) -> int:
    """``k, v`` like ``q``, 6-d ``(B, T, H, W, heads, d)`` with a head dim ``d`` some backend takes,
    returned; each backend's own limit is checked when it is chosen (``backend.resolve``).
    (``max_head_dim`` is an argument because TorchScript reads no globals.)"""
    check_rank("q", q, 6, "(B, T, H, W, heads, d)")
    for name, t in (("k", k), ("v", v)):
        check_rank(name, t, 6, "(B, T, H, W, heads, d)")
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q {shape_text(q)} (B, T, H, W, heads, d); got {shape_text(t)}"
            )
        check_same("q", q, name, t)
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= max_head_dim:
        raise ValueError(f"q, k, v head dim d (last dimension) must be in 1..{max_head_dim}; got {head_dim}")
    return head_dim


def script_scale(scale: Optional[float], head_dim: int) -> float:
    """:func:`check_scale` for scripted callers, whose ``scale`` is a float or None already."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number; got {scale}")
    return scale


def pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    """``value`` as ``(int, int)``: an int means the same on both axes."""

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    values = (value, value) if is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != 2 or not all(is_int(x) for x in values):
        raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return values[0], values[1]


def script_pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """:func:`pair` for scripted callers, whose ``value`` is typed already."""
    if isinstance(value, int):
        values = [value, value]
    elif isinstance(value, list):
        values = value
    else:
        values = [value[0], value[1]]
    if len(values) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints; got {values}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {values}")
    return values[0], values[1]


def check_deform_conv2d(
    x: object,
    offset: object,
    mask: object,
    weight: object,
    bias: object,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int, int]:
    """Validate the arguments of ``deform_conv2d`` (torchvision's semantics).

    Returns ``(stride, padding, dilation, offset_groups, weight_groups)``.
    """
    x = check_tensor("x", x, 4, "(N, C, H, W)")
    weight = check_tensor("weight", weight, 4, "(C_out, C / weight_groups, K_h, K_w)")
    offset = check_tensor("offset", offset, 4, "(N, 2 * G * K_h * K_w, H_out, W_out)")
    if mask is not None:
        mask = check_tensor("mask", mask, 4, "(N, G * K_h * K_w, H_out, W_out)")
    if bias is not None:
        bias = check_tensor("bias", bias, 1, "(C_out,)")
    stride, padding, dilation = pair("stride", stride, 1), pair("padding", padding, 0), pair("dilation", dilation, 1)
    offset_groups, weight_groups = check_deform_conv2d_shapes(x, offset, mask, weight, bias, stride, padding, dilation)
    return stride, padding, dilation, offset_groups, weight_groups


def check_deform_conv2d_shapes(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int]:
    """The shapes, dtypes and devices of ``deform_conv2d``'s tensors; ``(offset_groups, weight_groups)``."""
    check_rank("x", x, 4, "(N, C, H, W)")
    check_rank("weight", weight, 4, "(C_out, C / weight_groups, K_h, K_w)")
    check_rank("offset", offset, 4, "(N, 2 * G * K_h * K_w, H_out, W_out)")
    check_same("x", x, "weight", weight)
    check_same("x", x, "offset", offset)

    n, c, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    if kh < 1 or kw < 1 or c_per_group < 1:
        raise ValueError(
            f"weight must have shape (C_out, C / weight_groups, K_h, K_w) with positive sizes; got {shape_text(weight)}"
        )
    if c % c_per_group != 0:
        raise ValueError(
            f"weight.shape[1] ({c_per_group}) must divide the input channels C = {c} "
            "(weight groups = C / weight.shape[1])"
        )
    weight_groups = c // c_per_group
    if c_out % weight_groups != 0:
        raise ValueError(f"weight.shape[0] (C_out = {c_out}) must be divisible by the weight groups ({weight_groups})")

    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"the output would be empty ({h_out} x {w_out}): input {h} x {w}, kernel {kh} x {kw}, "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )

    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(
            f"offset.shape[1] must be a positive multiple of 2 * K_h * K_w = {2 * taps}; got {offset.shape[1]}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if c % offset_groups != 0:
        raise ValueError(
            f"the offset groups G = offset.shape[1] / (2 * K_h * K_w) = {offset_groups} "
            f"must divide the input channels C = {c}"
        )
    if list(offset.shape) != [n, 2 * offset_groups * taps, h_out, w_out]:
        raise ValueError(
            "offset must have shape (N, 2 * G * K_h * K_w, H_out, W_out) = "
            f"({n}, {2 * offset_groups * taps}, {h_out}, {w_out}); got {shape_text(offset)}"
        )
    if mask is not None:
        check_rank("mask", mask, 4, "(N, G * K_h * K_w, H_out, W_out)")
        check_same("x", x, "mask", mask)
        if list(mask.shape) != [n, offset_groups * taps, h_out, w_out]:
            raise ValueError(
                f"mask must have shape (N, G * K_h * K_w, H_out, W_out) = ({n}, {offset_groups * taps}, "
                f"{h_out}, {w_out}) (G = {offset_groups} from offset); got {shape_text(mask)}"
            )
    if bias is not None:
        check_rank("bias", bias, 1, "(C_out,)")
        check_same("x", x, "bias", bias)
        if bias.shape[0] != c_out:
            raise ValueError(f"bias must have shape (C_out,) = ({c_out},); got {shape_text(bias)}")
    return offset_groups, weight_groups
