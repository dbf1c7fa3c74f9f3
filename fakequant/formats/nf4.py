"""NF4: QLoRA NormalFloat4 and its double-quantized uniform variant (``shared/spec/formats.md`` §9).

* ``nf4``: bitsandbytes NF4. Blocks of 64 scaled by their absmax A; ``v = fl32(x * fl32(1/A))`` picks the
  code with the number of thresholds it exceeds (strictly, so an exact tie takes the smaller code, as
  bitsandbytes' ``>`` comparisons do); the result is ``fl32(c * A)``. The code book is asymmetric
  (-1 ... 0 ... 1 with 7 negative and 8 positive levels), so there is no sign rule: zero is code 7, +0.
* ``nf4B<BO>b<B>``: 15 uniform levels ``k/7``, k in -7..7, per group of B elements, with each group
  maximum stored relative to its outer block's maximum in E4M3 (448 steps of a 3-bit-mantissa grid).

Every ``fl32(.)`` of the spec is one float32 operation in the written order; divisions are by tensors.

Public: ``quant_dequant_nf4``, ``quant_dequant_nf4_double``, ``NF4_CODES``, ``NF4_THRESHOLDS``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..qtype import QType
from ._common import grid, magnitude_max, round_half_away_, sign_from_, to_blocks

__all__ = ["quant_dequant_nf4", "quant_dequant_nf4_double", "NF4_CODES", "NF4_THRESHOLDS", "NF4_BLOCK"]

NF4_BLOCK = 64

# The 16 NF4 levels c_0..c_15 (§9); as float32 they are the fp32 numbers nearest to these decimals.
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# t_i lies between c_i and c_(i+1); the index of v is the number of t_i with v > t_i.
NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)

# nf4B: group maxima relative to the outer maximum are stored as E4M3 values (3 fraction bits, emin -6,
# max 448), rounded half away from zero; elements take k/7 with k = RHAZ(7 |x| / gm).
_DQ_MAX = 448.0
_LEVELS = 7.0


def _f32(values, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)


# nf4B's k: RHAZ in two in-place passes (``tests/test_nf4.py`` checks every tie in [0, 8] and its neighbours).
_rhaz_ = round_half_away_

# The index search (§9: the index of v is the number of thresholds below it). The top 12 bits of v's float32
# pattern (sign, exponent, 3 fraction bits) name one of 4096 intervals of consecutive floats, and no interval
# holds two thresholds: they are at least 0.08 apart, an interval at most 1/16 wide (checked where the tables
# are built). So the thresholds below an interval can be counted once, in a table, and the index of v is that
# count plus [v > the threshold inside v's interval]: one comparison per element instead of fifteen.
_INTERVAL_SHIFT = 20  # the 32 - 12 low bits that vary inside an interval


@functools.lru_cache(maxsize=None)
def _nf4_search_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """Per interval (the top 12 bits of a float32 pattern): the number of thresholds below it (as float32)
    and the threshold inside it (+inf where there is none, so that no v exceeds it)."""
    thresholds = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32)
    first = torch.arange(1 << 12, dtype=torch.int32) << _INTERVAL_SHIFT  # each interval's smallest magnitude
    ends = torch.stack([first, first | ((1 << _INTERVAL_SHIFT) - 1)]).view(torch.float32)  # [2, 4096]
    # The interval [lo, hi] of values (for negative v the largest magnitude is the lowest value). Intervals with
    # exponent 255 hold +inf or -inf and NaN patterns; they count as {±inf} (v is never NaN, see below).
    lo = torch.where(torch.isnan(ends[1]), ends[0], ends.amin(0))
    hi = torch.where(torch.isnan(ends[1]), ends[0], ends.amax(0))
    below = (thresholds < lo[:, None]).sum(1)  # [4096]; NaN intervals (never looked up) count 0
    inside = (thresholds >= lo[:, None]) & (thresholds < hi[:, None])  # [4096, 15]
    if int(inside.sum(1).max()) > 1:
        raise RuntimeError("nf4 search tables: an interval holds two thresholds")
    threshold = torch.full((1 << 12,), float("inf"))
    rows, cols = inside.nonzero(as_tuple=True)
    threshold[rows] = thresholds[cols]
    return below.to(torch.float32).to(device), threshold.to(device)


def quant_dequant_nf4(x: Tensor, q: QType) -> Tensor:
    """``nf4`` along ``q.q_dim`` of float32 ``x`` (§9). A = 0 gives zeros; a block with NaN/inf is NaN."""
    blocks, restore = to_blocks(x, q.q_dim, NF4_BLOCK)  # [..., n_blocks, 64]
    # max |x| as max(max x, -min x): two read-only passes instead of a full-size |x| copy; NaN propagates.
    # (torch.aminmax would be one pass, but its CPU kernel stalls for ~20 ms per call on small tensors.)
    high, low = blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)
    amax = torch.maximum(high.abs(), low.abs())  # [..., n_blocks, 1]; abs makes an all-zero block's A +0
    # fl32(1/A); an all-zero block divides by 1 instead, its v = 0 gives code 7 and so +0.
    inv = _f32(1.0, amax) / torch.where(amax > 0, amax, 1.0)
    # fl32(x * fl32(1/A)), written contiguously (blocks may be strided) so that it can be read as one row.
    v = torch.mul(blocks, inv, out=torch.empty(blocks.shape, dtype=torch.float32, device=blocks.device))
    flat = v.view(-1)
    # The index is the number of thresholds strictly below v, so an exact tie takes the smaller index, and
    # v = NaN counts none. That happens for finite input: an absmax below 2^-128 has 1/A = inf, and a zero
    # element then has v = 0 * inf = NaN, which lands on code 0 = -1, as in bitsandbytes' comparison tree.
    # -inf also counts none, so NaN becomes -inf (infinities stay).
    flat.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    below, threshold = _nf4_search_tables(v.device)
    interval = torch.bitwise_right_shift(flat.view(torch.int32), _INTERVAL_SHIFT).bitwise_and_(0xFFF)
    index = torch.index_select(below, 0, interval)  # as float32; exact small integers
    index.add_(torch.index_select(threshold, 0, interval).lt_(flat))  # + [v > its interval's threshold]
    index = interval.copy_(index)  # as int32, in the buffer of the interval numbers
    torch.index_select(_f32(NF4_CODES, v), 0, index, out=flat)  # the codes, in v's buffer
    a_mul = torch.where(torch.isfinite(amax), amax, float("nan"))  # NaN blocks: c * NaN = NaN
    return restore(v.mul_(a_mul))  # fl32(c_idx * A); code 7 gives 0 * A = +0 (nf4 has no -0)


def quant_dequant_nf4_double(x: Tensor, q: QType) -> Tensor:
    """``nf4B<BO>b<B>`` along ``q.q_dim`` of float32 ``x`` (§9), BO = ``q.blk_outer_size``, B = ``q.blk_size``.

    Per group: gm = max|x|; gmm = max gm over the outer block, groups with NaN/inf excluded (and NaN);
    k = RHAZ(fl32(fl32(|x|/gm)·7)); t = fl32(fl32(gm/gmm)·448); tq = min(grid(t; 3, -6) RHAZ, 448);
    gd = fl32(fl32(tq/448)·gmm); result ±fl32(fl32(k/7)·gd). gm = 0 gives zeros.
    """
    bo, b = q.blk_outer_size, q.blk_size
    blocks, restore = to_blocks(x, q.q_dim, bo * b)  # [..., n_outer, BO*B]
    groups = blocks.unflatten(-1, (bo, b))  # [..., n_outer, BO, B]
    y = groups.abs()  # the working buffer; the element steps below work in it
    gm = magnitude_max(y, -1)  # [..., n_outer, BO, 1]
    finite = torch.isfinite(gm)
    gmm = torch.where(finite, gm, 0.0).amax(dim=-2, keepdim=True)  # [..., n_outer, 1, 1]
    dq_max, levels = _f32(_DQ_MAX, gm), _f32(_LEVELS, gm)
    # Zero groups (and zero outer blocks) divide by 1 instead of 0; their elements and t are 0 anyway.
    gm_div = torch.where(gm > 0, gm, 1.0)
    gmm_div = torch.where(gmm > 0, gmm, 1.0)
    t = (gm / gmm_div) * dq_max
    tq = torch.clamp(grid(t, 3, -6, "nearest"), max=_DQ_MAX)
    gd = (tq / dq_max) * gmm
    gd = torch.where(finite, gd, float("nan"))  # groups with NaN/inf are NaN
    # k = RHAZ(fl32(fl32(|x| / gm) * 7)): |x| <= gm, so k is in 0..7 (inf elements only occur in NaN groups).
    k = _rhaz_(y.div_(gm_div).mul_(levels))
    sign_from_(k, groups)  # ±k / 7 = ±(k / 7) and ±(k/7) * gd = ±((k/7) * gd): rounding is symmetric
    return restore(k.div_(levels).mul_(gd).flatten(-2))  # ±fl32(fl32(k/7) * gd)
