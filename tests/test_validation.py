"""Bad input fails in the shared validation with a sentence naming the argument, on every
backend, before any kernel runs."""

import pytest
import torch

import stt_kernels


def _qkv(shape=(1, 2, 3, 4, 2, 8), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("op", [stt_kernels.spatial_attention, stt_kernels.temporal_attention])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
class TestAttentionInput:
    def test_rank(self, op, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match=r"q must have 6 dimensions \(B, T, H, W, heads, d\)"):
            op(q[0], k, v, backend=backend)

    def test_shape_mismatch(self, op, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="v must have the shape of q"):
            op(q, k, v[:, :1], backend=backend)

    def test_integer_dtype(self, op, backend):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match="k must be a floating tensor"):
            op(q, k.long(), v, backend=backend)

    def test_mixed_dtypes(self, op, backend):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\)"):
            op(q, k, v.double(), backend=backend)

    def test_head_dim_too_large(self, op, backend):
        q, k, v = _qkv((1, 1, 2, 2, 1, 257))
        with pytest.raises(ValueError, match=r"head dim d .* must be in 1..256; got 257"):
            op(q, k, v, backend=backend)

    def test_not_a_tensor(self, op, backend):
        _, k, v = _qkv()
        with pytest.raises(TypeError, match="q must be a torch.Tensor"):
            op([[1.0]], k, v, backend=backend)

    def test_bad_scale(self, op, backend):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            op(q, k, v, scale=float("nan"), backend=backend)
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            op(q, k, v, scale=-1.0, backend=backend)


def _dcn(n=1, c=4, h=6, w=6, c_out=3, k=3, groups=1, ho=6, wo=6):
    x = torch.randn(n, c, h, w)
    offset = torch.randn(n, 2 * groups * k * k, ho, wo)
    mask = torch.rand(n, groups * k * k, ho, wo)
    weight = torch.randn(c_out, c, k, k)
    return x, offset, mask, weight


@pytest.mark.parametrize("backend", ["reference", "cpu"])
class TestDeformConvInput:
    def test_offset_channels_not_multiple(self, backend):
        x, offset, mask, weight = _dcn()
        with pytest.raises(ValueError, match=r"offset.shape\[1\] must be a positive multiple of 2 \* K_h \* K_w = 18"):
            stt_kernels.deform_conv2d(x, offset[:, :17], mask, weight, backend=backend)

    def test_mask_offset_mismatch(self, backend):
        x, offset, mask, weight = _dcn()
        with pytest.raises(
            ValueError, match=r"mask must have shape \(N, G \* K_h \* K_w, H_out, W_out\) = \(1, 9, 6, 6\)"
        ):
            stt_kernels.deform_conv2d(x, offset, mask[:, :8], weight, backend=backend)

    def test_wrong_output_size(self, backend):
        x, offset, mask, weight = _dcn(ho=5)
        with pytest.raises(ValueError, match=r"offset must have shape .* = \(1, 18, 6, 6\)"):
            stt_kernels.deform_conv2d(x, offset, mask[:, :, :5], weight, backend=backend)

    def test_offset_groups_must_divide_channels(self, backend):
        x, offset, mask, weight = _dcn(c=3, groups=2)
        with pytest.raises(ValueError, match="offset groups G = .* = 2 must divide the input channels C = 3"):
            stt_kernels.deform_conv2d(x, offset, mask, weight, backend=backend)

    def test_weight_groups(self, backend):
        x, offset, mask, weight = _dcn(c=4)
        with pytest.raises(ValueError, match=r"weight.shape\[1\] \(3\) must divide the input channels C = 4"):
            stt_kernels.deform_conv2d(x, offset, mask, weight[:, :3], backend=backend)

    def test_empty_output(self, backend):
        x, offset, mask, weight = _dcn(h=2, w=2)
        with pytest.raises(ValueError, match="the output would be empty"):
            stt_kernels.deform_conv2d(x, offset, mask, weight, padding=0, backend=backend)

    def test_rank_and_dtype(self, backend):
        x, offset, mask, weight = _dcn()
        with pytest.raises(ValueError, match=r"x must have 4 dimensions \(N, C, H, W\)"):
            stt_kernels.deform_conv2d(x[0], offset, mask, weight, backend=backend)
        with pytest.raises(TypeError, match=r"weight must have the dtype of x"):
            stt_kernels.deform_conv2d(x, offset, mask, weight.double(), backend=backend)

    def test_bias_shape(self, backend):
        x, offset, mask, weight = _dcn()
        with pytest.raises(ValueError, match=r"bias must have shape \(C_out,\) = \(3,\)"):
            stt_kernels.deform_conv2d(x, offset, mask, weight, torch.zeros(4), backend=backend)

    def test_stride_type(self, backend):
        x, offset, mask, weight = _dcn()
        with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
            stt_kernels.deform_conv2d(x, offset, mask, weight, stride=1.5, backend=backend)
        with pytest.raises(ValueError, match="dilation must be >= 1"):
            stt_kernels.deform_conv2d(x, offset, mask, weight, dilation=0, backend=backend)
