"""SSTAttention and its parts: every backend agrees with the reference backend on one
state_dict, every fusion x order runs forward and backward, compile matches eager."""

import io
import re

import pytest
import torch
from conftest import GPU, available

import stt_kernels
from stt_kernels.nn.sst import FUSIONS, ORDERS
from stt_kernels.ops.kernels import attention_kernels, deform_conv2d_kernels


def _runnable_backends():
    """Backends that run every op of the module on CPU tensors here."""
    names = []
    for name in ("cpu", "triton"):
        implemented = attention_kernels.implemented() & deform_conv2d_kernels.implemented()
        if name in implemented and stt_kernels.backend._runs_on(name, torch.device("cpu")) is None:
            names.append(name)
    return names


def _module(dim=8, heads=2, **kwargs):
    module = stt_kernels.SSTAttention(dim, heads, **kwargs).double()
    # Non-zero offsets and masks, so the deformable path samples between pixels.
    if isinstance(module.fusion, stt_kernels.DeformableFusion):
        with torch.no_grad():
            module.fusion.predictor.weight.normal_(0, 0.3)
            module.fusion.predictor.bias.normal_(0, 0.5)
    return module


def test_fresh_module_is_an_aligned_convolution():
    module = stt_kernels.SSTAttention(8, 2)
    x = torch.randn(1, 8, 3, 5, 6)
    spatial = module.spatial(module.norm(x.permute(0, 2, 3, 4, 1)))
    expected = torch.nn.functional.conv2d(
        spatial.reshape(3, 5, 6, 8).permute(0, 3, 1, 2), module.fusion.weight * 0.5, module.fusion.bias, padding=1
    )
    got = module(x) - x
    torch.testing.assert_close(got, expected.reshape(1, 3, 8, 5, 6).transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend",
    _runnable_backends()
    or [
        pytest.param(
            "cpu", marks=pytest.mark.skip(reason="no kernel backend implements every op of the module on the CPU yet")
        )
    ],
)
@pytest.mark.parametrize("shape", [(1, 8, 1, 5, 7), (2, 8, 4, 3, 5)])
def test_backend_matches_reference(backend, shape):
    # Triton has no float64; under the interpreter its float32 dots are exact, so float32 is a
    # fair comparison there at float32 tolerances.
    dtype = torch.float32 if backend == "triton" else torch.float64
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    module = _module().to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    results = {}
    for name in ("reference", backend):
        with stt_kernels.use_backend(name):
            module.zero_grad()
            out = module(x)
            out.backward(torch.ones_like(out))
            results[name] = (out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()})
    torch.testing.assert_close(results[backend][0], results["reference"][0], **tolerance)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results[backend][1][name], grad, msg=f"gradient of {name}", **tolerance)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("order", ORDERS)
def test_every_fusion_and_order_trains(fusion, order):
    module = _module(fusion=fusion, order=order)
    x = torch.randn(1, 8, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in module.parameters()), [
        n for n, p in module.named_parameters() if p.grad is None
    ]


def test_compile_matches_eager():
    module = _module()
    x = torch.randn(1, 8, 3, 4, 5, dtype=torch.float64)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x))


def test_state_dict_is_backend_independent():
    source = _module(backend="reference")
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = stt_kernels.SSTAttention(8, 2, backend="auto").double()
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 8, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(target(x), source(x))


def test_construction_errors():
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by heads \(4\)"):
        stt_kernels.SSTAttention(10, 4)
    with pytest.raises(ValueError, match="fusion must be one of deformable, add, concat; got 'mul'"):
        stt_kernels.SSTAttention(8, 2, fusion="mul")
    with pytest.raises(ValueError, match="order must be one of"):
        stt_kernels.SSTAttention(8, 2, order="joint")
    with pytest.raises(ValueError, match=r"offset_groups must be a positive int dividing dim \(8\)"):
        stt_kernels.SSTAttention(8, 2, offset_groups=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        stt_kernels.SSTAttention(8, 2, backend="gpu")
    with pytest.raises(ValueError, match="head dim limit 256"):
        stt_kernels.SSTAttention(1024, 2)


def test_call_errors():
    module = stt_kernels.SSTAttention(8, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, C=8, T, H, W\); got \(1, 8, 4, 4\)"):
        module(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"C=8"):
        module(torch.randn(1, 6, 2, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        module(torch.ones(1, 8, 2, 4, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "shape, name",
    [
        ((1, 8, 2, 0, 4), "H = 0"),
        ((1, 8, 2, 4, 0), "W = 0"),
        ((1, 8, 0, 4, 4), "T = 0"),
        ((2, 8, 0, 0, 3), "T = 0, H = 0"),
    ],
)
def test_empty_slices_or_sequences_are_refused(shape, name):
    module = stt_kernels.SSTAttention(8, 2)
    with pytest.raises(ValueError, match=re.escape(f"(B, C=8, T, H, W) with T, H, W >= 1; got {shape} ({name})")):
        module(torch.randn(shape))


def test_empty_batch_gives_an_empty_batch():
    x = torch.randn(0, 8, 2, 3, 4)
    assert stt_kernels.SSTAttention(8, 2)(x).shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_features_give_nan_not_a_crash(backend):
    """A NaN voxel reaches, through the norm and both attentions, every output of its slice
    and of its pixel's sequence; the deformable fusion samples it as NaN (the
    reference backend used to crash on the NaN offsets predicted from it)."""
    if not available(backend):
        pytest.skip(f"backend {backend} is not available here")
    x = torch.randn(1, 8, 3, 4, 5)
    x[0, 2, 1, 2, 3] = float("nan")
    out = stt_kernels.SSTAttention(8, 2, backend=backend)(x)
    assert out[:, :, 1].isnan().all()  # the NaN key is in every token's spatial sequence
    # Slice 0 sees the NaN only through pixel (2, 3)'s temporal sequence, from which the
    # fusion's 3 x 3 predictor makes NaN offsets around it.
    nan = out[0, :, 0].isnan().any(0)
    assert nan[2, 3] and not nan[:1].any() and not nan[:, :2].any()


@pytest.mark.skipif(not GPU, reason="autocast to bfloat16 is checked on a GPU")
def test_autocast_bfloat16_on_gpu():
    module = stt_kernels.SSTAttention(32, 4).cuda()
    x = torch.randn(1, 32, 4, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    with stt_kernels.use_backend("reference"):
        expected = module(x)
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
