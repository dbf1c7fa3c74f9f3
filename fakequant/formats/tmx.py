"""``tmx<N>``: a paired-exponent block float (``shared/spec/formats.md`` §5).

Public: ``quant_dequant_tmx`` ((float32 x, QType) -> exact float32 result of x's shape).

A 16-block along the axis is 8 pairs. Each pair takes the exponent of its own maximum, but never more than
one binade below the block's largest pair; its elements are then integers k times 2^(Q+1-M) with
|k| <= 2^M - 1, M = N - 2 fraction bits (so the mantissa k * 2^(1-M) is capped at 2 - 2^(1-M)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..qtype import QType
from ._common import exponent, pow2, to_blocks
from .hifloat import round_scaled

__all__ = ["quant_dequant_tmx"]

_TMX_BLOCK = 16
_E_MIN = -149  # E of the smallest fp32 subnormal


def _pow2_normal(e: Tensor) -> Tensor:
    """Exact float32 2^e for int32 e in [-126, 127], built from the exponent field."""
    return ((e + 127) << 23).view(torch.float32)


def quant_dequant_tmx(x: Tensor, q: QType) -> Tensor:
    """tmx<N> along ``q.q_dim`` (formats.md §5), M = ``q.man_bits`` = N - 2.

    Since a pair's exponent e2 never exceeds the block's eb, Q = max(e2, eb - 1) is eb for a pair holding a
    value of the block's top binade (its maximum is >= 2^eb) and eb - 1 for the others, zero pairs included.
    So every factor is the block's factor for Q = eb - 1, halved or doubled for the top pairs.
    """
    m = q.man_bits
    blocks, restore = to_blocks(x, q.q_dim, _TMX_BLOCK)  # [..., n, 16]
    pairs = blocks.unflatten(-1, (8, 2))  # [..., n, 8 pairs, 2]
    a = pairs.abs()
    v2 = a.amax(dim=-1)  # [..., n, 8]; NaN/inf propagate
    vb = v2.amax(dim=-1, keepdim=True)  # [..., n, 1]
    live = vb > 0  # all-zero blocks: only zeros come out, any exponent in range will do
    eb = torch.where(live, exponent(vb), torch.zeros_like(vb, dtype=torch.int32))
    # [..., n, 8]: 2^(Q - q_low), 2 for a top pair. When eb = -149 (the block's maximum is the smallest
    # subnormal) q_low is clamped up to eb itself, so the top pairs take Q = q_low, step 1.
    pair_step = 1.0 + ((v2 >= pow2(eb)) & (eb > _E_MIN)).to(torch.float32)

    # 2t = |x| * 2^(M-Q) and the result k * 2^(Q+1-M) need exponents beyond fp32's range in a tiny block
    # (Q down to -149 gives 2^(M+149) and 2^(-148-M)). There each factor comes in two parts: a per-pair one
    # in the normal range, applied first, and a per-block remainder. |x| * 2^126 is then a normal number below
    # 2^(M+1) and k * 2^-126 is normal for k < 2^24, both exact; the second product is the exact result.
    q_low = (eb - 1).clamp(min=_E_MIN)  # Q of the other pairs; eb = -149 has only zeros below it
    up = m - q_low  # 2t = |x| * 2^up for Q = q_low; up in [M-126, M+149]
    up_first = up.clamp(max=127)  # >= -125, so halving it for a top pair stays normal
    down = q_low + 1 - m  # in [-148-M, 127-M]
    down_first = down.clamp(min=-126)  # <= 127 - M, so doubling it for a top pair stays in range
    down_first = _pow2_normal(down_first)
    down_first = torch.where(torch.isfinite(vb), down_first, torch.full_like(down_first, float("nan")))  # specials
    twice_up = [(_pow2_normal(up_first) / pair_step).unsqueeze(-1)]
    downs = [(down_first * pair_step).unsqueeze(-1)]
    # Both remainders are 2^0 unless some block is tiny (q_low < M - 127); skip the two passes then.
    if bool((up > up_first).any()):
        twice_up.append(_pow2_normal(up - up_first).unsqueeze(-1))  # 2^[0, M+22]
        downs.append(_pow2_normal(down - down.clamp(min=-126)).unsqueeze(-1))  # 2^[-22-M, 0]
    out = round_scaled(pairs, a, tuple(twice_up), tuple(downs), 2**m - 1)  # [..., n, 8, 2]; mantissa <= 2 - 2^(1-M)
    return restore(out.flatten(-2))
