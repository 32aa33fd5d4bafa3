"""Triton kernels launch on the GPU their tensors live on, not on the current device (a rank
predicting on cuda:1 must not launch on GPU 0)."""

import contextlib

import torch

from stt_kernels.triton.launch import on_tensor_device


class _FakeTensor:
    def __init__(self, device: str):
        self.device = torch.device(device)


def test_the_kernel_runs_under_its_first_tensors_gpu(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", record)
    seen = []
    kernel = on_tensor_device(lambda first, *rest, **kw: seen.append((len(entered), rest, kw)) or "done")
    assert kernel(_FakeTensor("cuda:1"), 2, scale=0.5) == "done"
    assert entered == [torch.device("cuda:1")] and seen == [(1, (2,), {"scale": 0.5})]


def test_cpu_tensors_need_no_guard(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda device: (_ for _ in ()).throw(AssertionError("guarded")))
    assert on_tensor_device(lambda first: first.device.type)(_FakeTensor("cpu")) == "cpu"
