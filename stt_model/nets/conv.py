"""``Conv3d``: ``nn.Conv3d`` that keeps oneDNN on the CPU for a batch of one."""

from __future__ import annotations

import torch
from torch import nn

from .capture import capturing_graph

# PyTorch's CPU rule (aten/src/ATen/native/Convolution.cpp, ConvParams::use_mkldnn): a batch of one
# takes oneDNN only when N * C * D0 * D1 of the input exceeds this.
_ONEDNN_MIN_ELEMENTS = 20480


def _takes_reference_conv(input: torch.Tensor) -> bool:
    """Whether PyTorch would run this eager float32 CPU input on its slow reference convolution."""
    return (
        not capturing_graph()
        and input.dim() == 5
        and input.size(0) == 1
        and input.device.type == "cpu"
        and input.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and input.size(1) * input.size(2) * input.size(3) <= _ONEDNN_MIN_ELEMENTS
    )


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, same ``state_dict``) that stays on oneDNN for a float32
    CPU batch of one.

    PyTorch picks its slow reference convolution on the CPU when ``N == 1`` and
    ``N * C * T * H <= 20480``, a rule tuned on 2-d images: for our 3-d feature maps (a
    ``1 x 8 x 8 x 128 x 128`` input, say) that is 6-10x slower, forward and backward. Batch-1
    training on large patches and the last window of a sliding-window pass hit it. Such an
    input gets a zero second sample, which puts both passes on oneDNN at twice the work and
    contributes nothing to any gradient. Only in eager (and ``torch.compile``) execution: a
    traced, scripted or exported graph runs the plain convolution (:func:`.capture.capturing_graph`).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Scripted, the check is left out whole (TorchScript does not compile the body of a
        # false is_scripting() test, and the mkldnn queries do not script).
        if not torch.jit.is_scripting():
            if _takes_reference_conv(input):
                pair = torch.cat([input, torch.zeros_like(input)])
                return self._conv_forward(pair, self.weight, self.bias)[:1]
        return self._conv_forward(input, self.weight, self.bias)
