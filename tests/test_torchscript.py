"""TorchScript (``torch.jit.script`` / ``torch.jit.trace``) of the ops, ``SSTAttention`` and the
STT-UNET, and graphs that stay portable: a traced, scripted or exported network carries neither
the eager batch-1 oneDNN workaround (concatenate zeros, convolve, slice) nor ``memory_format``
conversions (the legacy ONNX exporter refuses them).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

# The network's input checks compare sizes in Python; the tracer warns that they are not recorded.
pytestmark = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning", "ignore:`torch.jit.*` is deprecated:FutureWarning"
)

# What a portable graph may ask of a layout: nothing, or plain contiguous / preserve.
PORTABLE_FORMATS = (torch.contiguous_format, torch.preserve_format)


def _tiny_model(in_channels: int = 1):
    from stt_model.build import build_model

    return build_model({"base": "tiny-cpu", "model": {"in_channels": in_channels}}).eval()


def _batch_one(in_channels: int = 1):
    # Batch 1 at 32 x 32: every conv of the tiny net is under oneDNN's batch-1 threshold, so an
    # eager pass takes the zero-sample workaround at each of them.
    return torch.rand(1, in_channels, 8, 32, 32)


# --- portable graphs ----------------------------------------------------------------------------


def _jit_memory_formats(graph: torch.Graph) -> list[int]:
    """The ``memory_format`` constants every aten call of a TorchScript graph passes."""
    formats = []
    for node in graph.nodes():
        if not node.kind().startswith("aten::"):
            continue
        schema = torch._C.parse_schema(node.schema()) if node.schema() != "(no schema)" else None
        if schema is None:
            continue
        for argument, value in zip(schema.arguments, node.inputs()):
            if argument.name == "memory_format":
                formats.append(value.toIValue())
    return formats


def _memory_format_code(fmt: torch.memory_format) -> int:
    # TorchScript graphs hold a memory format as its enum code; read the code off a traced call.
    graph = torch.jit.trace(lambda x: x.clone(memory_format=fmt), torch.rand(1, 1, 1, 1, 1)).graph
    return _jit_memory_formats(graph)[0]


def test_eager_batch_one_takes_the_workaround_the_graphs_do_not():
    """The positive control: eager runs record cat and zeros (so the checks below can see them)."""
    model = _tiny_model()
    seen: list[str] = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        model(_batch_one())
    assert "cat" in seen and "zeros_like" in seen
    assert any(name in ("clone", "contiguous") for name in seen)


# Two input channels: one channel is channels-last already, and its conversion would vanish.
def test_traced_model_has_no_batch_one_workaround_nor_memory_format():
    model = _tiny_model(2)
    x = _batch_one(2)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    graph = traced.inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::_convolution" in kinds
    assert not kinds & {"aten::cat", "aten::zeros_like", "aten::zeros"}, kinds
    allowed = {None, *(_memory_format_code(fmt) for fmt in PORTABLE_FORMATS)}
    formats = _jit_memory_formats(graph)
    assert formats and set(formats) <= allowed, formats
    fresh = _batch_one(2)
    with torch.no_grad():
        torch.testing.assert_close(traced(fresh), model(fresh))


def test_exported_model_has_no_batch_one_workaround_nor_memory_format():
    model = _tiny_model(2)
    program = torch.export.export(model, (_batch_one(2),))
    calls = [node for node in program.graph.nodes if node.op == "call_function"]
    names = {getattr(node.target, "__name__", str(node.target)) for node in calls}
    assert any(name.startswith("conv3d") for name in names), names
    assert not any(name.split(".")[0] in ("cat", "zeros_like", "zeros") for name in names), names
    formats = {node.kwargs.get("memory_format") for node in calls}
    assert formats <= {None, *PORTABLE_FORMATS}, formats
    fresh = _batch_one(2)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(fresh), model(fresh))


def test_graph_capture_flag_follows_the_mode():
    from stt_model.nets.capture import capturing_graph

    assert not capturing_graph()
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(capturing_graph())
        return x + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(probe, torch.rand(2), check_trace=False)
    assert seen == [True]
    seen.clear()
    torch.compile(probe, backend="eager", fullgraph=True)(torch.rand(2))
    assert seen == [False]  # a compiled graph runs here only: it keeps the eager speed-ups
    seen.clear()

    class Probe(torch.nn.Module):
        def forward(self, x):
            return probe(x)

    torch.export.export(Probe(), (torch.rand(2),))
    assert seen and all(seen)
    seen.clear()
    torch.fx.symbolic_trace(Probe())
    assert seen == [True]
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The legacy exporter traces; the dynamo one runs torch.export, probed above (importing
        # onnxscript alone takes seconds).
        torch.onnx.export(Probe(), (torch.rand(2),), io.BytesIO(), dynamo=False)
    assert seen and all(seen)

    def scripted_flag(x: torch.Tensor) -> bool:
        return capturing_graph()

    assert torch.jit.script(scripted_flag)(torch.rand(1)) is True


# --- TorchScript ---------------------------------------------------------------------------------

F64 = torch.float64


def _ops_inputs():
    q, k, v = torch.randn(3, 2, 3, 4, 5, 2, 4, dtype=F64).unbind(0)
    x = torch.randn(2, 4, 5, 6, dtype=F64)
    offset, mask = torch.randn(2, 18, 5, 6, dtype=F64), torch.rand(2, 9, 5, 6, dtype=F64)
    weight = torch.randn(3, 4, 3, 3, dtype=F64)
    return [q, k, v, x, offset, mask, weight]


def test_scripted_function_calling_the_ops_matches_eager_forward_and_backward():
    import stt_kernels

    def user(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        offset: torch.Tensor,
        mask: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        a = stt_kernels.spatial_attention(q, k, v)
        b = stt_kernels.temporal_attention(q, k, v, scale=0.25, backend="reference")
        c = stt_kernels.deform_conv2d(x, offset, mask, weight, None, stride=1, padding=[1, 1], dilation=(1, 1))
        return a.sum() + b.sum() + c.sum()

    scripted = torch.jit.script(user)
    graph = str(scripted.inlined_graph)
    assert "stt::spatial_attention" in graph and "stt::deform_conv2d" in graph
    inputs = [t.requires_grad_() for t in _ops_inputs()]
    ours, eager = scripted(*inputs), user(*inputs)
    torch.testing.assert_close(ours, eager)
    for g_ours, g_eager in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(g_ours, g_eager)


def test_scripted_ops_check_their_input():
    import stt_kernels

    def attend(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return stt_kernels.spatial_attention(q, k, k)

    def convolve(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return stt_kernels.deform_conv2d(x, offset, None, weight, stride=[1, 1, 1])

    q, k = torch.randn(2, 1, 2, 3, 4, 2, 4).unbind(0)
    with pytest.raises(torch.jit.Error, match="k must have the shape of q"):
        torch.jit.script(attend)(q, k[:, :, :1])
    with pytest.raises(torch.jit.Error, match="stride must be an int or a pair of ints"):
        torch.jit.script(convolve)(torch.randn(1, 4, 5, 6), torch.randn(1, 18, 5, 6), torch.randn(3, 4, 3, 3))


@pytest.mark.parametrize(
    "fusion, order",
    [
        ("deformable", "split"),
        ("add", "split"),
        ("concat", "split"),
        ("deformable", "spatial_temporal"),
        ("deformable", "temporal_spatial"),
    ],
)
def test_scripted_sst_attention_matches_eager(fusion, order, tmp_path):
    import stt_kernels

    module = stt_kernels.SSTAttention(8, 2, offset_groups=2, fusion=fusion, order=order).double()
    if fusion == "deformable":
        torch.nn.init.normal_(module.fusion.predictor.weight, std=0.1)  # offsets that move the samples
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, tmp_path / "sst.pt")
    loaded = torch.jit.load(tmp_path / "sst.pt")
    x = torch.randn(2, 8, 3, 4, 5, dtype=F64, requires_grad=True)
    eager = module(x)
    grad_eager = torch.autograd.grad(eager.sum(), x)[0]
    for candidate in (scripted, loaded):
        ours = candidate(x)
        torch.testing.assert_close(ours, eager)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], grad_eager)
    with pytest.raises(torch.jit.Error, match=r"SSTAttention expects x of shape \(B, C=8, T, H, W\) with T, H, W"):
        scripted(torch.randn(2, 8, 3, 0, 5, dtype=F64))


@pytest.mark.parametrize("preset", ["tiny-cpu", "mitoem-r"])
def test_scripted_model_matches_eager(preset):
    from stt_model.build import build_model

    model = build_model(preset).double().train()
    scripted = torch.jit.script(model)
    x = torch.rand(1, 1, 8, 16, 16, dtype=F64)
    if preset == "tiny-cpu":
        # One call through the profiling executor's optimised graph, as a deployment runs it.
        torch.testing.assert_close(scripted(x).detach(), model(x).detach())
    # The rest without the executor's optimisation passes, which take tens of seconds here per
    # new graph; what they compile is the same program.
    with torch.jit.optimized_execution(False):
        ours, eager = scripted(x), model(x)
        torch.testing.assert_close(ours, eager)
        params = [p for p in model.parameters() if p.requires_grad]
        for g_ours, g_eager in zip(
            torch.autograd.grad(ours.square().sum(), params), torch.autograd.grad(eager.square().sum(), params)
        ):
            torch.testing.assert_close(g_ours, g_eager)
        with pytest.raises(torch.jit.Error, match="STTUNet needs"):
            scripted(torch.rand(1, 1, 8, 12, 16, dtype=F64))
    graph = str(scripted.inlined_graph)
    assert "aten::zeros_like" not in graph  # the eager batch-1 workaround is not compiled in


def test_traced_model_backward_matches_eager():
    model = _tiny_model().double().train()
    x = torch.rand(2, 1, 8, 32, 32, dtype=F64)
    traced = torch.jit.trace(model, x, check_trace=False)
    fresh = torch.rand(2, 1, 8, 32, 32, dtype=F64)
    ours, eager = traced(fresh), model(fresh)
    torch.testing.assert_close(ours, eager)
    params = list(model.parameters())
    for g_ours, g_eager in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(eager.sum(), params)):
        torch.testing.assert_close(g_ours, g_eager)
