"""Portable NPU implementations of every format family, written for Ascend's operator coverage.

Each function here computes exactly what the plain-torch reference in ``fakequant/formats/`` computes
(``shared/spec/formats.md``), bit for bit, but only with operations that ``torch_npu`` runs natively for
float32 / int32 on Atlas A2 (910B) and later (the list is ``fakequant_npu/ops_allowed.py``):

* **Exponents and powers of two from the bits.** ``E(a)`` is read from the exponent field of
  ``a.view(torch.int32)``; fp32 subnormals take the exponent of their integer mantissa converted to float32
  (exact below 2^24). ``2^e`` is assembled as a bit pattern, subnormal powers as ``1 << (e + 149)``. No
  ``frexp``, ``log2`` or ``ldexp`` operator, no float64, and no float arithmetic on subnormals where an
  integer operation can do the same job.
* **Block maxima as integers.** The bit pattern of a non-negative float32 is ordered like its value, and
  NaN > inf > every finite value, so ``(bits & 0x7FFFFFFF).amax()`` is the block's largest magnitude and
  says whether the block holds a NaN/inf, without depending on how a device's float ``max`` treats NaN.
* **Rounding from ``floor``.** Ties away, ties to even and truncation are built from ``floor`` and exact
  comparisons of the exact remainder; the device's default float rounding mode is never relied on beyond
  IEEE ``+ - * /`` of float32 where the spec writes ``fl32(.)``.
* **No host synchronisation and no data-dependent Python control flow.** Branches depend on the QType and
  on shapes only; no ``.item()``, ``bool(tensor)`` or ``nonzero``.
* **Tiled over the quantization axis.** ``_run`` views the input as ``[P, L, I]`` (L the axis) and walks
  tiles of whole blocks, each at most ``max(tile_elements, block_len)`` elements (``TILE_ELEMENTS`` =
  2^20 by default). Every intermediate of a tile holds at most that many elements (4 bytes each), so
  **the peak extra memory of one call is bounded by ``C * 4 * max(tile_elements, block_len)`` bytes**
  with C = ``PEAK_TEMPORARIES`` = 20 tile-sized temporaries alive at once (measured: 4 to 17; 80 MiB at
  the default tile), plus the per-slice maxima of ``int8sym`` (4 bytes per slice) and, when the input is
  not contiguous, one contiguous copy of it. The output is the only allocation that grows with the input.
  ``tests/test_npu_backend.py`` measures the largest intermediate and the peak of live intermediates.

Public:

* ``quant_dequant(x, q, tile_elements=None)``: any family, same contract as
  ``fakequant.formats.reference_quant_dequant`` (any floating dtype and shape, result in x's dtype).
* ``FAMILY_IMPLS``: family -> ``(x, q) -> Tensor``, what ``fakequant_npu`` registers.
* ``mx_blocks``: the MX engine on ``[..., B]`` blocks, signature of ``fakequant.formats.mx.mx_blocks``
  (so ``quantize_mx`` can be run through it).
* ``TILE_ELEMENTS``, ``PEAK_TEMPORARIES``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from fakequant.formats import as_qtype, check_input
from fakequant.formats.mx import ElementFormat, scale_exponent_from
from fakequant.formats.nf4 import NF4_CODES, NF4_THRESHOLDS
from fakequant.qtype import QType

__all__ = ["quant_dequant", "FAMILY_IMPLS", "mx_blocks", "TILE_ELEMENTS", "PEAK_TEMPORARIES"]

TILE_ELEMENTS = 1 << 20  # elements per tile: 4 MiB per float32 temporary
PEAK_TEMPORARIES = 20  # the C of the memory bound in the module docstring (measured by the tests)

F32, I32 = torch.float32, torch.int32
FLT_MAX = torch.finfo(torch.float32).max
_NAN = float("nan")
_INF_BITS = 0x7F800000  # bits of +inf; every |x| bit pattern >= this is inf or NaN
_ABS_MASK = 0x7FFFFFFF
_MAN_MASK = 0x007FFFFF
_ONE_BITS = 0x3F800000  # bits of 1.0
_NEG_INF_EXP = -(2**20)  # E(0) = -inf, as an int32 far below every clamp (hifx, tmx)

# =========================================================================================================
# Bit-level building blocks (formats.md §0). All exact.


def _abs_bits(x: Tensor) -> Tensor:
    """int32 bits of |x| (the sign bit cleared): ordered like |x|, NaN > inf > finite."""
    return x.view(I32) & _ABS_MASK


def _as_float(bits: Tensor) -> Tensor:
    return bits.view(F32)


def _exponent_and_significand(bits: Tensor) -> tuple[Tensor, Tensor]:
    """``E(a)`` (int32) and ``a / 2^E(a)`` (float32 in [1, 2)) of finite ``a > 0`` given as its bits.

    A subnormal ``a = m * 2^-149`` has ``E(a) = E(float(m)) - 149`` and the significand of ``float(m)``;
    ``float(m)`` is exact since ``m < 2^23``. Zero, NaN and inf give garbage that callers mask out.
    """
    field = bits >> 23
    subnormal = field == 0
    normalised = torch.where(subnormal, (bits & _MAN_MASK).to(F32).view(I32), bits)
    field = normalised >> 23
    e = torch.where(subnormal, field - (127 + 149), field - 127)
    significand = _as_float((normalised & _MAN_MASK) | _ONE_BITS)
    return e, significand


def _exponent(bits: Tensor) -> Tensor:
    return _exponent_and_significand(bits)[0]


def pow2(e: Tensor) -> Tensor:
    """float32 ``2^e`` of int32 ``e``, built from bits: exact for e in [-149, 127]; ``2^127`` above
    (saturating, as the reference's ``pow2``) and ``+0`` below -149."""
    normal = (e.clamp(-126, 127) + 127) << 23
    subnormal = torch.ones_like(e) << (e.clamp(-149, -127) + 149)  # the bit pattern of 2^e < 2^-126
    bits = torch.where(e < -126, torch.where(e < -149, 0, subnormal), normal)
    return _as_float(bits)


def ldexp(a: Tensor, e: Tensor | int) -> Tensor:
    """``a * 2^e`` as one correctly rounded float32 product for e in [-149, 127]; beyond, the factor is split
    in two exactly as the reference's ``ldexp`` does (so both saturate and flush alike)."""
    if isinstance(e, int):
        if not -149 <= e <= 127:
            raise ValueError(f"ldexp with a constant exponent needs -149 <= e <= 127, got {e}")
        return a * math.ldexp(1.0, e)  # an exact float32 constant
    e1 = e.clamp(-149, 127)
    return a * pow2(e1) * pow2(e - e1)


def round_int(t: Tensor, mode: str) -> Tensor:
    """Round exact float32 ``t >= 0`` to an integer: ``nearest`` (ties away), ``even``, ``floor`` (toward 0).

    Only ``floor`` and exact comparisons: ``t - floor(t)`` is exact (for t >= 2^23 it is 0).
    """
    f = torch.floor(t)
    if mode == "floor":
        return f
    r = t - f
    if mode == "nearest":
        return f + (r >= 0.5).to(F32)
    if mode != "even":
        raise ValueError(f"rounding mode {mode!r} is not one of nearest, even, floor")
    half = f * 0.5  # exact; f is odd iff half is not an integer
    odd = half != torch.floor(half)
    return f + ((r > 0.5) | ((r == 0.5) & odd)).to(F32)


def grid(v: Tensor, man_bits: int, emin: int, mode: str) -> Tensor:
    """Round finite ``v >= 0`` to ``man_bits`` fraction bits with minimum exponent ``emin`` (formats.md §0):
    p = max(E(v), emin); result = round(v * 2^(M-p)) * 2^(p-M), both scalings exact from the bits."""
    p_field = (v.view(I32) >> 23).clamp(min=emin + 127)  # biased p; a subnormal v has field 0 < emin + 127
    scaled = ldexp(v, man_bits + 127 - p_field)
    return round_int(scaled, mode) * pow2(p_field - 127 - man_bits)


def _min_const(v: Tensor, bound: float) -> Tensor:
    """``min(v, bound)`` that keeps NaN (a ``where`` on a comparison, whatever the device's ``clamp`` does).
    A bound beyond float32's range (e8m* element maxima) bounds nothing."""
    if bound > FLT_MAX:
        return v
    return torch.where(v > bound, bound, v)


def _apply_sign(x: Tensor, magnitude: Tensor) -> Tensor:
    """``-|q|`` for negative x (so -0 when it rounds to zero), ``+|q|`` otherwise; ±0 in gives +0."""
    return torch.where(x < 0, -magnitude, magnitude)


def _rhaz(t: Tensor) -> Tensor:
    return round_int(t, "nearest")


def _bf16_round(v: Tensor) -> Tensor:
    """Nearest-even rounding of finite float32 ``v`` to bfloat16, as float32 (integer ops on the bits)."""
    b = v.view(I32)
    return _as_float((b + (0x7FFF + ((b >> 16) & 1))) & -65536)


def _f32(value: float) -> float:
    """The float32 nearest ``value``, as a Python float (a host constant, not a device operation)."""
    return torch.tensor(value, dtype=torch.float32).item()


# =========================================================================================================
# Tiling (module docstring): [P, L, I] views, tiles of whole blocks along L.


def _tile_plan(p: int, length: int, inner: int, block_len: int, tile_elements: int) -> tuple[int, int, int]:
    """Tile extents (pc, lc, ic): lc a multiple of block_len covering whole blocks, pc * lc * ic within
    max(tile_elements, block_len) elements (lc counts the padding of the last tile)."""
    padded = -(-length // block_len) * block_len
    lc = min(padded, max(block_len, tile_elements // block_len * block_len))
    ic = min(inner, max(1, tile_elements // lc))
    pc = min(p, max(1, tile_elements // (lc * ic)))
    return pc, lc, ic


def _as_pli(x: Tensor, dim: int) -> Tensor:
    p = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1 :])
    return x.reshape(p, x.shape[dim], inner)  # a view for contiguous x


def _tiles(x3: Tensor, block_len: int, tile_elements: int):
    """Yield ``(index, tile)`` with ``tile`` = ``x3[index]`` moved to ``[pc, ic, lc]`` (axis last)."""
    p, length, inner = x3.shape
    pc, lc, ic = _tile_plan(p, length, inner, block_len, tile_elements)
    for p0 in range(0, p, pc):
        for l0 in range(0, length, lc):
            for i0 in range(0, inner, ic):
                index = (slice(p0, p0 + pc), slice(l0, l0 + lc), slice(i0, i0 + ic))
                yield index, x3[index].permute(0, 2, 1)  # [pc, ic, n]


def _tile_f32(tile: Tensor, block_len: int, as_float32: bool = True) -> tuple[Tensor, int]:
    """The tile in float32 (exact for fp16/bf16; fp64 is rounded to fp32 as formats.md §0 says), zero-padded
    along the axis to whole blocks; returns it and the unpadded length."""
    n = tile.shape[-1]
    t = tile.to(F32) if as_float32 else tile
    pad = (-n) % block_len
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t, n


def _to_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast exact float32 results to ``dtype`` like the reference's ``saturating_cast``: finite values beyond
    the dtype's range saturate, and the rounding to fp16/bf16 is done on the bits first (nearest even), so
    the device cast itself is exact whatever rounding mode it uses."""
    if dtype == F32:
        return y
    if dtype == torch.float64:
        return y.to(dtype)
    big = torch.finfo(dtype).max
    finite = y.abs() < math.inf
    y = torch.where(finite & (y > big), big, torch.where(finite & (y < -big), -big, y))
    return _round_to_dtype(y, dtype).to(dtype)


def _round_to_dtype(y: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``y`` rounded nearest-even to fp16 / bf16 values (kept in float32). Overflow gives ±inf as an
    IEEE cast would; NaN and ±inf pass through; the sign of zero is kept."""
    if dtype == F32:
        return y
    man_bits, emin, top = (7, -126, None) if dtype == torch.bfloat16 else (10, -14, 65504.0)
    a = _as_float(_abs_bits(y))
    finite = a < math.inf
    r = grid(torch.where(finite, a, 0.0), man_bits, emin, "even")  # bf16: overflow rounds to inf itself
    if top is not None:
        r = torch.where(r > top, math.inf, r)
    r = torch.where(finite, r, a)
    return torch.where(y.view(I32) < 0, -r, r)  # the sign bit of y (also for -0 and -inf)


def _run(
    x: Tensor,
    q: QType,
    block_len: int,
    kernel: Callable[[Tensor], Tensor],
    tile_elements: int | None,
    as_float32: bool = True,
) -> Tensor:
    """Apply ``kernel`` (float32 ``[..., n]`` -> float32 ``[..., n]``, blocks of ``block_len`` along the last
    axis) tile by tile along ``q.q_dim``; write the result in x's dtype into one output tensor.
    ``as_float32=False`` hands the kernel the tile in x's own dtype (the native operator takes bf16/fp16)."""
    tile_elements = tile_elements or TILE_ELEMENTS
    x3 = _as_pli(x, q.q_dim)
    out3 = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    for index, tile in _tiles(x3, block_len, tile_elements):
        t, n = _tile_f32(tile, block_len, as_float32)
        y = kernel(t)[..., :n]  # [pc, ic, n]
        out3[index].copy_(_to_dtype(y, x.dtype).permute(0, 2, 1))
    return out3.reshape(x.shape)


def _blocks(t: Tensor, block_len: int) -> Tensor:
    return t.reshape(*t.shape[:-1], -1, block_len)  # [..., n_blocks, block_len]


def _unblocks(t: Tensor) -> Tensor:
    return t.reshape(*t.shape[:-2], -1)


# =========================================================================================================
# MX block floats and integer blocks (formats.md §1, §2)


def _scale_exponent(bits: Tensor, fmt: ElementFormat, scale_mode: str, round_mode: str) -> Tensor:
    """Shared exponent of blocks whose finite maximum > 0 has the float32 bits ``bits``."""
    e, sig = _exponent_and_significand(bits)
    return scale_exponent_from(e, sig, fmt, scale_mode, round_mode)


def _quantize_elements(y: Tensor, fmt: ElementFormat, round_mode: str) -> Tensor:
    if fmt.is_int:
        q = ldexp(round_int(ldexp(y, fmt.frac_bits), round_mode), -fmt.frac_bits)
    else:
        q = grid(y, fmt.man_bits, fmt.emin, round_mode)
    return _min_const(q, fmt.max_value)


def mx_blocks(
    blocks: Tensor,
    fmt: ElementFormat,
    k_bits: int,
    scale_mode: str = "floor",
    round_mode: str = "nearest",
    flush_subnormal_blocks: bool = False,
) -> Tensor:
    """Quantize-dequantize float32 ``blocks`` ``[..., B]``, one shared exponent per row (formats.md §1-§2);
    the signature and results of ``fakequant.formats.mx.mx_blocks``."""
    k_max = 2 ** (k_bits - 1) - 1
    ab = _abs_bits(blocks)
    top = ab.amax(dim=-1, keepdim=True)  # [..., 1] bits of the block maximum; >= inf bits: NaN/inf block
    nonfinite = top >= _INF_BITS
    positive = top > 0
    live = positive & ~nonfinite
    safe = torch.where(live, top, _ONE_BITS)
    s = _scale_exponent(safe, fmt, scale_mode, round_mode)
    s = torch.where(positive, s, -126 - fmt.emax)  # all-zero block: microxcaling's 2^-126 convention
    nan_block = nonfinite | (s > k_max)
    s = s.clamp(-k_max, k_max)
    scale = torch.where(nan_block, _NAN, pow2(s))
    y = _as_float(ab) * pow2(-s)  # |x| / 2^s, one correctly rounded product
    out = _min_const(_quantize_elements(y, fmt, round_mode) * scale, FLT_MAX)
    out = _apply_sign(blocks, out)
    if flush_subnormal_blocks:
        out = torch.where(live & (_exponent(safe) <= -127), 0.0, out)
    return out


def _mx_kernel(t: Tensor, q: QType) -> Tensor:
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    return _unblocks(mx_blocks(_blocks(t, q.blk_size), fmt, q.k_bits, q.scale_mode, q.round_mode))


def _mx_hier_kernel(t: Tensor, q: QType) -> Tensor:
    """formats.md §3, in the group exponent g (see ``fakequant.formats.mx.quant_dequant_mx_hier``)."""
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    shift = fmt.man_bits - 1 if fmt.is_int else 0  # s = g + shift
    lo, hi = -q.k_max - q.exp_offset, q.k_max - q.exp_offset
    groups = t.reshape(*t.shape[:-1], -1, q.blk_outer_size, q.blk_size)  # [..., n_outer, BO, B]
    ab = _abs_bits(groups)
    top = ab.amax(dim=-1, keepdim=True)  # [..., n_outer, BO, 1]
    nonfinite = top >= _INF_BITS
    live = (top > 0) & ~nonfinite
    safe = torch.where(live, top, _ONE_BITS)
    first_mode = "floor" if fmt.is_int and q.scale_mode == "round" else q.scale_mode
    g = _scale_exponent(safe, fmt, first_mode, q.round_mode) - shift
    g = torch.where(live, g, lo).clamp(lo, hi)
    if fmt.is_int and q.scale_mode == "round":  # step 2: the carry at the clamped g
        top_q = round_int(ldexp(_as_float(safe), -g.clamp(min=-254)), q.round_mode)
        g = g + ((top_q >= 2**fmt.man_bits) & live).to(I32)
    outer = g.amax(dim=-2, keepdim=True)  # step 3, [..., n_outer, 1, 1]
    g = torch.maximum(g, outer - (2**q.k_bits - 1)).clamp(lo, hi)
    s = (g + shift).clamp(min=-254)
    scale = torch.where(nonfinite, _NAN, ldexp(torch.ones_like(top, dtype=F32), s))
    y = _min_const(ldexp(_as_float(ab), -s), FLT_MAX)  # a group clamped at hi saturates
    out = _min_const(_quantize_elements(y, fmt, q.round_mode) * scale, FLT_MAX)
    return _apply_sign(t, out.reshape(t.shape))


# =========================================================================================================
# hifx<N>_v12 (§4) and tmx<N> (§5)


def _exponent_or_neg_inf(bits: Tensor) -> Tensor:
    return torch.where(bits > 0, _exponent(bits), _NEG_INF_EXP)


def _finite_max(ab: Tensor, dim: int, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """Bits of the largest finite-or-not magnitude along ``dim`` and whether it is NaN/inf; the bits of
    NaN/inf maxima are replaced by 0 so that they never reach float arithmetic."""
    top = ab.amax(dim=dim, keepdim=keepdim)
    nonfinite = top >= _INF_BITS
    return torch.where(nonfinite, 0, top), nonfinite


def _hifx_kernel(t: Tensor, q: QType) -> Tensor:
    m = q.man_bits
    quads = t.reshape(*t.shape[:-1], -1, 8, 2, 4)  # [..., n, 8 groups, 2 quads, 4]
    ab = _abs_bits(quads)
    v4, _ = _finite_max(ab, -1)  # [..., n, 8, 2]
    v8 = v4.amax(dim=-1)  # [..., n, 8]
    v64, nonfinite = _finite_max(ab.reshape(*ab.shape[:-3], 64), -1, keepdim=True)  # [..., n, 1]
    e4, e8, e64 = (_exponent_or_neg_inf(v) for v in (v4, v8, v64))
    base = (e64 - 2).clamp(-46, 16)
    d8 = (e8 - base - 1).clamp(0, 1)
    d4 = (e4 - (base + d8).unsqueeze(-1)).clamp(0, 1)
    quad_exp = base.unsqueeze(-1) + d8.unsqueeze(-1) + d4  # [..., n, 8, 2]
    up = pow2(m - 1 - quad_exp)
    down = torch.where(nonfinite.unsqueeze(-1), _NAN, pow2(quad_exp + 1 - m))
    k = _min_const(_rhaz(_as_float(ab) * up.unsqueeze(-1)), float(2**m - 1))
    return _apply_sign(t, (k * down.unsqueeze(-1)).reshape(t.shape))


def _split_pow2(e: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    first = e.clamp(lo, hi)
    return pow2(first), pow2(e - first)


def _tmx_kernel(t: Tensor, q: QType) -> Tensor:
    m = q.man_bits
    pairs = t.reshape(*t.shape[:-1], -1, 8, 2)  # [..., n, 8 pairs, 2]
    ab = _abs_bits(pairs)
    v2, _ = _finite_max(ab, -1)  # [..., n, 8]
    vb, nonfinite = _finite_max(ab.reshape(*ab.shape[:-2], 16), -1, keepdim=True)  # [..., n, 1]
    e2, eb = _exponent_or_neg_inf(v2), _exponent_or_neg_inf(vb)
    pair_exp = torch.maximum(e2, eb - 1).clamp(-149, 127)
    up1, up2 = _split_pow2(m - 1 - pair_exp, -149, 127)
    down1, down2 = _split_pow2(pair_exp + 1 - m, -126, 127)
    down2 = torch.where(nonfinite, _NAN, down2)
    y = _as_float(ab) * up1.unsqueeze(-1) * up2.unsqueeze(-1)
    k = _min_const(_rhaz(y), float(2**m - 1))
    return _apply_sign(t, (k * down1.unsqueeze(-1) * down2.unsqueeze(-1)).reshape(t.shape))


# =========================================================================================================
# HiF8 (§6) and HiF4 (§7)

HIF8_MAX = 32768.0


def _hif8_kernel(t: Tensor, q: QType) -> Tensor:
    """Round the float32 bits to the HiF8 grid of their binade: add half a grid step to the magnitude bits
    and clear the bits below the step (ties carry up: round half away on the exact value)."""
    bits = t.view(I32)
    e = ((bits >> 23) & 0xFF) - 127
    mag = e.abs()
    # Bits below the HiF8 grid step: 23 - b with b = 3 (|e| <= 3), 2 (4..7), 1 (8..15), 0 (denormal binades
    # 2^-22 .. 2^-16, which hold 2^e only).
    step = torch.where(mag <= 3, 20, torch.where(mag <= 7, 21, torch.full_like(e, 22)))
    step = torch.where(e < -15, 23, step)
    one = torch.ones_like(bits)
    add = one << (step - 1)
    mask = -(one << step)
    # [2^-23, 2^-22): one carry into the next binade (-> 2^-22); below: +0; beyond 2^15, inf, NaN: unchanged.
    add = torch.where(e == -23, 1 << 23, torch.where(e < -23, 0, add))
    mask = torch.where(e == -23, -(1 << 23), torch.where(e < -23, 0, mask))
    keep = e > 15
    add = torch.where(keep, 0, add)
    mask = torch.where(keep, -1, mask)
    y = _as_float((bits + add) & mask)
    if q.saturating:
        return torch.where(y > HIF8_MAX, HIF8_MAX, torch.where(y < -HIF8_MAX, -HIF8_MAX, y))
    return torch.where(y > HIF8_MAX, math.inf, torch.where(y < -HIF8_MAX, -math.inf, y))


HIF4_C = 0.142578125  # bf16(1/7)
# bf16(fl32(1 / m)) for the E6M2 significands m = 1, 1.25, 1.5, 1.75 (formats.md §7 step 2).
_HIF4_REC = (1.0, 0.80078125, 0.66796875, 0.5703125)


def _hif4_kernel(t: Tensor, q: QType) -> Tensor:
    quads = t.reshape(*t.shape[:-1], -1, 8, 2, 4)  # [..., n, 8, 2, 4]
    ab = _abs_bits(quads)
    v16_bits, _ = _finite_max(ab, -1)  # [..., n, 8, 2]
    v8_bits = v16_bits.amax(dim=-1)  # [..., n, 8]
    _, nonfinite = _finite_max(ab.reshape(*ab.shape[:-3], 64), -1)  # [..., n]
    vmax = _as_float(v8_bits.amax(dim=-1))  # [..., n]
    # Step 1: SF = E6M2(clamp(bf16(fl32(Vmax * c)), 2^-48, 49152)), nearest even.
    sf = _bf16_round(vmax * HIF4_C)
    sf = torch.where(sf < 2.0**-48, 2.0**-48, torch.where(sf > 49152.0, 49152.0, sf))
    sf = grid(sf, 2, -48, "even")  # 2^e * {1, 1.25, 1.5, 1.75}, e in [-48, 15]
    # Step 2: REC = bf16(fl32(1 / SF)) = 2^-e * bf16(fl32(1 / significand)), read from the two mantissa bits.
    sf_bits = sf.view(I32)
    frac = (sf_bits >> 21) & 3
    rec_sig = torch.full_like(sf, _HIF4_REC[3])
    for index in (2, 1, 0):
        rec_sig = torch.where(frac == index, _HIF4_REC[index], rec_sig)
    rec = rec_sig * pow2(127 - (sf_bits >> 23))
    # Step 3: one more binade for a group (f8), then for a quad (f4).
    rec8 = rec.unsqueeze(-1)  # [..., n, 1]
    f8 = (_as_float(v8_bits) * rec8 >= 4).to(I32)  # [..., n, 8]
    f4 = (_as_float(v16_bits) * rec8.unsqueeze(-1) >= 2 * pow2(f8).unsqueeze(-1)).to(I32)  # [..., n, 8, 2]
    d = f8.unsqueeze(-1) + f4
    up = rec[..., None, None] * pow2(2 - d)  # exact
    down = sf[..., None, None] * pow2(d - 2)
    down = torch.where(nonfinite[..., None, None], _NAN, down)
    k = _min_const(_rhaz(_as_float(ab) * up.unsqueeze(-1)), 7.0)
    return _apply_sign(t, (k * down.unsqueeze(-1)).reshape(t.shape))


# =========================================================================================================
# NVFP4 (§8)

_E2M1_MAX, _E4M3_MAX = 6.0, 448.0
_ONE_SIXTH = _f32(1.0 / 6.0)  # fl32(1/6), a host constant


def _e4m3(v: Tensor) -> Tensor:
    """E4M3(v) for finite v >= 0: nearest even, subnormals down to 2^-9, saturating at 448."""
    return _min_const(grid(_min_const(v, _E4M3_MAX), 3, -6, "even"), _E4M3_MAX)


def _e2m1(y: Tensor) -> Tensor:
    """min(grid(min(y, 6); 1, 0), 6), nearest even, for finite y >= 0."""
    return _min_const(grid(_min_const(y, _E2M1_MAX), 1, 0, "even"), _E2M1_MAX)


def _nvf4_kernel(t: Tensor, q: QType) -> Tensor:
    blocks = _blocks(t, 16)
    ab = _abs_bits(blocks)
    a = _as_float(ab)
    top, nonfinite = _finite_max(ab, -1, keepdim=True)
    amax = _as_float(top)
    s = _e4m3(amax / torch.full_like(amax, _E2M1_MAX))  # fl32(amax / 6), a true division
    s_div = torch.where(s > 0, s, 1.0)
    s_mul = torch.where(nonfinite, _NAN, s)
    y = a / s_div
    magnitude = _e2m1(torch.where(nonfinite, 0.0, y)) * s_mul
    return _unblocks(_apply_sign(blocks, magnitude))


def _nvfp4_kernel(t: Tensor, q: QType, g: Tensor) -> Tensor:
    """One tile of nvfp4 given the per-tensor encode scale ``g`` (0-dim float32)."""
    blocks = _blocks(t, 16)
    ab = _abs_bits(blocks)
    a = _as_float(ab)
    top, nonfinite = _finite_max(ab, -1, keepdim=True)
    amax = _as_float(top)
    s = _e4m3(_min_const(amax * (g * _ONE_SIXTH), FLT_MAX))
    one = torch.ones_like(g)
    d = s * (one / g)  # fl32(S * fl32(1/g)); 0 when S = 0
    enc = torch.where(d > 0, one / torch.where(d > 0, d, 1.0), math.inf)
    enc = _min_const(enc, FLT_MAX)  # S = 0: 1/0 = inf -> FLT_MAX
    s_mul = torch.where(nonfinite, _NAN, s)
    y = _min_const(torch.where(nonfinite, 0.0, a) * enc, _E2M1_MAX)
    magnitude = (_e2m1(y) * s_mul) / g
    return _unblocks(_apply_sign(blocks, magnitude))


def _nvfp4_scale(x3: Tensor, tile_elements: int) -> Tensor:
    """g = min(fl32(2688 / A), FLT_MAX) with A the largest finite |x| of the tensor (a tiled reduction)."""
    best = torch.zeros((), dtype=I32, device=x3.device)
    for _, tile in _tiles(x3, 1, tile_elements):
        ab = _abs_bits(tile.to(F32))
        best = torch.maximum(best, torch.where(ab >= _INF_BITS, 0, ab).amax())
    a = _as_float(best)
    live = a > 0
    g = torch.full_like(a, _E4M3_MAX * _E2M1_MAX) / torch.where(live, a, 1.0)
    return torch.where(live, _min_const(g, FLT_MAX), FLT_MAX)  # A = 0: 2688/0 = inf -> FLT_MAX


# =========================================================================================================
# NF4 (§9)

_NF4_CODES32 = tuple(_f32(c) for c in NF4_CODES)
_NF4_THRESHOLDS32 = tuple(_f32(c) for c in NF4_THRESHOLDS)


def _nf4_kernel(t: Tensor, q: QType) -> Tensor:
    blocks = _blocks(t, 64)
    top, nonfinite = _finite_max(_abs_bits(blocks), -1, keepdim=True)
    amax = _as_float(top)
    inv = torch.ones_like(amax) / torch.where(amax > 0, amax, 1.0)  # fl32(1/A)
    v = blocks * inv  # fl32(x * fl32(1/A)); NaN/inf elements only occur in NaN blocks
    # The code index is the number of thresholds strictly below v: walk them upwards.
    code = torch.full_like(v, _NF4_CODES32[0])
    for threshold, value in zip(_NF4_THRESHOLDS32, _NF4_CODES32[1:]):
        code = torch.where(v > threshold, value, code)
    a_mul = torch.where(nonfinite, _NAN, amax)
    return _unblocks(code * a_mul)  # code 7 (0.0) gives 0 * A = +0


def _nf4_double_kernel(t: Tensor, q: QType) -> Tensor:
    bo, b = q.blk_outer_size, q.blk_size
    groups = t.reshape(*t.shape[:-1], -1, bo, b)  # [..., n_outer, BO, B]
    ab = _abs_bits(groups)
    a = _as_float(ab)
    gm_bits, nonfinite = _finite_max(ab, -1, keepdim=True)  # [..., n_outer, BO, 1]
    gm = _as_float(gm_bits)
    gmm = _as_float(gm_bits.amax(dim=-2, keepdim=True))  # [..., n_outer, 1, 1]: finite groups only
    dq_max, levels = torch.full_like(gm, 448.0), torch.full_like(gm, 7.0)
    gm_div = torch.where(gm > 0, gm, 1.0)
    gmm_div = torch.where(gmm > 0, gmm, 1.0)
    tq = _min_const(grid((gm / gmm_div) * dq_max, 3, -6, "nearest"), 448.0)
    gd = torch.where(nonfinite, _NAN, (tq / dq_max) * gmm)
    k = _rhaz((torch.where(nonfinite, 0.0, a) / gm_div) * levels)
    magnitude = (k / levels) * gd
    return _apply_sign(t, magnitude.reshape(t.shape))


# =========================================================================================================
# int8sym (§10): one scale per whole slice along the axis, so two tiled passes.


def _int8sym(x: Tensor, q: QType, tile_elements: int | None) -> Tensor:
    tile_elements = tile_elements or TILE_ELEMENTS
    x3 = _as_pli(x, q.q_dim)
    p, _, inner = x3.shape
    # Pass 1: per-slice maximum bits [P, 1, I] (>= inf bits: the slice holds a NaN/inf).
    top = torch.zeros((p, 1, inner), dtype=I32, device=x.device)
    for (ps, _, is_), tile in _tiles(x3, 1, tile_elements):
        view = top[ps, :, is_]
        view.copy_(torch.maximum(view, _abs_bits(tile.to(F32)).amax(dim=-1, keepdim=True).permute(0, 2, 1)))
    # Pass 2: elements.
    out3 = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    for index, tile in _tiles(x3, 1, tile_elements):
        t = tile.to(F32)  # [pc, ic, n]
        slice_top = top[index[0], :, index[2]].permute(0, 2, 1)  # [pc, ic, 1]
        nonfinite = slice_top >= _INF_BITS
        amax = _as_float(torch.where(nonfinite, 0, slice_top))
        step = amax / torch.full_like(amax, 127.0)  # fl32(amax / 127)
        live = step > 0  # zero slices and steps that underflow to 0 give zeros
        step_div = torch.where(live, step, 1.0)
        step_mul = torch.where(nonfinite, _NAN, torch.where(live, step, 0.0))
        a = _as_float(_abs_bits(t))
        y = torch.where(nonfinite, 0.0, a) / step_div
        magnitude = _min_const(round_int(y, "even"), 127.0) * step_mul
        magnitude = _min_const(magnitude, FLT_MAX)  # 127 * fl32(FLT_MAX / 127) rounds up to inf: saturate
        out3[index].copy_(_to_dtype(_apply_sign(t, magnitude), x.dtype).permute(0, 2, 1))
    return out3.reshape(x.shape)


# =========================================================================================================
# Casts (§10): plain IEEE casts, with the rounding done on the bits so the device cast is exact.

_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": F32}


def _cast_kernel(t: Tensor, target: torch.dtype, back: torch.dtype) -> Tensor:
    """The value of ``t.to(target).to(back)`` in float32: two nearest-even roundings with IEEE overflow to
    ±inf; the final device cast in ``_run`` is then exact (and its saturation never applies: the values
    are already in ``back``'s range or infinite)."""
    return _round_to_dtype(_round_to_dtype(t, target), back)


def _cast(x: Tensor, q: QType, tile_elements: int | None) -> Tensor:
    target = _CAST_DTYPES[q.name]
    if x.dtype == torch.float64 or (target == F32 and x.dtype == F32):
        # float64 has no float32 route (two roundings would differ from one); fp32 -> fp32 is the identity.
        return x.to(target).to(x.dtype)
    return _run(x, q, 1, partial(_cast_kernel, target=target, back=x.dtype), tile_elements)


# =========================================================================================================
# Entry points

_BLOCK_KERNELS: dict[str, Callable[[Tensor, QType], Tensor]] = {
    "mx": _mx_kernel,
    "mx_hier": _mx_hier_kernel,
    "hifx": _hifx_kernel,
    "tmx": _tmx_kernel,
    "hif8": _hif8_kernel,
    "hif4": _hif4_kernel,
    "nvf4": _nvf4_kernel,
    "nf4": _nf4_kernel,
    "nf4_double": _nf4_double_kernel,
}


def _family_impl(family: str, x: Tensor, q: QType | str, tile_elements: int | None = None) -> Tensor:
    q = as_qtype(q)
    if q.family != family:
        raise ValueError(f"this is the NPU implementation of family {family!r}, got {str(q)!r} ({q.family!r})")
    dim = check_input(x, q)
    if x.numel() == 0:
        return x.clone()
    x1 = x.reshape(1) if x.dim() == 0 else x
    q = q.dim(dim)
    if family == "cast":
        return _cast(x1, q, tile_elements).reshape(x.shape)
    if family == "int8sym":
        out = _int8sym(x1, q, tile_elements)
    elif family == "nvfp4":
        tiles = tile_elements or TILE_ELEMENTS
        g = _nvfp4_scale(_as_pli(x1, dim), tiles)
        out = _run(x1, q, 16, partial(_nvfp4_kernel, q=q, g=g), tiles)
    else:
        out = _run(x1, q, q.block_len, partial(_BLOCK_KERNELS[family], q=q), tile_elements)
    return out.reshape(x.shape)


FAMILY_IMPLS: dict[str, Callable[..., Tensor]] = {
    family: partial(_family_impl, family)
    for family in ("mx", "mx_hier", "hifx", "tmx", "hif8", "hif4", "nvf4", "nvfp4", "nf4", "nf4_double",
                   "int8sym", "cast")
}


def quant_dequant(x: Tensor, q: QType | str, tile_elements: int | None = None) -> Tensor:
    """Fake-quantize ``x`` with ``q`` through the portable NPU code path; same contract as the reference."""
    q = as_qtype(q)
    return _family_impl(q.family, x, q, tile_elements)
