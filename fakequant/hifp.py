"""Compatibility names for users of the earlier HiFloat helpers (``shared/spec/formats.md`` §6).

``quant_hif8`` is the per-tensor scaled HiF8 of the earlier system with the corrected rules of formats.md
§12.9; the elementwise HiF8 it applies is ``fakequant.quant_dequant(..., QType("hif8"))``, so this module
has no numerics of its own. The GEMM wrappers ``hifp_matmul`` / ``hifp_baddbmm`` belong here too and come
with the autograd layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import quant_dequant
from .formats._common import saturating_cast
from .qtype import QType

__all__ = ["quant_hif8"]

_HIF8 = QType("hif8")
HIF8_SCALED_TARGET = 8.0  # the tensor's amax is mapped to 8, in the 3-mantissa-bit binades of HiF8


def quant_hif8(x: Tensor) -> Tensor:
    """Per-tensor scaled HiF8 of ``x`` (formats.md §6), in ``x``'s dtype; ``x`` is never modified.

    amax = max|x| in fp32, scale = fl32(8 / amax), result = fl32(hif8(fl32(x * scale)) / scale). A NaN or
    ±inf anywhere makes the whole result NaN; amax = 0 gives zeros. Computed without reading values back to
    the host, so it does not synchronise an accelerator.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"quant_hif8 expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quant_hif8 needs a floating tensor (float32, bfloat16, float16, float64), got {x.dtype}")
    if x.numel() == 0:
        return x.clone()
    x32 = x.to(torch.float32)  # exact for fp16/bf16; fp64 is rounded to fp32 first (formats.md §0)
    amax = x32.abs().amax()  # NaN if any NaN, inf if any inf
    finite = torch.isfinite(amax)
    # amax = 0: any positive scale maps the zeros to +0 (HiF8 has only +0), so use 1 and skip 8/0 = inf.
    safe_amax = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    scale = HIF8_SCALED_TARGET / safe_amax  # fl32(8 / amax)
    q = quant_dequant(x32 * scale, _HIF8)
    # Dividing by NaN turns every element NaN when the tensor holds a NaN or ±inf.
    divisor = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return saturating_cast(q / divisor, x.dtype)


# --------------------------------------------------------------------- GEMMs (the earlier hifp module's)
__all__ += ["hifp_matmul", "hifp_baddbmm"]
_HIF8_GEMM_CONFIG: list = []  # the FakeQuantConfig behind hifp_matmul/hifp_baddbmm, built on first use


def _hif8_gemm_config():
    """Every operand of every GEMM (A, B and the gradients) in elementwise HiF8."""
    if not _HIF8_GEMM_CONFIG:
        from .config import FakeQuantConfig

        _HIF8_GEMM_CONFIG.append(FakeQuantConfig(input="hif8", weight="hif8", grad_output="hif8"))
    return _HIF8_GEMM_CONFIG[0]


def hifp_matmul(A: Tensor, B: Tensor) -> Tensor:
    """``torch.matmul(A, B)`` with A, B and the gradients in HiF8 (elementwise, formats.md §6).

    Deliberate change from the earlier library: HiF8 rounding is exact (no log2 + epsilon, ties away on
    the exact value) and the result has torch.matmul's dtype (autocast included). HiF8 is elementwise, so
    quantizing per GEMM gives the same operands as quantizing once.
    """
    from .autograd import quant_matmul

    return quant_matmul(A, B, _hif8_gemm_config())


def hifp_baddbmm(input: Tensor, batch1: Tensor, batch2: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)`` with batch1, batch2 and their
    gradients in HiF8; ``input`` and its gradient stay in high precision (the earlier library quantized the
    gradient of ``input`` too). Same deliberate change as ``hifp_matmul``."""
    from .autograd import quant_baddbmm

    return quant_baddbmm(input, batch1, batch2, beta, alpha, _hif8_gemm_config())
