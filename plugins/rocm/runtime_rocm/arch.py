"""What an AMD GPU architecture (its ``gcnArchName``) decides: which fp8 formats it computes in.

MI300 (gfx942) implements the FNUZ fp8 formats (no negative zero, no infinities, exponent bias
one higher: ``float8_e4m3fnuz`` tops out at 240); MI350 (gfx950) and RDNA4 (gfx12) the OCP ones
that NVIDIA uses (``float8_e4m3fn``, 448). A checkpoint's or cache's OCP fp8 values must be
converted for gfx942, never reinterpreted.
"""

from __future__ import annotations

import torch

FNUZ_ARCHS = ("gfx942",)
OCP_ARCHS = ("gfx950", "gfx1200", "gfx1201")


def base_arch(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"`` (the features after the colons do not matter here)."""
    return gcn_arch_name.split(":", 1)[0].strip()


def fp8_dtype(arch: str) -> torch.dtype | None:
    """The e4m3 type the architecture's matrix cores take, or None where it has no fp8."""
    if arch in FNUZ_ARCHS:
        return torch.float8_e4m3fnuz
    if arch in OCP_ARCHS:
        return torch.float8_e4m3fn
    return None


def ocp_fp8(arch: str) -> bool:
    """Whether the architecture converts OCP fp8 (the KV cache's ``fp8_e4m3``/``fp8_e5m2``) in hardware."""
    return arch in OCP_ARCHS
