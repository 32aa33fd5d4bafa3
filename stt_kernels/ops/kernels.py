"""Which backends have a kernel for which op, and how to call it.

The public ops (``stt::spatial_attention``, ...) are defined in C++ (``csrc/ops``) with their
autograd and CPU/CUDA kernels, so traced and exported graphs run without Python; while this
package is imported, those kernels hand every call to the op's Python implementation
(``stt::_<op>_python``, registered by the op modules with :func:`register_ops`), which chooses
the backend with :mod:`stt_kernels.backend`. A checkout without the compiled library defines
the same ops in Python instead (``torch.library.custom_op``, Python autograd).

The compiled library declares its kernels as ``torch.ops.stt._<op>_forward`` /
``_<op>_backward`` with CPU and/or CUDA implementations; whether a backend implements an op
is read off the dispatcher, so this table can never claim a kernel that was not built.
Triton kernels live in Python modules named here with :meth:`KernelTable.register_module`;
a module is imported on first use (importing Triton costs a second) and registers its
kernels with :meth:`KernelTable.register`. The op modules register ``reference`` kernels
(the plain-PyTorch spec in this calling convention), because ``auto`` is resolved when a
custom op runs (:meth:`KernelTable.for_call`), and it may resolve to ``reference`` there.

Output layout contract: the custom ops, not the kernels, fix the strides of what they return
(the fake kernels promise the same), so a kernel may return any layout.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .._extension import EXTENSION
from ..backend import check_deterministic_backward, resolve

# Backend name -> dispatch key of the compiled kernels it runs.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class Kernels:
    """One backend's forward and backward for one op, called as the op module documents."""

    forward: Callable[..., object]
    backward: Callable[..., object]


def _compiled_backends(op: str) -> frozenset[str]:
    if not EXTENSION.loaded:
        return frozenset()
    return frozenset(
        name
        for name, key in _DISPATCH_KEYS.items()
        if all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"stt::_{op}_{step}", key)
            for step in ("forward", "backward")
        )
    )


class KernelTable:
    """The kernels of one op, by backend."""

    def __init__(self, op: str):
        self.op = op
        self._python: dict[str, Kernels] = {}
        self._modules: dict[str, str] = {}
        # Read once, here: the library registered its kernels when it loaded (before this
        # module ran) and they do not change. A plain attribute, not a cached_property, whose
        # lock (Python 3.11) torch.compile cannot trace when the first call is compiled.
        self._compiled_backends = _compiled_backends(op)

    def register(self, backend: str, kernels: Kernels) -> None:
        self._python[backend] = kernels

    def register_module(self, backend: str, module: str) -> None:
        """``module`` (imported on first use) registers ``backend``'s kernels for this op."""
        self._modules[backend] = module

    def _compiled(self, backend: str) -> bool:
        return backend in self._compiled_backends

    def implemented(self) -> frozenset[str]:
        return frozenset({"reference", *self._python, *self._modules, *self._compiled_backends})

    def __call__(self, backend: str) -> Kernels:
        if backend not in self._python and backend in self._modules:
            importlib.import_module(self._modules[backend])
        if backend in self._python:
            return self._python[backend]
        if self._compiled(backend):
            ops = torch.ops.stt
            return Kernels(getattr(ops, f"_{self.op}_forward"), getattr(ops, f"_{self.op}_backward"))
        raise NotImplementedError(f"{self.op} has no '{backend}' kernel")

    def for_call(
        self, backend: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None
    ) -> Kernels:
        """The kernels a custom op runs for ``backend`` (a name or ``auto``) on ``dtype`` tensors on
        ``device`` (attention: of head dim ``head_dim``).

        Called inside the op's implementation, so an ``auto`` recorded in a traced or exported
        graph is resolved where and when the graph runs, not where it was traced.
        """
        return self(resolve(backend, device, self.op, self.implemented(), dtype, head_dim))

    def backward_for_call(
        self, backend: str, device: torch.device, dtype: torch.dtype, op: str, head_dim: Optional[int] = None
    ) -> Callable[..., object]:
        """The backward kernel of :meth:`for_call`, refused under deterministic mode where it is
        not deterministic (``op`` names the public op in the error)."""
        name = resolve(backend, device, self.op, self.implemented(), dtype, head_dim)
        check_deterministic_backward(name, op)
        return self(name).backward


def defined_in_cpp(op: str) -> bool:
    """Whether the loaded library defines the public op ``stt::<op>`` (a library built before
    the ops moved to C++ does not: the op is then defined here, in Python)."""
    if not EXTENSION.loaded:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"stt::{op}", "Autograd")
    except RuntimeError:  # no such op
        return False


def register_ops(
    op: str,
    forward: Callable[..., object],
    forward_fake: Callable[..., object],
    backward: Callable[..., object],
    backward_fake: Callable[..., object],
    setup_context: Callable[..., None],
    autograd_backward: Callable[..., object],
) -> None:
    """Give ``stt::<op>`` and ``stt::<op>_backward`` their Python halves.

    ``forward``/``backward`` are the implementations (their signatures are the schemas);
    ``*_fake`` the fake kernels (exact sizes and strides: the outputs are contiguous). With the
    C++ ops, the implementations serve ``stt::_<op>_python`` and ``stt::_<op>_backward_python``,
    the hand-off of the C++ kernels, and autograd is C++'s; without them, they define the ops
    here, with ``setup_context``/``autograd_backward`` as the autograd formula.
    """
    if defined_in_cpp(op):
        torch.library.register_kernel(f"stt::_{op}_python", ("cpu", "cuda"), forward)
        torch.library.register_kernel(f"stt::_{op}_backward_python", ("cpu", "cuda"), backward)
    else:
        torch.library.custom_op(f"stt::{op}", forward, mutates_args=())
        torch.library.custom_op(f"stt::{op}_backward", backward, mutates_args=())
        torch.library.register_autograd(f"stt::{op}", autograd_backward, setup_context=setup_context)
    # From the caller's module, which the C++ schemas name (m.set_python_module) as their fakes' home.
    torch.library.register_fake(f"stt::{op}", forward_fake, _stacklevel=2)
    torch.library.register_fake(f"stt::{op}_backward", backward_fake, _stacklevel=2)


_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor,
    torch._C.DispatchKey.ADInplaceOrView,
)


def spec_vjp(
    spec: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The gradients of ``spec(*inputs)`` weighted by ``grad``, from inside a custom op.

    A custom op's implementation runs with autograd's dispatch keys excluded; they are let back
    in for the spec alone. (torch.func.vjp would do it too, but its wrapper tensors break under
    dispatch modes that read storages, such as opcheck's.)
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(spec(*leaves), leaves, grad)


attention_kernels = KernelTable("attention")
deform_conv2d_kernels = KernelTable("deform_conv2d")
attention_kernels.register_module("triton", "stt_kernels.triton.attention")
deform_conv2d_kernels.register_module("triton", "stt_kernels.triton.deform_conv2d")
