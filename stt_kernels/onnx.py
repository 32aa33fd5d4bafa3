"""ONNX export of the ``stt`` ops: each custom op written in standard ONNX operators.

An ONNX runtime knows nothing of ``stt::spatial_attention`` and friends, so the exporters are
taught to spell them out, in opset :data:`OPSET` (20, the newest both exporters write):

- ``spatial_attention`` / ``temporal_attention``: ``Reshape``/``Transpose`` into
  ``(..., N, d)`` sequences, ``MatMul``, a max-shifted softmax (``ReduceMax``, ``Exp``,
  ``ReduceSum``), ``MatMul``; the op's second output, the log-sum-exp ``m + log(sum)``, comes
  from the same reductions. Sizes are read with ``Shape`` when the graph runs, so batch, T, H
  and W stay dynamic. The math runs in float32, as the kernels accumulate, and the output is
  cast back to the inputs' type.
- ``deform_conv2d``: ONNX's ``DeformConv`` (opset 19), whose offsets are laid out and sampled
  as torchvision's (bilinear, zero outside the image). onnxruntime runs it on the CPU, matching
  the reference (``tests/test_onnx.py``); spelling the sampling out in ``GatherElements`` and
  arithmetic instead would cost a dozen nodes and four gathers per tap for no gain there.

The ops' ``backend`` argument means nothing in ONNX (the runtime picks its own kernels) and is
dropped. Both of torch's exporters are taught: :func:`translation_table` for the dynamo exporter
(``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``) and
:func:`register_legacy_symbolics` for the TorchScript-based one (``dynamo=False``).
:func:`export` runs either with the table or the symbolics in place::

    import stt_kernels.onnx
    stt_kernels.onnx.export(model, (x,), "model.onnx", dynamic_shapes=({0: "batch"},))
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import torch

OPSET = 20

_FLOAT = 1  # TensorProto.FLOAT, for Cast's 'to'


class _Emitter:
    """Adds ONNX nodes to the graph being built, for either exporter.

    The dynamo exporter traces onnxscript ops (``MatMul(a, b)``, attributes by keyword), the
    legacy one takes ``g.op("MatMul", a, b, perm_i=[...])`` with the attribute kind in a suffix;
    the ops' math is written once against this.
    """

    def __init__(self, legacy_graph: Optional[Any] = None):
        self._g = legacy_graph
        if legacy_graph is None:
            import onnxscript

            self._opset = onnxscript.values.Opset("", OPSET)

    def __call__(self, name: str, *inputs: Any, **attributes: Any) -> Any:
        if self._g is None:
            return getattr(self._opset, name)(*inputs, **attributes)
        return self._g.op(name, *inputs, **{f"{key}_{_legacy_kind(value)}": value for key, value in attributes.items()})

    def ints(self, values: Sequence[int]) -> Any:
        """A constant 1-d int64 tensor (axes, shapes)."""
        if self._g is None:
            return self("Constant", value_ints=list(values))
        return self._g.op("Constant", value_t=torch.tensor(list(values), dtype=torch.int64))

    def scalar(self, value: float) -> Any:
        """A constant float32 scalar."""
        if self._g is None:
            return self("Constant", value_float=float(value))
        return self._g.op("Constant", value_t=torch.tensor(float(value), dtype=torch.float32))

    def dims(self, x: Any, start: int, end: int) -> Any:
        """``shape(x)[start:end]`` as a 1-d int64 tensor, read when the graph runs."""
        # Slice, not Shape's own start/end: the legacy exporter's shape inference ignores those
        # and gives the Reshape that follows the wrong rank (Transpose then segfaults in torch).
        return self("Slice", self("Shape", x), self.ints([start]), self.ints([end]), self.ints([0]))


def _legacy_kind(value: Any) -> str:
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    if isinstance(value, str):
        return "s"
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return "i"
    raise TypeError(f"no ONNX attribute kind for {value!r}")


def _attend(op: _Emitter, q: Any, k: Any, v: Any, scale: float, rank: int) -> tuple[Any, Any]:
    """``softmax(q k^T * scale) v`` over rank-``rank`` sequences ``(..., N, d)``, in float32:
    ``out (..., N, d)`` (the input's dtype) and ``lse (..., N)`` (float32)."""
    last = op.ints([-1])
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    qf, kf, vf = (op("Cast", t, to=_FLOAT) for t in (q, k, v))
    scores = op("Mul", op("MatMul", qf, op("Transpose", kf, perm=swap)), op.scalar(scale))
    top = op("ReduceMax", scores, last, keepdims=1)
    weights = op("Exp", op("Sub", scores, top))
    total = op("ReduceSum", weights, last, keepdims=1)
    out = op("CastLike", op("MatMul", op("Div", weights, total), vf), q)
    lse = op("Squeeze", op("Add", top, op("Log", total)), last)
    return out, lse


# (B, T, H*W, heads, d) <-> (B, T, heads, H*W, d)
_SPATIAL_PERM = [0, 1, 3, 2, 4]
# (B, T, H, W, heads, d) -> (B, H, W, heads, T, d) and back
_TEMPORAL_PERM = [0, 2, 3, 4, 1, 5]
_TEMPORAL_BACK = [0, 4, 1, 2, 3, 5]


def _spatial_attention(op: _Emitter, q: Any, k: Any, v: Any, scale: float) -> tuple[Any, Any]:
    """``q, k, v (B, T, H, W, heads, d)`` -> ``out`` (the same), ``lse (B, T, heads, H*W)``."""
    tokens = op("Concat", op.dims(q, 0, 2), op.ints([-1]), op.dims(q, 4, 6), axis=0)

    def sequences(x: Any) -> Any:  # (B, T, heads, H*W, d)
        return op("Transpose", op("Reshape", x, tokens), perm=_SPATIAL_PERM)

    out, lse = _attend(op, sequences(q), sequences(k), sequences(v), scale, rank=5)
    return op("Reshape", op("Transpose", out, perm=_SPATIAL_PERM), op("Shape", q)), lse


def _temporal_attention(op: _Emitter, q: Any, k: Any, v: Any, scale: float) -> tuple[Any, Any]:
    """``q, k, v (B, T, H, W, heads, d)`` -> ``out`` (the same), ``lse (B, H*W, heads, T)``."""
    out, lse = _attend(op, *(op("Transpose", x, perm=_TEMPORAL_PERM) for x in (q, k, v)), scale, rank=6)
    # lse is (B, H, W, heads, T) here.
    lse_shape = op("Concat", op.dims(q, 0, 1), op.ints([-1]), op.dims(q, 4, 5), op.dims(q, 1, 2), axis=0)
    return op("Transpose", out, perm=_TEMPORAL_BACK), op("Reshape", lse, lse_shape)


def _deform_conv2d(
    op: _Emitter,
    x: Any,
    offset: Any,
    mask: Any,
    weight: Any,
    bias: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    offset_groups: int,
    channels: int,
    weight_channels: int,
) -> Any:
    """ONNX ``DeformConv`` with torchvision's argument order mapped onto its ``(X, W, offset, B, mask)``.

    ``channels`` is ``C`` of ``x (N, C, H, W)`` and ``weight_channels`` ``C / weight_groups``
    (``weight.shape[1]``); both are fixed by the weights, never dynamic.
    """
    inputs = [x, weight, offset]
    if bias is not None or mask is not None:
        inputs.append(bias if bias is not None else _empty_input(op))
    if mask is not None:
        inputs.append(mask)
    return op(
        "DeformConv",
        *inputs,
        strides=list(stride),
        pads=[padding[0], padding[1], padding[0], padding[1]],
        dilations=list(dilation),
        group=channels // weight_channels,
        offset_group=offset_groups,
    )


def _empty_input(op: _Emitter) -> Any:
    """An omitted optional input, where a later one is given."""
    if op._g is None:
        return None
    return op._g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())


# --- the dynamo exporter -------------------------------------------------------------------------


def _static_size(value: Any, dim: int, name: str) -> int:
    size = value.shape[dim]
    if not isinstance(size, int):
        raise ValueError(f"stt::deform_conv2d exports with a static {name}; got {size}")
    return size


def _dynamo_spatial(q: Any, k: Any, v: Any, scale: float, backend: str) -> tuple[Any, Any]:
    return _spatial_attention(_Emitter(), q, k, v, scale)


def _dynamo_temporal(q: Any, k: Any, v: Any, scale: float, backend: str) -> tuple[Any, Any]:
    return _temporal_attention(_Emitter(), q, k, v, scale)


def _dynamo_deform_conv2d(
    x: Any,
    offset: Any,
    mask: Any,
    weight: Any,
    bias: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    offset_groups: int,
    backend: str,
) -> Any:
    return _deform_conv2d(
        _Emitter(),
        x,
        offset,
        mask,
        weight,
        bias,
        stride,
        padding,
        dilation,
        offset_groups,
        _static_size(x, 1, "channel count C of x"),
        _static_size(weight, 1, "weight.shape[1]"),
    )


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: each ``stt`` op
    overload -> a function that writes it in opset :data:`OPSET` operators."""
    ops = torch.ops.stt
    return {
        ops.spatial_attention.default: _dynamo_spatial,
        ops.temporal_attention.default: _dynamo_temporal,
        ops.deform_conv2d.default: _dynamo_deform_conv2d,
    }


# --- the legacy (TorchScript) exporter -----------------------------------------------------------


def _legacy_symbolics() -> dict[str, Callable[..., Any]]:
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "v", "v", "f", "s")
    def spatial(g: Any, q: Any, k: Any, v: Any, scale: float, backend: str) -> tuple[Any, Any]:
        return _spatial_attention(_Emitter(g), q, k, v, scale)

    @sh.parse_args("v", "v", "v", "f", "s")
    def temporal(g: Any, q: Any, k: Any, v: Any, scale: float, backend: str) -> tuple[Any, Any]:
        return _temporal_attention(_Emitter(g), q, k, v, scale)

    @sh.parse_args("v", "v", "v", "v", "v", "is", "is", "is", "i", "s")
    def deform(
        g: Any,
        x: Any,
        offset: Any,
        mask: Any,
        weight: Any,
        bias: Any,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        offset_groups: int,
        backend: str,
    ) -> Any:
        channels, weight_channels = sh._get_tensor_dim_size(x, 1), sh._get_tensor_dim_size(weight, 1)
        if channels is None or weight_channels is None:
            raise ValueError(
                "stt::deform_conv2d exports with static channel counts of x and weight; the traced "
                "graph did not record them"
            )
        return _deform_conv2d(
            _Emitter(g),
            x,
            offset,
            None if sh._is_none(mask) else mask,
            weight,
            None if sh._is_none(bias) else bias,
            stride,
            padding,
            dilation,
            offset_groups,
            channels,
            weight_channels,
        )

    return {"stt::spatial_attention": spatial, "stt::temporal_attention": temporal, "stt::deform_conv2d": deform}


def register_legacy_symbolics(opset: int = OPSET) -> None:
    """Teach ``torch.onnx.export(..., dynamo=False)`` the ``stt`` ops (for ``opset`` and later);
    registering again replaces the earlier registration."""
    _check_opset(opset)
    for name, symbolic in _legacy_symbolics().items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, opset)


def _check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not 19 <= opset <= OPSET:
        raise ValueError(f"opset must be an int from 19 (ONNX's DeformConv) to {OPSET}; got {opset!r}")


def export(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    f: Union[str, os.PathLike],
    *,
    dynamo: bool = True,
    opset: int = OPSET,
    **kwargs: Any,
) -> None:
    """``torch.onnx.export(model, args, f, ...)`` with the ``stt`` ops written in standard operators.

    ``dynamo=True`` (the default) passes :func:`translation_table`; ``dynamo=False`` registers
    the legacy symbolics first. Other keyword arguments go to ``torch.onnx.export``
    (``dynamic_shapes`` for the dynamo exporter, ``dynamic_axes``/``input_names`` for the
    legacy one).
    """
    _check_opset(opset)
    if dynamo:
        table = {**translation_table(), **kwargs.pop("custom_translation_table", {})}
        torch.onnx.export(model, args, f, dynamo=True, opset_version=opset, custom_translation_table=table, **kwargs)
    else:
        register_legacy_symbolics(opset)
        torch.onnx.export(model, args, f, dynamo=False, opset_version=opset, **kwargs)
