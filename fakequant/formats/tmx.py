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
from ._common import exponent, magnitude_max, pow2, pow2_normal, to_blocks
from .hifloat import round_scaled

__all__ = ["quant_dequant_tmx"]

_TMX_BLOCK = 16
_E_MIN = -149  # E of the smallest fp32 subnormal


def quant_dequant_tmx(x: Tensor, q: QType) -> Tensor:
    """tmx<N> along ``q.q_dim`` (formats.md §5), M = ``q.man_bits`` = N - 2.

    Since a pair's exponent e2 never exceeds the block's eb, Q = max(e2, eb - 1) is eb for a pair holding a
    value of the block's top binade (its maximum is >= 2^eb) and eb - 1 for the others, zero pairs included.
    So every factor is the block's factor for Q = eb - 1, halved or doubled for the top pairs: a per-block
    factor and then the per-pair step 2^(Q - (eb - 1)).
    """
    m = q.man_bits
    blocks, restore = to_blocks(x, q.q_dim, _TMX_BLOCK)  # [..., n, 16]
    pairs = blocks.unflatten(-1, (8, 2))  # [..., n, 8 pairs, 2]
    a = pairs.abs()  # the working buffer: t and then the result are computed in it
    vb = magnitude_max(a, (-2, -1))  # [..., n, 1, 1]; NaN/inf propagate
    live = vb > 0  # all-zero blocks: only zeros come out, any exponent in range will do
    eb = torch.where(live, exponent(vb), torch.zeros_like(vb, dtype=torch.int32))
    # A pair is a top pair when its maximum reaches 2^eb. When eb = -149 (the block's maximum is the smallest
    # subnormal) q_low is clamped up to eb itself, so the top pairs take Q = q_low: the threshold is then +inf,
    # which no pair of a finite block reaches.
    top = torch.where(eb > _E_MIN, pow2(eb), float("inf"))  # [..., n, 1, 1]
    # [..., n, 8]: 2^(Q - q_low) = 1 + [pair maximum >= 2^eb], 2 for a top pair.
    pair_step = torch.maximum(a[..., 0], a[..., 1]).ge_(top[..., 0]).add_(1.0)

    # t = |x| * 2^(M-1-Q) and the result k * 2^(Q+1-M) need exponents beyond fp32's range in a tiny block
    # (Q down to -149 gives 2^(M+148) and 2^(-148-M)). There each per-block factor comes in two parts: one in
    # the normal range, applied first, and a remainder. |x| * 2^126 is then a normal number below 2^(M+1) and
    # k * 2^-126 is normal for k < 2^24, so every product is exact until the last, which is the exact result.
    # (Halving t for a top pair is exact too: a t that is subnormal, before or after, is below 1/2, k = 0.)
    q_low = (eb - 1).clamp(min=_E_MIN)  # Q of the other pairs; eb = -149 has only zeros below it
    up = m - 1 - q_low  # t = |x| * 2^up for Q = q_low; up in [M-127, M+148]
    up_first = up.clamp(max=127)  # >= -126: normal
    down = q_low + 1 - m  # in [-148-M, 127-M]
    down_first_exp = down.clamp(min=-126)  # <= 127 - M, so doubling it for a top pair stays in range
    down_first = pow2_normal(down_first_exp)
    down_first = torch.where(torch.isfinite(vb), down_first, torch.full_like(down_first, float("nan")))  # specials
    # The pair step goes on right after the block's first factor, each way. It multiplies the first and the
    # second element of every pair in two strided passes: a factor broadcast over pairs of 2 runs several
    # times slower on CPU.
    t = a.mul_(pow2_normal(up_first))
    for element in (t[..., 0], t[..., 1]):
        element.div_(pair_step)
    if bool((up > up_first).any()):  # the remainder is 2^0 unless some block is tiny (q_low < M - 128)
        t.mul_(pow2_normal(up - up_first))  # 2^[0, M+21]
    out = round_scaled(pairs, t, (down_first,), 2**m - 1)  # [..., n, 8, 2]; mantissa <= 2 - 2^(1-M)
    for element in (out[..., 0], out[..., 1]):
        element.mul_(pair_step)
    if bool((down < down_first_exp).any()):  # 2^0 unless some block is tiny (q_low < M - 127)
        out.mul_(pow2_normal(down - down_first_exp))  # 2^[-22-M, 0]
    return restore(out.flatten(-2))
