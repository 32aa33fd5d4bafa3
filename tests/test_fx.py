"""``torch.fx``: the public ops are leaves of symbolically traced graphs (one ``call_function``
node each, run with their checks when the graph runs), so ``symbolic_trace`` of ``SSTAttention``
and of the STT-UNET, and torchvision's feature extraction over them, work and match eager.
"""

from __future__ import annotations

import pytest
import torch

import stt_kernels
from stt_kernels import ops
from stt_kernels.nn.sst import FUSIONS, ORDERS

F64 = torch.float64


def _call_targets(graph_module: torch.fx.GraphModule) -> list:
    return [node.target for node in graph_module.graph.nodes if node.op == "call_function"]


class _UsesOps(torch.nn.Module):
    """A user's module calling the functional ops directly."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, 3, 3, dtype=F64))

    def forward(self, q, k, v, x, offset):
        attended = stt_kernels.spatial_attention(q, k, v) + ops.temporal_attention(q, k, v, scale=0.5)
        return attended.sum(), stt_kernels.deform_conv2d(x, offset, None, self.weight)


def test_symbolic_trace_records_each_op_as_one_node():
    module = _UsesOps()
    graph_module = torch.fx.symbolic_trace(module)
    targets = _call_targets(graph_module)
    for op in (stt_kernels.spatial_attention, stt_kernels.temporal_attention, stt_kernels.deform_conv2d):
        assert targets.count(op) == 1, targets
    q, k, v = torch.randn(3, 2, 3, 4, 5, 2, 4, dtype=F64).unbind(0)
    x, offset = torch.randn(2, 4, 5, 6, dtype=F64), torch.randn(2, 18, 5, 6, dtype=F64)
    for ours, eager in zip(graph_module(q, k, v, x, offset), module(q, k, v, x, offset)):
        torch.testing.assert_close(ours, eager)


def test_traced_graph_checks_input_when_it_runs():
    graph_module = torch.fx.symbolic_trace(_UsesOps())
    q, k, v = torch.randn(3, 2, 3, 4, 5, 2, 4, dtype=F64).unbind(0)
    x = torch.randn(2, 4, 5, 6, dtype=F64)
    with pytest.raises(ValueError, match="offset must have shape"):
        graph_module(q, k, v, x, torch.randn(2, 18, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="k must have the shape of q"):
        graph_module(q, k[:, :1], v, x, torch.randn(2, 18, 5, 6, dtype=F64))


@pytest.mark.parametrize("fusion, order", [(f, "split") for f in FUSIONS] + [("deformable", o) for o in ORDERS[1:]])
def test_symbolic_trace_of_sst_attention_matches_eager(fusion, order):
    module = stt_kernels.SSTAttention(8, 2, fusion=fusion, order=order).double()
    if fusion == "deformable":
        torch.nn.init.normal_(module.fusion.predictor.weight, std=0.1)  # offsets that move the samples
    graph_module = torch.fx.symbolic_trace(module)
    targets = _call_targets(graph_module)
    assert stt_kernels.spatial_attention in targets and stt_kernels.temporal_attention in targets
    assert (stt_kernels.deform_conv2d in targets) == (fusion == "deformable")
    x = torch.randn(2, 8, 3, 4, 5, dtype=F64, requires_grad=True)
    ours, eager = graph_module(x), module(x)
    torch.testing.assert_close(ours, eager)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(eager.sum(), x)[0])
    with pytest.raises(ValueError, match=r"SSTAttention expects x of shape \(B, C=8, T, H, W\)"):
        graph_module(torch.randn(2, 7, 3, 4, 5, dtype=F64))


def test_symbolic_trace_of_the_tiny_model_matches_eager_without_the_eager_workarounds():
    from stt_model.build import build_model

    model = build_model("tiny-cpu").eval()
    graph_module = torch.fx.symbolic_trace(model)
    names = {getattr(t, "__name__", str(t)) for t in _call_targets(graph_module)}
    assert {"spatial_attention", "temporal_attention", "deform_conv2d"} <= names
    assert "cat" not in names and "zeros_like" not in names  # the batch-1 oneDNN workaround stays eager
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))
    with pytest.raises(ValueError, match="STTUNet needs"):
        graph_module(torch.rand(1, 1, 8, 30, 32))


def test_torchvision_feature_extraction_over_the_tiny_model():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    from stt_model.build import build_model

    model = build_model("tiny-cpu").eval()
    train_names, eval_names = feature_extraction.get_graph_node_names(model)
    assert "encoder_sst.3.spatial.spatial_attention" in eval_names
    extractor = feature_extraction.create_feature_extractor(
        model, return_nodes={"encoder_sst.2": "level2", "encoder_sst.3.fusion.deform_conv2d": "fused", "head": "out"}
    )
    x = torch.rand(2, 1, 8, 32, 32)
    captured = {}
    hooks = [
        model.encoder_sst[2].register_forward_hook(lambda m, i, o: captured.__setitem__("level2", o)),
        model.head.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o)),
    ]
    with torch.no_grad():
        features = extractor(x)
        model(x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(features["level2"], captured["level2"])
    torch.testing.assert_close(features["out"], captured["out"])
    assert features["fused"].shape == (2 * 8, 24, 4, 4)  # the deformable conv per slice at 1/8 scale
