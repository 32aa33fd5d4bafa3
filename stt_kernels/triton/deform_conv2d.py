"""Modulated deformable convolution (DCNv2) in Triton: implicit GEMM, no column buffer.

The inputs are made contiguous once (channels-last views become NCHW copies), so the
kernels index plain NCHW / OIHW layouts. Pixels of all images are flattened into one index
``p = n * Ho * Wo + ho * Wo + wo`` that runs along grid axis 0.

* forward: a program owns (pixel block, output-channel block of one weight group) and, per
  (tap, input-channel block), samples the columns bilinearly and multiplies them into the
  tile with ``tl.dot``;
* backward, x/offset/mask: a program owns (pixel block, offset group), so every
  (pixel, group, tap) of grad_offset / grad_mask is reduced over its group's channels in one
  program and stored without atomics; the column gradient ``W^T grad_out`` is recomputed
  per tile and scattered into grad_x with float32 atomics (sampling points overlap);
  relaxed ones: they only accumulate, nothing reads the sums before the kernel ends, so the
  default acq_rel ordering would only add fences;
* backward, weight: the forward's tiling, ``grad_out^T columns`` per pixel block, summed
  across pixel blocks with float32 atomics: a second reduction pass would need a
  (pixel blocks x C_out x C x K) buffer, and the number of pixel blocks adding to one weight
  element is small next to the pixels each of them reduces.

Blocks are fixed (no autotuning): the atomic outputs would be accumulated once per tried
configuration, and the interpreter gets one small configuration anyway.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import CAPABILITIES
from ..ops.kernels import Kernels, deform_conv2d_kernels
from .attention import refuse_interpreted_bfloat16
from .launch import on_tensor_device

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SUPPORTED_DTYPES = CAPABILITIES["triton"].dtypes["deform_conv2d"]

# tl.dot needs every tile dimension >= 16 for 16-bit inputs on NVIDIA. The interpreter also
# gets wide pixel blocks: it vectorises a program with numpy, and its cost is per program.
_BLOCK_P = 64
_BLOCK_C = 16 if _INTERPRET else 32
_BLOCK_CO = 16 if _INTERPRET else 32
# 8 warps and no software pipelining: compiled offline for sm_90, 4 warps at Triton's default 3
# stages needed 128 KB of shared memory, 255 registers and 1.6 KB of spills in float32 (over the
# 99 KB of sm_86/89 and the 64 KB LDS of MI250X); 8 warps, 1 stage: 8-16 KB. The x/offset/mask
# gradient holds six (pixels x channels) float32 tiles at once: at 32 channels it spilled
# 160-184 B on sm_80, at 16 nothing on sm_80 or sm_90 (stt_kernels.triton.resources).
_NUM_WARPS = 1 if _INTERPRET else 8
_NUM_STAGES = 1
_BLOCK_C_GRAD_INPUT = 16


def block_config(kernel: str) -> triton.Config:
    """The fixed blocks, warps and stages of ``kernel`` (no autotuning: see the module notes)."""
    block_c = _BLOCK_C_GRAD_INPUT if kernel == "_grad_input_kernel" else _BLOCK_C
    return triton.Config(
        dict(BLOCK_P=_BLOCK_P, BLOCK_C=block_c, BLOCK_CO=_BLOCK_CO), num_warps=_NUM_WARPS, num_stages=_NUM_STAGES
    )


@triton.jit
def _corners(y, x, H, W):
    """Top-left corner, fractions and per-corner validity of bilinear points (torchvision's
    zero rule; the NaN rule of stt_kernels/reference/deform_conv2d.py). Points beyond one
    pixel past the border (also infinite and NaN ones) get no valid corner before floor()
    could overflow the integer conversion; a NaN point's fractions are NaN, so its sample and
    its derivatives are NaN while it reads and scatters nothing."""
    undefined = (y != y) | (x != x)
    inside = (y > -2.0) & (y < H + 1.0) & (x > -2.0) & (x < W + 1.0)
    y = tl.where(inside, y, 0.0)
    x = tl.where(inside, x, 0.0)
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    fy = tl.where(undefined, float("nan"), y - y0f)
    fx = tl.where(undefined, float("nan"), x - x0f)
    r0 = inside & (y0 >= 0) & (y0 < H)
    r1 = inside & (y0 + 1 >= 0) & (y0 + 1 < H)
    c0 = (x0 >= 0) & (x0 < W)
    c1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    return y0, x0, fy, fx, r0 & c0, r0 & c1, r1 & c0, r1 & c1


@triton.jit
def _point(off_ptr, mask_ptr, n, pix, ok, g, k, ho, wo, sizes, sampling, HAS_MASK: tl.constexpr):
    """Sampling coordinates and modulation of tap k, offset group g, at the given pixels.
    ``sizes`` and ``sampling`` are the kernels' tuples (:func:`_shapes`)."""
    C, H, W, Ho, Wo, C_out, G, WG, K, Kw = sizes
    sh, sw, ph, pw, dh, dw = sampling
    HWo = Ho * Wo
    kh = k // Kw
    kw = k % Kw
    och = (n * G + g) * (2 * K) + 2 * k
    dy = tl.load(off_ptr + och.to(tl.int64) * HWo + pix, mask=ok, other=0.0).to(tl.float32)
    dx = tl.load(off_ptr + (och + 1).to(tl.int64) * HWo + pix, mask=ok, other=0.0).to(tl.float32)
    y = (ho * sh - ph + kh * dh).to(tl.float32) + dy
    x = (wo * sw - pw + kw * dw).to(tl.float32) + dx
    if HAS_MASK:
        m = tl.load(mask_ptr + ((n * G + g) * K + k).to(tl.int64) * HWo + pix, mask=ok, other=0.0)
        m = m.to(tl.float32)
    else:
        m = tl.where(ok, 1.0, 0.0)
    return y, x, m


@triton.jit
def _columns(
    x_ptr,
    off_ptr,
    mask_ptr,
    n,
    pix,
    p_ok,
    ho,
    wo,
    wg,
    c0,
    k,
    sizes,
    sampling,
    HAS_MASK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The implicit column tile of tap k: modulated samples (pixels x channels) of the
    channels ``c0 .. c0 + BLOCK_C`` of weight group wg; with those channels (within the
    group, (BLOCK_C,)) and their validity."""
    C, H, W, Ho, Wo, C_out, G, WG, K, Kw = sizes
    CG = C // WG  # input channels per weight group
    cl = c0 + tl.arange(0, BLOCK_C)
    c_ok = cl < CG
    c = wg * CG + cl[None, :]
    ok = p_ok & c_ok[None, :]
    y, x, m = _point(off_ptr, mask_ptr, n, pix, ok, c // (C // G), k, ho, wo, sizes, sampling, HAS_MASK)
    y0, x0, fy, fx, v00, v01, v10, v11 = _corners(y, x, H, W)
    plane = x_ptr + (n * C + c).to(tl.int64) * (H * W)
    a = y0 * W + x0
    val = (1.0 - fy) * (1.0 - fx) * tl.load(plane + a, mask=ok & v00, other=0.0).to(tl.float32)
    val += (1.0 - fy) * fx * tl.load(plane + a + 1, mask=ok & v01, other=0.0).to(tl.float32)
    val += fy * (1.0 - fx) * tl.load(plane + a + W, mask=ok & v10, other=0.0).to(tl.float32)
    val += fy * fx * tl.load(plane + a + W + 1, mask=ok & v11, other=0.0).to(tl.float32)
    return m * val, cl, c_ok


@triton.jit
def _output_tile(NP, sizes, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr):
    """This program's (pixels x output channels of one weight group) tile: validity, image,
    flat pixel, row and column of its pixels (BLOCK_P, 1); its weight group; its output
    channels and their validity (1, BLOCK_CO)."""
    C, H, W, Ho, Wo, C_out, G, WG, K, Kw = sizes
    HWo = Ho * Wo
    COG = C_out // WG  # output channels per weight group
    co_blocks = tl.cdiv(COG, BLOCK_CO)
    wg = tl.program_id(1) // co_blocks
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    pix = p % HWo
    co = (tl.program_id(1) % co_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)[None, :]
    return p < NP, p // HWo, pix, pix // Wo, pix % Wo, wg, wg * COG + co, co < COG


@triton.jit
def _forward_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    NP,
    sizes,
    sampling,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    C, H, W, Ho, Wo, C_out, G, WG, K, Kw = sizes
    HWo = Ho * Wo
    CG = C // WG  # input channels per weight group
    p_ok, n, pix, ho, wo, wg, co, co_ok = _output_tile(NP, sizes, BLOCK_P, BLOCK_CO)
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for k in range(0, K):
        for c0 in range(0, CG, BLOCK_C):
            cols, cl, c_ok = _columns(
                x_ptr, off_ptr, mask_ptr, n, pix, p_ok, ho, wo, wg, c0, k, sizes, sampling, HAS_MASK, BLOCK_C
            )
            w = tl.load(w_ptr + (co * CG + cl[:, None]) * K + k, mask=co_ok & c_ok[:, None], other=0.0)
            acc = tl.dot(cols.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    dst = out_ptr + (n * C_out + co).to(tl.int64) * HWo + pix
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=p_ok & co_ok)


@triton.jit
def _grad_weight_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    gout_ptr,
    gw_ptr,
    NP,
    sizes,
    sampling,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    C, H, W, Ho, Wo, C_out, G, WG, K, Kw = sizes
    HWo = Ho * Wo
    CG = C // WG
    p_ok, n, pix, ho, wo, wg, co, co_ok = _output_tile(NP, sizes, BLOCK_P, BLOCK_CO)
    gout = tl.load(gout_ptr + (n * C_out + co).to(tl.int64) * HWo + pix, mask=p_ok & co_ok, other=0.0)
    gout_t = tl.trans(gout)
    for k in range(0, K):
        for c0 in range(0, CG, BLOCK_C):
            cols, cl, c_ok = _columns(
                x_ptr, off_ptr, mask_ptr, n, pix, p_ok, ho, wo, wg, c0, k, sizes, sampling, HAS_MASK, BLOCK_C
            )
            gw = tl.dot(gout_t, cols.to(gout.dtype), input_precision=DOT_PRECISION)  # (co, c)
            dst = gw_ptr + (tl.trans(co) * CG + cl[None, :]) * K + k
            tl.atomic_add(dst, gw, mask=tl.trans(co_ok) & c_ok[None, :], sem="relaxed")


@triton.jit
def _grad_input_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    w_ptr,
    gout_ptr,
    gx_ptr,
    goff_ptr,
    gmask_ptr,
    NP,
    sizes,
    sampling,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    C, H, W, Ho, Wo, C_out, G, WG, K, Kw = sizes
    HWo = Ho * Wo
    CG = C // WG
    COG = C_out // WG
    CPG = C // G
    g = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < NP
    n = p // HWo
    pix = p % HWo
    ho = pix // Wo
    wo = pix % Wo
    for k in range(0, K):
        y, x, m = _point(off_ptr, mask_ptr, n, pix, p_ok, g, k, ho, wo, sizes, sampling, HAS_MASK)
        y0, x0, fy, fx, v00, v01, v10, v11 = _corners(y, x, H, W)
        a = (y0 * W + x0)[:, None]
        fy = fy[:, None]
        fx = fx[:, None]
        ok = p_ok[:, None]
        v00 = v00[:, None] & ok
        v01 = v01[:, None] & ok
        v10 = v10[:, None] & ok
        v11 = v11[:, None] & ok
        g_dy = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_dx = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_m = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, CPG, BLOCK_C):
            c = g * CPG + c0 + tl.arange(0, BLOCK_C)[None, :]
            c_ok = c < (g + 1) * CPG
            # Column gradient W^T grad_out of these channels; a channel block may straddle
            # weight groups, so the weights of other groups' output channels read as zero.
            gcol = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for co0 in range(0, C_out, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO)
                co_ok = co < C_out
                gout = tl.load(
                    gout_ptr + (n[:, None] * C_out + co[None, :]).to(tl.int64) * HWo + pix[:, None],
                    mask=ok & co_ok[None, :],
                    other=0.0,
                )
                same = (co[:, None] // COG) == (c // CG)
                w = tl.load(w_ptr + (co[:, None] * CG + c % CG) * K + k, mask=co_ok[:, None] & c_ok & same, other=0.0)
                gcol = tl.dot(gout, w, gcol, input_precision=DOT_PRECISION)
            plane = (n[:, None] * C + c).to(tl.int64) * (H * W)
            x00 = tl.load(x_ptr + plane + a, mask=c_ok & v00, other=0.0).to(tl.float32)
            x01 = tl.load(x_ptr + plane + a + 1, mask=c_ok & v01, other=0.0).to(tl.float32)
            x10 = tl.load(x_ptr + plane + a + W, mask=c_ok & v10, other=0.0).to(tl.float32)
            x11 = tl.load(x_ptr + plane + a + W + 1, mask=c_ok & v11, other=0.0).to(tl.float32)
            val = (1.0 - fy) * ((1.0 - fx) * x00 + fx * x01) + fy * ((1.0 - fx) * x10 + fx * x11)
            d_y = (1.0 - fx) * (x10 - x00) + fx * (x11 - x01)
            d_x = (1.0 - fy) * (x01 - x00) + fy * (x11 - x10)
            g_m += tl.sum(gcol * val, axis=1)
            gs = gcol * m[:, None]
            g_dy += tl.sum(gs * d_y, axis=1)
            g_dx += tl.sum(gs * d_x, axis=1)
            tl.atomic_add(gx_ptr + plane + a, gs * (1.0 - fy) * (1.0 - fx), mask=c_ok & v00, sem="relaxed")
            tl.atomic_add(gx_ptr + plane + a + 1, gs * (1.0 - fy) * fx, mask=c_ok & v01, sem="relaxed")
            tl.atomic_add(gx_ptr + plane + a + W, gs * fy * (1.0 - fx), mask=c_ok & v10, sem="relaxed")
            tl.atomic_add(gx_ptr + plane + a + W + 1, gs * fy * fx, mask=c_ok & v11, sem="relaxed")
        och = (n * G + g) * (2 * K) + 2 * k
        tl.store(goff_ptr + och.to(tl.int64) * HWo + pix, g_dy, mask=p_ok)
        tl.store(goff_ptr + (och + 1).to(tl.int64) * HWo + pix, g_dx, mask=p_ok)
        if HAS_MASK:
            tl.store(gmask_ptr + ((n * G + g) * K + k).to(tl.int64) * HWo + pix, g_m, mask=p_ok)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton deform_conv2d kernels take float32, float16 or bfloat16; got {x.dtype} "
            "(use backend='cpu' or 'reference' for float64)"
        )
    refuse_interpreted_bfloat16(
        x.dtype, "deform_conv2d", "use backend='cpu' with float32 tensors (backend='reference' takes bfloat16)"
    )


def _shapes(x, offset, weight, sh, sw, ph, pw, dh, dw, offset_groups, weight_groups) -> dict:
    """The kernels' shape arguments: the pixel count ``NP`` and two tuples, ``sizes`` (C, H, W,
    Ho, Wo, C_out, offset groups G, weight groups WG, taps K, kernel width Kw) and ``sampling``
    (stride, padding, dilation, each (h, w)). Triton specialises each element as it would a
    scalar argument (a stride of 1 becomes a constant)."""
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    return dict(
        NP=n * ho * wo,
        sizes=(c, h, w, ho, wo, c_out, offset_groups, weight_groups, kh * kw, kw),
        sampling=(sh, sw, ph, pw, dh, dw),
    )


def _precision(dtype: torch.dtype):
    # float32 stays IEEE (no TF32) to keep torchvision's numbers; 16-bit inputs take the
    # target's default (None), which also keeps AMD, where "tf32" does not exist, working.
    return "ieee" if dtype == torch.float32 else None


def _launch(kernel: str) -> dict:
    config = block_config(kernel)
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def forward(x, offset, mask, weight, bias, sh, sw, ph, pw, dh, dw, offset_groups, weight_groups):
    _check_dtype(x)
    x, offset, weight = x.contiguous(), offset.contiguous(), weight.contiguous()
    mask = mask.contiguous() if mask is not None else None
    s = _shapes(x, offset, weight, sh, sw, ph, pw, dh, dw, offset_groups, weight_groups)
    out = x.new_empty((x.shape[0], weight.shape[0], *offset.shape[2:]))
    if out.numel() == 0:
        return out
    cog = weight.shape[0] // weight_groups
    grid = (triton.cdiv(s["NP"], _BLOCK_P), weight_groups * triton.cdiv(cog, _BLOCK_CO))
    _forward_kernel[grid](
        x,
        offset,
        mask if mask is not None else offset,
        weight,
        bias.contiguous() if bias is not None else weight,
        out,
        **s,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        DOT_PRECISION=_precision(x.dtype),
        **_launch("_forward_kernel"),
    )
    return out


def backward(grad_out, x, offset, mask, weight, sh, sw, ph, pw, dh, dw, offset_groups, weight_groups):
    _check_dtype(x)
    x, offset, weight, grad_out = x.contiguous(), offset.contiguous(), weight.contiguous(), grad_out.contiguous()
    mask = mask.contiguous() if mask is not None else None
    s = _shapes(x, offset, weight, sh, sw, ph, pw, dh, dw, offset_groups, weight_groups)
    f32 = dict(dtype=torch.float32, device=x.device)
    grad_x = torch.zeros(x.shape, **f32)
    grad_offset = torch.zeros(offset.shape, **f32)
    grad_mask = torch.zeros(mask.shape, **f32) if mask is not None else None
    grad_weight = torch.zeros(weight.shape, **f32)
    if s["NP"] > 0 and weight.shape[0] > 0:
        meta = dict(HAS_MASK=mask is not None, DOT_PRECISION=_precision(x.dtype))
        m = mask if mask is not None else offset
        grid = (triton.cdiv(s["NP"], _BLOCK_P), offset_groups)
        _grad_input_kernel[grid](
            x,
            offset,
            m,
            weight,
            grad_out,
            grad_x,
            grad_offset,
            grad_mask if grad_mask is not None else grad_offset,
            **s,
            **meta,
            **_launch("_grad_input_kernel"),
        )
        cog = weight.shape[0] // weight_groups
        grid = (triton.cdiv(s["NP"], _BLOCK_P), weight_groups * triton.cdiv(cog, _BLOCK_CO))
        _grad_weight_kernel[grid](x, offset, m, grad_out, grad_weight, **s, **meta, **_launch("_grad_weight_kernel"))
    grad_mask = grad_mask.to(x.dtype) if grad_mask is not None else x.new_empty((0,))
    return grad_x.to(x.dtype), grad_offset.to(x.dtype), grad_mask, grad_weight.to(x.dtype)


deform_conv2d_kernels.register("triton", Kernels(on_tensor_device(forward), on_tensor_device(backward)))
