"""Whether the network runs to be recorded into a graph rather than for its result.

Eager CPU execution gains from layout conversions (channels-last 3D for oneDNN) and from the
batch-1 oneDNN workaround of :mod:`.conv`; a recorded graph would carry them to every runtime
it is loaded in (twice the conv work in LibTorch, ``memory_format`` that the legacy ONNX
exporter refuses), so they are applied only when this is false.
"""

from __future__ import annotations

import torch
import torch.fx._symbolic_trace


def capturing_graph() -> bool:
    """True under ``torch.jit.script``, ``torch.jit.trace`` (so the legacy ONNX exporter, which
    traces), ``torch.fx.symbolic_trace``, ``torch.export`` and both ONNX exporters; false in eager
    and under ``torch.compile``, whose graph runs only in this process and keeps the eager choices."""
    if torch.jit.is_scripting():
        # TorchScript compiles this branch alone: the calls below are not scriptable.
        return True
    # The ONNX exporters need no test of their own: the legacy one traces, the dynamo one
    # exports (and torch.onnx.is_in_onnx_export costs 5 us, on every conv of an eager pass).
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
