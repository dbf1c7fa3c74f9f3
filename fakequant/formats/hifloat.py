"""HiFloat formats: HiF8 (elementwise), HiF4 (v14) and the earlier power-of-two HiFX v12
(``shared/spec/formats.md`` §4, §6, §7).

Public: ``quant_dequant_hif8``, ``quant_dequant_hif4``, ``quant_dequant_hifx`` (each ``(float32 x, QType)`` ->
exact float32 result of x's shape, along the non-negative axis ``q.q_dim``), and the bit-level codec
``hif8_encode`` / ``hif8_decode`` (uint8 codes, the table in ``golden/hif8_codes.json``).
Internal, shared with ``tmx.py``: ``round_scaled``.

HiF8 layout (the HiF8 paper). A code is ``s | dot | exponent | mantissa`` in 8 bits. The dot field is a prefix
code that says how many exponent bits D follow, and so how many mantissa bits are left:

=========  ===  ==============  ===============
dot        D    binades |e|     mantissa bits b
=========  ===  ==============  ===============
``11``     4    8..15           1
``10``     3    4..7            2
``01``     2    2..3            3
``001``    1    1               3
``0001``   0    0               3
``0000``   -    denormal        3: 2^(m-23)
=========  ===  ==============  ===============

The D exponent bits are sign-magnitude with an implicit leading one: the first bit is the exponent's sign
(1 = negative), the other D - 1 bits are |e| below its leading one, so D = bit_length(|e|). The denormal row
holds 2^-22 .. 2^-16 for m = 1..7, +0 for m = 0, and NaN for the code 0x80 (-0). The would-be value
1.5 * 2^15 (``0 11 0111 1``) is ±inf, so the largest finite value is 2^15 = 32768.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..qtype import QType
from ._common import exponent, grid, magnitude_max, pow2, round_half_away_, sign_from_, to_blocks

__all__ = [
    "quant_dequant_hif8", "quant_dequant_hif4", "quant_dequant_hifx", "hif8_encode", "hif8_decode",
    "HIF8_MAX", "round_scaled",
]

# ------------------------------------------------------------------------------------------------ HiF8 layout
HIF8_MAX = 32768.0  # 2^15, the largest finite HiF8 value
HIF8_NAN_CODE = 0x80  # the code of -0 is NaN; HiF8 has only +0
HIF8_INF_CODE = 0x6F  # 0 11 0111 1: the would-be 1.5 * 2^15; with the sign bit, -inf
_HIF8_EMIN_NORMAL = -15
_HIF8_EMIN_DENORMAL = -22
_DOT = {0: (0b0001, 4), 1: (0b001, 3), 2: (0b01, 2), 3: (0b10, 2), 4: (0b11, 2)}  # D -> (dot bits, length)

_F32_MAN_BITS = 23
_F32_BIAS = 127


def _hif8_mantissa_bits(e: int) -> int:
    """Fraction bits b of the HiF8 binade 2^e (|e| <= 15); the denormal binades (e < -15) hold 2^e only."""
    if e < _HIF8_EMIN_NORMAL:
        return 0
    d = abs(e).bit_length()  # exponent bits D
    return 7 - _DOT[d][1] - d  # 7 bits after the sign: dot, exponent, mantissa


def _hif8_code_value(code: int) -> float:
    """The value of one HiF8 code, read field by field from the layout in the module docstring."""
    sign = -1.0 if code & 0x80 else 1.0
    body = code & 0x7F  # 7 bits after the sign
    if body >> 3 == 0:  # dot 0000: denormal
        m = body & 0b111
        if m == 0:
            return float("nan") if code == HIF8_NAN_CODE else 0.0
        return sign * 2.0 ** (m - 23)
    for d, (dot, length) in _DOT.items():
        if body >> (7 - length) == dot:
            break
    man_bits = 7 - length - d
    exp_field = (body >> man_bits) & ((1 << d) - 1)
    if d == 0:
        e = 0
    else:
        magnitude = (1 << (d - 1)) | (exp_field & ((1 << (d - 1)) - 1))  # implicit leading one
        e = -magnitude if exp_field >> (d - 1) else magnitude
    mant = 1.0 + (body & ((1 << man_bits) - 1)) / (1 << man_bits)
    if e == 15 and mant > 1.0:
        return sign * float("inf")
    return sign * mant * 2.0**e


@functools.lru_cache(maxsize=None)
def _hif8_tables(device: torch.device) -> dict[str, Tensor]:
    """Per-binade tables indexed by the float32 biased exponent field (0..255).

    ``step`` is the HiF8 grid step of the binade 2^e: 2^(e - b) with b fraction bits (formats.md §6), so that
    ``RHAZ(a / step) * step`` is the table's rounding of every a in that binade. A carry out of the binade
    (a / step rounding to 2^(b + 1)) lands on 2^(e + 1), which is on the grid. Below the denormals the step is
    2^-22: a in [2^-23, 2^-22) gives a / step in [1/2, 1), so 2^-22, and smaller a give 0 (the flush). Beyond
    2^15 the step is 2^e (b = 0): the result stays above 32768 for the overflow rules, and inf/NaN divide by
    1 and stay.
    ``code_base`` / ``code_shift`` build a code from a value already on the grid.
    """
    step = torch.ones(256, dtype=torch.float32)
    code_base = torch.zeros(256, dtype=torch.int32)
    code_shift = torch.full((256,), _F32_MAN_BITS, dtype=torch.int32)
    for biased in range(255):  # 255 (inf, NaN) keeps step 1
        e = biased - _F32_BIAS
        if e > 15:
            step[biased] = 2.0**e
        elif e >= _HIF8_EMIN_DENORMAL:
            step[biased] = 2.0 ** (e - _hif8_mantissa_bits(e))
        else:
            step[biased] = 2.0**_HIF8_EMIN_DENORMAL  # the flush band and float32 subnormals (biased 0)
        if _HIF8_EMIN_DENORMAL <= e < _HIF8_EMIN_NORMAL:
            code_base[biased] = e - _HIF8_EMIN_DENORMAL + 1  # 0000 mmm: 2^(m - 23)
        elif _HIF8_EMIN_NORMAL <= e <= 15:
            d = abs(e).bit_length()
            man_bits = _hif8_mantissa_bits(e)
            dot, length = _DOT[d]
            exp_field = 0 if d == 0 else ((e < 0) << (d - 1)) | (abs(e) - (1 << (d - 1)))
            code_base[biased] = (dot << (7 - length)) | (exp_field << man_bits)
            code_shift[biased] = _F32_MAN_BITS - man_bits
    values = torch.tensor([_hif8_code_value(c) for c in range(256)], dtype=torch.float32)
    tables = {"step": step, "code_base": code_base, "code_shift": code_shift, "values": values}
    return {k: v.to(device) for k, v in tables.items()}


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for an int32 index of any shape (index_select takes int32 without a widening copy)."""
    return torch.index_select(table, 0, index.reshape(-1)).reshape(index.shape)


def _hif8_round(x: Tensor) -> Tensor:
    """HiF8 rounding of float32 ``x`` before overflow handling, as a new float32 tensor: values beyond 2^15
    (and ±inf) come out larger than 32768 in magnitude, NaN stays NaN (formats.md §6 table, rows 1-3)."""
    # The biased exponent field, one int32 per element; its buffer then takes the result.
    biased = torch.bitwise_right_shift(x.view(torch.int32), _F32_MAN_BITS).bitwise_and_(0xFF)
    step = _lookup(_hif8_tables(x.device)["step"], biased)
    # ±step carries x's sign and is never 0, so x / ±step = |x| / step >= 0 (a power-of-two quotient: exact, or
    # below 1/2 in the flush band) and RHAZ(...) * ±step has x's sign. HiF8 has only +0: adding +0 turns -0
    # (x = -0, or negative x flushed) into +0 and changes nothing else.
    step.copysign_(x)
    y = torch.div(x, step, out=biased.view(torch.float32))
    return round_half_away_(y).mul_(step).add_(0.0)


def _hif8(x: Tensor, saturating: bool) -> Tensor:
    y = _hif8_round(x)
    if saturating:
        return y.clamp_(-HIF8_MAX, HIF8_MAX)  # clamp keeps NaN; ±inf and overflow -> ±32768
    # Overflow: the rounded magnitude passed 2^15, i.e. a >= 40960 = 1.25 * 2^15 (and ±inf) -> ±inf.
    return torch.where(y.abs() > HIF8_MAX, torch.copysign(torch.full_like(y, float("inf")), y), y)


def quant_dequant_hif8(x: Tensor, q: QType) -> Tensor:
    """HiF8, elementwise (formats.md §6): nearest with ties away on the HiF8 grid, flush below 2^-23 to +0,
    [2^-23, 2^-22) -> ±2^-22, overflow (a >= 40960, ±inf) -> ±32768, or ±inf when ``q.saturating`` is False."""
    return _hif8(x, q.saturating)


def hif8_encode(x: Tensor, saturate: bool = False) -> Tensor:
    """uint8 HiF8 codes of ``x`` (any floating dtype): the code of the HiF8-rounded value.

    NaN -> 0x80; zeros and flushed values -> 0x00 (HiF8 has only +0). Overflow and ±inf give the ±inf
    codes unless ``saturate`` is True, then the codes of ±32768; so ``hif8_encode(hif8_decode(c)) == c``
    for every non-NaN code c.
    """
    if not x.is_floating_point():
        raise TypeError(f"hif8_encode needs a floating tensor, got {x.dtype}")
    v = _hif8(x.to(torch.float32), saturate)  # on the grid: only the top `b` mantissa bits can be set
    bits = v.view(torch.int32)
    biased = (bits >> _F32_MAN_BITS) & 0xFF
    tables = _hif8_tables(v.device)
    frac = bits & ((1 << _F32_MAN_BITS) - 1)
    code = _lookup(tables["code_base"], biased) | (frac >> _lookup(tables["code_shift"], biased))
    code = torch.where(torch.isinf(v), torch.full_like(code, HIF8_INF_CODE), code)
    code = code | ((bits < 0).to(torch.int32) << 7)
    code = torch.where(torch.isnan(v), torch.full_like(code, HIF8_NAN_CODE), code)
    return code.to(torch.uint8)


def hif8_decode(codes: Tensor) -> Tensor:
    """float32 values of HiF8 ``codes`` (an integer tensor with values 0..255); 0x80 is NaN, 0x6F/0xEF ±inf."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"hif8_decode needs an integer tensor of codes 0..255, got {codes.dtype}")
    table = _hif8_tables(codes.device)["values"]
    return table[codes.to(torch.int64) & 0xFF]


# --------------------------------------------------------------------------------------------- shared rounding
def round_scaled(x: Tensor, t: Tensor, down: tuple[Tensor, ...], k_max: int) -> Tensor:
    """Elements on a power-of-two scaled grid: ±min(RHAZ(t), k_max) * down, where t = |x| / grid step exactly
    (or t < 1/2 where that underflows) and ``down`` is the grid step.

    ``t`` is consumed: the result is computed in it (the reference's largest CPU cost is allocating full-size
    temporaries). ``down`` holds positive factors broadcastable to ``x``, multiplied in the order given (a
    step beyond fp32's range comes as two factors, each product exact); a NaN factor makes those elements NaN.
    RHAZ is ``round_half_away_``, exact (formats.md §0, §12.3). The sign comes from ``x`` (``sign_from_``): a
    negative input gives -|q| (-0 when it rounds to zero) and ±0 gives +0.
    """
    k = round_half_away_(t).clamp_(max=k_max)
    for factor in down:
        k.mul_(factor)
    return sign_from_(k, x)


# ------------------------------------------------------------------------------------------------------ HiF4
HIF4_C = 0.142578125  # bf16(1/7)
HIF4_SF_MIN = 2.0**-48
HIF4_SF_MAX = 49152.0
_HIF4_BLOCK = 64


def _bf16(v: Tensor) -> Tensor:
    return v.to(torch.bfloat16).to(torch.float32)  # nearest-even to bf16, exact back


def _nan_where_nonfinite(factor: Tensor, amax: Tensor) -> Tensor:
    """``factor``, NaN where the block maximum ``amax`` (broadcastable) is NaN or ±inf (formats.md §0)."""
    return torch.where(torch.isfinite(amax), factor, torch.full_like(factor, float("nan")))


def quant_dequant_hif4(x: Tensor, q: QType) -> Tensor:
    """HiFloat4 v14 along ``q.q_dim`` (formats.md §7): per 64-block an E6M2 scale SF, per group of 8 and
    quad of 4 one extra binade each (D = f8 + f4), elements k/4 * 2^D * SF with k in 0..7."""
    blocks, restore = to_blocks(x, q.q_dim, _HIF4_BLOCK)  # [..., n, 64]
    quads = blocks.unflatten(-1, (8, 2, 4))  # [..., n, 8 groups, 2 quads, 4]
    a = quads.abs()  # the working buffer: t and then the result are computed in it
    v16 = magnitude_max(a, -1)  # [..., n, 8, 2, 1]; NaN/inf propagate
    v8 = magnitude_max(v16, -2)  # [..., n, 8, 1, 1]
    vmax = magnitude_max(v8, -3)  # [..., n, 1, 1, 1]
    # Step 1: SF = E6M2(clamp(bf16(fl32(Vmax * c)))), RNE. Step 2: REC = bf16(fl32(1 / SF)).
    sf = _bf16(vmax * HIF4_C).clamp(HIF4_SF_MIN, HIF4_SF_MAX)
    sf = grid(sf, 2, -48, "even")
    rec = _bf16(1.0 / sf)
    # Step 3: one more binade for a group, then for a quad, when its maximum reaches the threshold.
    # 2^f is 1 + f for f in {0, 1}, so 2^D = 2^f8 * 2^f4 is a product of ones and twos.
    pow_f8 = (v8 * rec >= 4).to(torch.float32).add_(1.0)  # [..., n, 8, 1, 1]
    pow_d = v16.mul_(rec).ge_(2 * pow_f8).add_(1.0).mul_(pow_f8)  # 2^D in v16's buffer, [..., n, 8, 2, 1]
    # Step 4: t = 4 * fl32(|x| * REC) / 2^D as one product: scaling by 2^(2-D) commutes with the rounding of
    # fl32(|x| * REC) except under fp32 underflow, where both give t < 1/2 and k = 0.
    up = (4.0 * rec) / pow_d  # exact: powers of two times a bf16 number
    down = pow_d.mul_(0.25 * _nan_where_nonfinite(sf, vmax))  # 2^D * SF / 4; NaN for blocks with NaN/inf
    return restore(round_scaled(quads, a.mul_(up), (down,), 7).flatten(-3))  # [..., n, 8, 2, 4] -> [..., n, 64]


# ------------------------------------------------------------------------------------------------------ HiFX
_HIFX_BLOCK = 64
_HIFX_BASE_MIN, _HIFX_BASE_MAX = -46, 16


def quant_dequant_hifx(x: Tensor, q: QType) -> Tensor:
    """hifx<N>_v12 along ``q.q_dim`` (formats.md §4), M = ``q.man_bits`` = N - 1: per 64-block a base
    exponent, one extra binade per group of 8 and per quad of 4; elements k * 2^(Q+1-M), |k| <= 2^M - 1.

    With d8, d4 in {0, 1}: d8 = 1 exactly when e8 >= base + 2, i.e. the group maximum is >= 2^(base+2), and
    d4 = 1 exactly when e4 >= base + d8 + 1 (zero quads, E = -inf, never). Comparing maxima with powers of two
    gives the quad scale 2^Q = 2^base * (1 + d8) * (1 + d4) without per-quad exponents.
    """
    m = q.man_bits
    blocks, restore = to_blocks(x, q.q_dim, _HIFX_BLOCK)  # [..., n, 64]
    quads = blocks.unflatten(-1, (8, 2, 4))  # [..., n, 8 groups, 2 quads, 4]
    a = quads.abs()  # the working buffer: t and then the result are computed in it
    v4 = magnitude_max(a, -1)  # [..., n, 8, 2, 1]
    v8 = magnitude_max(v4, -2)  # [..., n, 8, 1, 1]
    v64 = magnitude_max(v8, -3)  # [..., n, 1, 1, 1]
    # e64 = max of the eight e8 is E(v64) since E is monotone; an all-zero block has e64 = -inf.
    e64 = torch.where(v64 > 0, exponent(v64), torch.full_like(v64, _HIFX_BASE_MIN + 2, dtype=torch.int32))
    base = pow2((e64 - 2).clamp(_HIFX_BASE_MIN, _HIFX_BASE_MAX))  # 2^base
    group = base * (1.0 + (v8 >= 4 * base).to(torch.float32))  # 2^(base + d8), [..., n, 8, 1, 1]
    quad = v4.ge_(2 * group).add_(1.0).mul_(group)  # 2^Q in v4's buffer, Q in [-46, 18], [..., n, 8, 2, 1]
    up = 2.0 ** (m - 1) / quad  # 2^(M-1-Q): |x| times it is exact, or < 1/2 when it underflows (k = 0)
    down = quad.mul_(_nan_where_nonfinite(base.new_full((), 2.0 ** (1 - m)), v64))  # 2^(Q+1-M); NaN blocks
    return restore(round_scaled(quads, a.mul_(up), (down,), 2**m - 1).flatten(-3))  # mantissa <= 2 - 2^(1-M)
