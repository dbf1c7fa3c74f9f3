"""Symmetric int8 with one scale per slice along the axis (``shared/spec/formats.md`` §10).

``int8sym`` has no blocks: every slice of the tensor along ``q.q_dim`` (e.g. every row for ``dim=-1``)
shares ``step = fl32(amax / 127)``; elements are ``min(RNE(fl32(|x| / step)), 127) * step`` with the sign
of the input. The reduction runs along the axis in place, so no transpose or padding is materialised.

Public: ``quant_dequant_int8sym``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..qtype import QType
from ._common import FLT_MAX

__all__ = ["quant_dequant_int8sym", "INT8_MAX"]

INT8_MAX = 127.0


def quant_dequant_int8sym(x: Tensor, q: QType) -> Tensor:
    """``int8sym`` along ``q.q_dim`` of float32 ``x`` (§10).

    A zero slice gives zeros, and so does a slice whose step underflows to 0 (amax <= 63 * 2^-149, where
    ``|x| / step`` would be inf or NaN); a slice holding a NaN or ±inf is NaN.
    """
    y = x.abs()  # the one full-size buffer; every step below works in place
    amax = y.amax(dim=q.q_dim, keepdim=True)  # one maximum per slice; NaN/inf propagate
    step = amax / torch.tensor(INT8_MAX, dtype=torch.float32, device=x.device)  # fl32(amax/127)
    live = step > 0  # False for zero or underflowed steps and for NaN
    # Dead slices divide by 1 (any finite quotient) and multiply by 0; NaN/inf slices multiply by NaN.
    step_div = torch.where(live, step, 1.0)
    step_mul = torch.where(torch.isfinite(amax), torch.where(live, step, 0.0), float("nan"))
    y.div_(step_div).round_().clamp_(max=INT8_MAX)  # q = min(RNE(fl32(|x|/step)), 127); round_ is half-even
    # ±q * step: the sign first (rounding is symmetric), -0 for negative x, +0 for x = ±0 (§0 Sign).
    y.copysign_(x).masked_fill_(x == 0, 0.0).mul_(step_mul)
    # 127 * fl32(FLT_MAX / 127) rounds up to inf; a finite result beyond float32 saturates (formats.md §0).
    return y.clamp_(min=-FLT_MAX, max=FLT_MAX)
