"""Fault: an RMSNorm kernel that forgets epsilon."""

import torch

from ._cpu import cpu_plugin

PLATFORM = "broken-rms-norm"


def rms_norm_without_epsilon(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) * weight.float()).to(x.dtype)


plugin = cpu_plugin(PLATFORM, kernels={"rms_norm": rms_norm_without_epsilon})
