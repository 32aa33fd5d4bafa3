"""The CUDA attention kernels at head dims 129-256: the forward and dQ kernels' second instance
(4 query rows of 8 chunks of 32 columns per lane, chosen at launch for d > 128), checked against
the float64 oracle on a GPU; without one, that the build compiled those instances for every
target, without spills (the build's ptxas record)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import GPU, available

import stt_kernels
from stt_kernels import _ptxas, reference

BUILD_INFO = Path(stt_kernels.__file__).with_name("_build_info.json")
OPS = {"spatial": stt_kernels.spatial_attention, "temporal": stt_kernels.temporal_attention}
SPECS = {"spatial": reference.spatial_attention, "temporal": reference.temporal_attention}

requires_cuda = pytest.mark.skipif(not (GPU and available("cuda")), reason="needs a GPU and the compiled cuda backend")


def _cuda_records() -> list[_ptxas.KernelResources]:
    record = json.loads(BUILD_INFO.read_text())
    if record.get("mode") != "cuda":
        pytest.skip(f"this build has no CUDA kernels (mode {record.get('mode')!r})")
    records = (record.get("cuda_resources") or {}).get("csrc/cuda/attention_kernel.cu")
    assert records, "no ptxas report of attention_kernel.cu: rebuild it (rm -r build/temp-cuda-*)"
    return _ptxas.from_records(records)


@pytest.mark.parametrize("kernel", ["attention_forward_kernel", "attention_backward_dq_kernel"])
def test_both_register_shapes_are_compiled_for_every_target_without_spills(kernel):
    """One instance per (dtype, chunks): 4 chunks for d <= 128, 8 for d <= 256, each for every
    arch the build targets; none may spill (the build-wide check is test_cuda_resources)."""
    kernels = [k for k in _cuda_records() if kernel in k.kernel]
    archs = set(json.loads(BUILD_INFO.read_text())["archs"].split(","))
    by_arch: dict[str, set[str]] = {}
    for k in kernels:
        by_arch.setdefault(k.arch, set()).add(k.kernel)
    assert set(by_arch) == archs
    for arch, names in by_arch.items():
        assert len(names) == 8, f"{kernel} on {arch}: want 4 dtypes x 2 chunk counts, got {sorted(names)}"
    assert _ptxas.violations(kernels) == []


def _qkv(shape, dtype):
    b, t, h, w, heads, d = shape
    qkv = torch.randn(b, t, h, w, 3, heads, d, dtype=dtype, device="cuda")
    return [x.requires_grad_() for x in qkv.unbind(4)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "kind, shape",
    [
        ("spatial", (1, 2, 5, 13, 1, 129)),  # 65 queries: several row groups, a partial key tile
        ("spatial", (1, 1, 9, 15, 2, 256)),  # 135 keys: five key tiles
        ("temporal", (2, 7, 3, 2, 1, 200)),  # one tile per sequence (the short path)
        ("temporal", (1, 40, 2, 1, 1, 256)),  # T = 40: two key tiles
    ],
    ids=["spatial-d129", "spatial-d256", "temporal-d200", "temporal-40-d256"],
)
def test_values_and_gradients_against_float64(dtype, kind, shape):
    q, k, v = _qkv(shape, dtype)
    grad = torch.randn(q.shape, dtype=dtype, device="cuda")
    out = OPS[kind](q, k, v, backend="cuda")
    ours = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = SPECS[kind](q64, k64, v64, shape[-1] ** -0.5)
    wanted = (want, *torch.autograd.grad(want, (q64, k64, v64), grad.double()))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, got, expected in zip(("out", "grad_q", "grad_k", "grad_v"), ours, wanted):
        scale = expected.abs().max().item()
        assert (got.double() - expected).abs().max().item() <= tol * scale, name


@requires_cuda
def test_auto_takes_the_cuda_kernels_for_float64_at_d_256():
    """float64 GPU tensors (which Triton does not take) at d = 256 no longer fall back to the reference."""
    assert (
        stt_kernels.backend.resolve(
            "auto", torch.device("cuda"), "spatial_attention", frozenset(stt_kernels.BACKENDS), torch.float64, 256
        )
        == "cuda"
    )
