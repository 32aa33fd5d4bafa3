"""``stt_kernels.tv``: torchvision's deformable convolution API (functional and ``DeformConv2d``)
on this package's kernels, checked against ``torchvision.ops`` on fresh random inputs: forward
over batch sizes, weight and offset groups, strides, padding, dilation, with and without mask
and bias, non-contiguous inputs; float64 gradients (gradcheck and torchvision's); the module's
constructor, parameters and initialisation; 16-bit CPU inputs; TorchScript and torch.fx.
"""

from __future__ import annotations

import pytest
import torch
from conftest import torchvision_ops

import stt_kernels
from stt_kernels import tv
from stt_kernels.fx import leaf_call

tvops = torchvision_ops()

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _output_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def make_case(
    n=2,
    c_in=4,
    c_out=6,
    h=7,
    w=6,
    kh=3,
    kw=2,
    stride=(1, 2),
    padding=(1, 0),
    dilation=(2, 1),
    weight_groups=2,
    offset_groups=2,
    mask=True,
    bias=True,
    dtype=torch.float64,
):
    """Random arguments; every sampling point lies 0.1..0.9 px from the pixel grid, away from
    bilinear interpolation's kinks (so finite differences see a smooth function)."""
    ho = _output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _output_size(w, kw, stride[1], padding[1], dilation[1])
    taps = kh * kw
    offset = (
        torch.randint(-2, 3, (n, 2 * offset_groups * taps, ho, wo))
        + 0.1
        + 0.8 * torch.rand(n, 2 * offset_groups * taps, ho, wo)
    )
    return dict(
        input=torch.randn(n, c_in, h, w, dtype=dtype),
        offset=offset.to(dtype),
        weight=torch.randn(c_out, c_in // weight_groups, kh, kw, dtype=dtype),
        bias=torch.randn(c_out, dtype=dtype) if bias else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=torch.rand(n, offset_groups * taps, ho, wo, dtype=dtype) if mask else None,
    )


def _non_contiguous(t):
    # The same values with reversed strides in the spatial axes, as a transposed view.
    return None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 4 else t[::1]


CASES = {
    "default": {},
    "batch of one": dict(n=1),
    "empty batch": dict(n=0),
    "no mask": dict(mask=False),
    "no bias": dict(bias=False),
    "one group each": dict(weight_groups=1, offset_groups=1),
    "weight groups only": dict(weight_groups=2, offset_groups=1),
    "offset groups only": dict(weight_groups=1, offset_groups=4, c_in=4),
    "depthwise": dict(c_in=4, c_out=4, weight_groups=4, offset_groups=1),
    "3x3 stride 2": dict(kh=3, kw=3, stride=(2, 2), padding=(1, 1), dilation=(1, 1), h=9, w=8),
    "1x1": dict(kh=1, kw=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_torchvision(case, dtype):
    a = make_case(dtype=dtype, **CASES[case])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(tv.deform_conv2d(**a), tvops.deform_conv2d(**a), **tol)


def test_positional_order_and_defaults_are_torchvisions():
    a = make_case(stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    # input, offset, weight, bias positionally; padding 0 (so 7 x 6 shrinks under a 3 x 2 kernel).
    ours = tv.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"])
    assert ours.shape == (2, 6, 5, 5)
    torch.testing.assert_close(
        ours, tvops.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"])
    )
    # ints for the pairs, as torchvision takes them too
    b = make_case(stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    torch.testing.assert_close(
        tv.deform_conv2d(b["input"], b["offset"], b["weight"], stride=2, padding=1, mask=b["mask"]),
        tvops.deform_conv2d(b["input"], b["offset"], b["weight"], stride=2, padding=1, mask=b["mask"]),
    )


@pytest.mark.parametrize("case", ["default", "no mask", "depthwise"])
def test_non_contiguous_inputs(case):
    a = make_case(**CASES[case])
    strided = {k: _non_contiguous(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    assert not strided["input"].is_contiguous() and not strided["offset"].is_contiguous()
    torch.testing.assert_close(tv.deform_conv2d(**strided), tvops.deform_conv2d(**a))


def _grads(fn, a):
    leaves = {k: v.clone().requires_grad_() for k, v in a.items() if isinstance(v, torch.Tensor)}
    out = fn(**{**a, **leaves})
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return dict(zip(leaves, grads)), grad_out


@pytest.mark.parametrize("case", ["default", "no mask", "no bias", "offset groups only", "3x3 stride 2"])
def test_gradients_match_torchvision(case):
    a = make_case(**CASES[case])
    torch.manual_seed(1)
    ours, _ = _grads(tv.deform_conv2d, a)
    torch.manual_seed(1)
    theirs, _ = _grads(tvops.deform_conv2d, a)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("case", ["default", "no mask"])
def test_gradcheck_float64(case):
    a = make_case(
        n=1,
        c_in=2,
        c_out=2,
        h=4,
        w=4,
        kh=2,
        kw=2,
        stride=(1, 1),
        padding=(1, 0),
        dilation=(1, 1),
        weight_groups=1,
        offset_groups=1,
        **CASES[case],
    )
    names = [k for k, v in a.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        return tv.deform_conv2d(**{**a, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, tuple(a[k].requires_grad_() for k in names))


# --- the module ---------------------------------------------------------------------------------

MODULE_ARGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(
        in_channels=4,
        out_channels=6,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        groups=2,
        bias=False,
    ),
]


@pytest.mark.parametrize("kwargs", MODULE_ARGS)
def test_module_matches_torchvision(kwargs):
    ours, theirs = tv.DeformConv2d(**kwargs).double(), tvops.DeformConv2d(**kwargs).double()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    assert stt_kernels.DeformConv2d is tv.DeformConv2d
    assert (ours.stride, ours.padding, ours.dilation, ours.groups) == (
        theirs.stride,
        theirs.padding,
        theirs.dilation,
        theirs.groups,
    )
    k = ours.kernel_size
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    ho = _output_size(9, k[0], ours.stride[0], ours.padding[0], ours.dilation[0])
    wo = _output_size(8, k[1], ours.stride[1], ours.padding[1], ours.dilation[1])
    offset = torch.randn(3, 2 * 2 * k[0] * k[1], ho, wo, dtype=torch.float64)  # two offset groups
    mask = torch.rand(3, 2 * k[0] * k[1], ho, wo, dtype=torch.float64)
    torch.testing.assert_close(ours(x, offset), theirs(x, offset))
    torch.testing.assert_close(ours(x, offset, mask), theirs(x, offset, mask))


def test_module_initialisation_follows_conv2d():
    torch.manual_seed(3)
    ours = tv.DeformConv2d(8, 16, 3, groups=2)
    torch.manual_seed(3)
    theirs = tvops.DeformConv2d(8, 16, 3, groups=2)
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(in_channels=4, out_channels=6, kernel_size=3, groups=3),
            r"in_channels \(4\) must be divisible by groups",
        ),
        (
            dict(in_channels=4, out_channels=6, kernel_size=3, groups=4),
            r"out_channels \(6\) must be divisible by groups",
        ),
        (dict(in_channels=0, out_channels=6, kernel_size=3), "in_channels must be a positive int"),
        (dict(in_channels=4, out_channels=6, kernel_size=(3, 3, 3)), "kernel_size must be an int or a pair of ints"),
    ],
)
def test_module_refuses_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tv.DeformConv2d(**kwargs)


def test_bad_offset_names_the_argument():
    a = make_case()
    with pytest.raises(ValueError, match="offset must have shape"):
        tv.deform_conv2d(**{**a, "offset": a["offset"][:, :, :-1]})


# --- 16-bit on the CPU --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_cpu_runs_and_matches_float32(dtype):
    a32 = make_case(dtype=torch.float32)
    low = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in a32.items()}
    out = tv.deform_conv2d(**low)
    assert out.dtype == dtype
    # The expected value from the same rounded inputs, computed by torchvision in float32.
    rounded = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in low.items()}
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=1e-2)
    torch.testing.assert_close(out.float(), tvops.deform_conv2d(**rounded), **tol)
    # 'auto' runs the compiled CPU kernels (16-bit computed in float32): the numbers of naming them.
    assert torch.equal(
        out,
        stt_kernels.deform_conv2d(
            low["input"],
            low["offset"],
            low["mask"],
            low["weight"],
            low["bias"],
            low["stride"],
            low["padding"],
            low["dilation"],
            backend="cpu",
        ),
    )
    grads, _ = _grads(tv.deform_conv2d, low)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads.values())


# --- TorchScript and torch.fx -------------------------------------------------------------------


def test_scripted_functional_and_module_match_eager():
    a = make_case()
    scripted = torch.jit.script(tv.deform_conv2d)
    torch.testing.assert_close(scripted(**a), tv.deform_conv2d(**a))
    module = tv.DeformConv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2).double()
    scripted_module = torch.jit.script(module)
    x = a["input"].requires_grad_()
    ours, eager = scripted_module(x, a["offset"], a["mask"]), module(x, a["offset"], a["mask"])
    torch.testing.assert_close(ours, eager)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(eager.sum(), x)[0])
    torch.testing.assert_close(scripted_module(x, a["offset"]), module(x, a["offset"]))


def test_scripted_functional_checks_its_input():
    a = make_case()
    scripted = torch.jit.script(tv.deform_conv2d)
    with pytest.raises(torch.jit.Error, match="offset must have shape"):
        scripted(**{**a, "offset": a["offset"][:, :, :-1]})


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.offsets = torch.nn.Conv2d(4, 2 * 9, 3, padding=1)
        self.deform = tv.DeformConv2d(4, 6, 3, padding=1)

    def forward(self, x):
        return self.deform(x, self.offsets(x)).relu()


def test_fx_traces_the_module_to_one_deform_conv2d_node():
    net = _Net().double()
    graph_module = torch.fx.symbolic_trace(net)
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert targets.count(tv.deform_conv2d) == 1
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(graph_module(x), net(x))


def test_fx_leaf_call_is_none_outside_tracing():
    assert leaf_call(tv.deform_conv2d, torch.zeros(1)) is None
