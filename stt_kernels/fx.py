"""The public ops as leaves of ``torch.fx`` graphs.

``torch.fx.symbolic_trace`` (and tracers built on it, such as torchvision's feature extraction)
calls the Python functions with ``Proxy`` arguments; the ops' input checks cannot read a Proxy.
Each public function asks :func:`leaf_call` first: while tracing it records one
``call_function`` node of the function itself, which runs (checks, backend choice and all)
when the graph runs. This works at every call site, where ``torch.fx.wrap`` patches only the
globals of one module.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.fx


def leaf_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Optional[torch.fx.Proxy]:
    """The graph node of ``fn(*args, **kwargs)`` if an argument is a ``torch.fx.Proxy``, else None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.fx.Proxy):
            return value.tracer.create_proxy("call_function", fn, args, kwargs)
    return None
