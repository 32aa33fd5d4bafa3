"""TorchScript (``torch.jit.script`` / ``torch.jit.trace``) of the ops, ``SSTAttention`` and the
STT-UNET, and graphs that stay portable: a traced, scripted or exported network carries neither
the eager batch-1 oneDNN workaround (concatenate zeros, convolve, slice) nor ``memory_format``
conversions (the legacy ONNX exporter refuses them).
"""

from __future__ import annotations

import warnings

import pytest
import torch

# The network's input checks compare sizes in Python; the tracer warns that they are not recorded.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                                        "ignore:`torch.jit.script` is deprecated:FutureWarning",
                                        "ignore:`torch.jit.trace.*` is deprecated:FutureWarning")

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

    def scripted_flag(x: torch.Tensor) -> bool:
        return capturing_graph()

    assert torch.jit.script(scripted_flag)(torch.rand(1)) is True
