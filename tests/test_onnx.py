"""ONNX export of the stt ops and of STT-UNET (stt_kernels.onnx), run in onnxruntime against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import stt_kernels  # noqa: E402
import stt_kernels.onnx as stt_onnx  # noqa: E402
from stt_kernels import reference  # noqa: E402

Dim = torch.export.Dim


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, *inputs: torch.Tensor) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})


def _close(got: np.ndarray, expected: torch.Tensor, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-4, atol=atol)


def _standard_nodes(path) -> list[str]:
    """The op types of the saved graph, failing on any node outside the standard ONNX domain."""
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [stt_onnx.OPSET]
    foreign = [(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert not foreign and not model.functions, foreign
    return [n.op_type for n in model.graph.node]


class _Attention(torch.nn.Module):
    """Both attention ops with both of their outputs (out and the log-sum-exp)."""

    def forward(self, q, k, v):
        ops = torch.ops.stt
        spatial = ops.spatial_attention.default(q, k, v, 0.4, "auto")
        temporal = ops.temporal_attention.default(q, k, v, 0.7, "auto")
        return (*spatial, *temporal)


def _attention_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) * 2 for _ in range(3))


def _check_attention(session, shape, seed):
    q, k, v = _attention_inputs(shape, seed)
    got = _run(session, q, k, v)
    expected = _Attention()(q, k, v)
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        _close(g, e)
    _close(got[0], reference.spatial_attention(q, k, v, 0.4))
    _close(got[2], reference.temporal_attention(q, k, v, 0.7))


def test_attention_dynamo_dynamic_shapes(tmp_path):
    path = tmp_path / "attention.onnx"
    dims = {0: Dim("b"), 1: Dim("t"), 2: Dim("h"), 3: Dim("w")}
    stt_onnx.export(_Attention(), _attention_inputs((2, 3, 5, 7, 2, 4), 0), path, dynamic_shapes=(dims,) * 3)
    nodes = _standard_nodes(path)
    assert "Softmax" not in nodes and nodes.count("MatMul") == 4
    session = _session(path)
    # Fresh inputs at the traced shape and at other odd sizes and batches.
    for shape, seed in (((2, 3, 5, 7, 2, 4), 1), ((3, 5, 3, 9, 2, 4), 2), ((1, 1, 1, 2, 2, 4), 3)):
        _check_attention(session, shape, seed)


def test_attention_legacy_exporter(tmp_path):
    path = tmp_path / "attention.onnx"
    names = ["q", "k", "v"]
    stt_onnx.export(
        _Attention(),
        _attention_inputs((2, 3, 5, 7, 2, 4), 0),
        path,
        dynamo=False,
        input_names=names,
        dynamic_axes={n: {0: "b", 1: "t", 2: "h", 3: "w"} for n in names},
    )
    _standard_nodes(path)
    session = _session(path)
    for shape, seed in (((2, 3, 5, 7, 2, 4), 1), ((1, 4, 3, 5, 2, 4), 2)):
        _check_attention(session, shape, seed)


# (mask, bias, stride, padding, dilation, weight groups); offset groups 2 throughout.
DEFORM_CASES = [
    (True, True, 1, 1, 1, 1),
    (False, True, 2, 2, 2, 2),
    (True, False, 1, 0, 1, 2),
    (False, False, 1, 1, 1, 1),
]


class _Deform(torch.nn.Module):
    def __init__(self, mask: bool, bias: bool, stride: int, padding: int, dilation: int):
        super().__init__()
        self.use_mask, self.use_bias, self.args = mask, bias, (stride, padding, dilation)

    def forward(self, x, offset, mask, weight, bias):
        return stt_kernels.deform_conv2d(
            x, offset, mask if self.use_mask else None, weight, bias if self.use_bias else None, *self.args
        )


def _deform_inputs(case, seed, n=2, h=9, w=11):
    _, _, stride, padding, dilation, weight_groups = case
    g = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - 2 * dilation - 1) // stride + 1
    wo = (w + 2 * padding - 2 * dilation - 1) // stride + 1
    # Offsets of a few pixels: fractional points, and points beyond every border.
    return (
        torch.randn(n, 4, h, w, generator=g),
        torch.randn(n, 2 * 2 * 9, ho, wo, generator=g) * 3,
        torch.rand(n, 2 * 9, ho, wo, generator=g),
        torch.randn(6, 4 // weight_groups, 3, 3, generator=g),
        torch.randn(6, generator=g),
    )


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("case", DEFORM_CASES, ids=lambda c: "mask{}-bias{}-s{}-p{}-d{}-wg{}".format(*map(int, c)))
def test_deform_conv2d(tmp_path, case, dynamo):
    path = tmp_path / "deform.onnx"
    module = _Deform(*case[:5])
    inputs = _deform_inputs(case, 0)
    names = ["x", "offset", "mask", "weight", "bias"]
    if dynamo:
        n = Dim("n")
        stt_onnx.export(module, inputs, path, dynamic_shapes=({0: n}, {0: n}, {0: n}, None, None))
    else:
        stt_onnx.export(
            module,
            inputs,
            path,
            dynamo=False,
            input_names=names,
            dynamic_axes={"x": {0: "n"}, "offset": {0: "n"}, "mask": {0: "n"}},
        )
    assert _standard_nodes(path).count("DeformConv") == 1
    session = _session(path)
    for seed, n in ((1, 2), (2, 3)):
        fresh = _deform_inputs(case, seed, n=n)
        x, offset, mask, weight, bias = fresh
        expected = reference.deform_conv2d(
            x,
            offset,
            mask if case[0] else None,
            weight,
            bias if case[1] else None,
            (case[2],) * 2,
            (case[3],) * 2,
            (case[4],) * 2,
        )
        feeds = dict(zip(names, fresh))
        got = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
        _close(got, expected, atol=1e-4)


def _tiny_model() -> torch.nn.Module:
    """tiny-cpu with every weight moved off its initial value (the offset predictor starts at 0)."""
    from stt_model.build import build_model

    torch.manual_seed(0)
    model = build_model("tiny-cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "predictor" in name else 0.05))
    return model


@pytest.mark.slow
def test_tiny_cpu_dynamo_dynamic_shapes(tmp_path):
    model = _tiny_model()
    path = tmp_path / "tiny.onnx"
    dims = {0: Dim("batch", min=1), 2: Dim("t", min=1), 3: 8 * Dim("h8", min=1), 4: 8 * Dim("w8", min=1)}
    stt_onnx.export(model, (torch.rand(2, 1, 2, 16, 16),), path, dynamic_shapes=(dims,))
    nodes = _standard_nodes(path)
    assert nodes.count("DeformConv") == 3
    session = _session(path)
    g = torch.Generator().manual_seed(1)
    # H 24 puts 6 and 3 (odd) before the SST levels; batch 3, odd T.
    for shape in ((2, 1, 2, 16, 16), (3, 1, 3, 24, 8), (1, 1, 5, 8, 16)):
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            _close(_run(session, x)[0], model(x), atol=1e-4)


def test_tiny_cpu_legacy_exporter(tmp_path):
    """The TorchScript-based exporter records the sizes it traced (the network's Python-int
    reshapes), so its graph is checked at the traced shape, with fresh values."""
    model = _tiny_model()
    path = tmp_path / "tiny.onnx"
    stt_onnx.export(model, (torch.rand(2, 1, 3, 16, 24),), path, dynamo=False, input_names=["x"])
    assert _standard_nodes(path).count("DeformConv") == 3
    x = torch.rand(2, 1, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(_run(_session(path), x)[0], model(x), atol=1e-4)


@pytest.mark.parametrize("opset", [18, 21, "20"])
def test_opset_outside_deformconv_range_is_refused(tmp_path, opset):
    with pytest.raises(ValueError, match="opset must be an int from 19"):
        stt_onnx.export(_Attention(), _attention_inputs((1, 2, 2, 2, 1, 4), 0), tmp_path / "x.onnx", opset=opset)
    assert not (tmp_path / "x.onnx").exists()
