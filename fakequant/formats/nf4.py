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

import torch
from torch import Tensor

from ..qtype import QType
from ._common import grid, to_blocks

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


def _rhaz_(t: Tensor) -> Tensor:
    """Round float32 ``t`` in [0, 8] to an integer with ties away from zero, exactly, in place, in two passes:
    ``floor(fl32(t + p))`` with ``p = 0.5 - 2^-25``, the float32 just below 0.5.

    ``floor(fl32(t + 0.5))`` is wrong only at t = 0.5 - 2^-25: the sum 1 - 2^-25 is a tie and rounds up to 1
    (formats.md §12.3). With p, a tie n + 1/2 becomes n + 1 - 2^-25, which rounds to n + 1 (2^-25 is below
    half an ulp of sums in [1, 8]; at n = 0 it is the tie 1 - 2^-25, which rounds to the even 1), and any
    t < n + 1/2 is at most n + 1/2 - ulp(t), which keeps the sum more than half an ulp below n + 1.
    Checked against ``_common.round_int`` on every float32 in [0, 8] (a one-off run; ``tests/test_nf4.py``
    checks every tie and its neighbours).
    """
    return t.add_(float.fromhex("0x1.fffffep-2")).floor_()


def _sign_from_(magnitude: Tensor, x: Tensor) -> Tensor:
    """§0 Sign, in place on ``magnitude >= 0`` (or NaN): ``-|q|`` for negative ``x`` (so ``-0`` when it
    quantized to zero), ``+|q|`` for positive ``x`` and for ``x = ±0``. Same as ``_common.apply_sign``,
    without allocating two full-size tensors."""
    return magnitude.copysign_(x).masked_fill_(x == 0, 0.0)


def quant_dequant_nf4(x: Tensor, q: QType) -> Tensor:
    """``nf4`` along ``q.q_dim`` of float32 ``x`` (§9). A = 0 gives zeros; a block with NaN/inf is NaN."""
    blocks, restore = to_blocks(x, q.q_dim, NF4_BLOCK)  # [..., n_blocks, 64]
    # max |x| as max(max x, -min x): two read-only passes instead of a full-size |x| copy; NaN propagates.
    # (torch.aminmax would be one pass, but its CPU kernel stalls for ~20 ms per call on small tensors.)
    high, low = blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)
    amax = torch.maximum(high.abs(), low.abs())  # [..., n_blocks, 1]; abs makes an all-zero block's A +0
    # fl32(1/A); an all-zero block divides by 1 instead, its v = 0 gives code 7 and so +0.
    inv = _f32(1.0, amax) / torch.where(amax > 0, amax, 1.0)
    # fl32(x * fl32(1/A)), written contiguously: the 15 passes below then stream (blocks may be strided).
    v = torch.mul(blocks, inv, out=torch.empty(blocks.shape, dtype=torch.float32, device=blocks.device))
    # The index is the number of thresholds strictly below v, so an exact tie takes the smaller index, and
    # v = NaN counts none. That happens for finite input: an absmax below 2^-128 has 1/A = inf, and a zero
    # element then has v = 0 * inf = NaN, which lands on code 0 = -1, as in bitsandbytes' comparison tree.
    # (15 in-place comparisons are 2x faster than torch.bucketize on CPU, and bucketize sorts NaN last.)
    index = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    above = torch.empty(v.shape, dtype=torch.bool, device=v.device)
    for t in _f32(NF4_THRESHOLDS, v):  # 15 thresholds, not a loop over blocks or elements
        index.add_(torch.gt(v, t, out=above))
    codes = _f32(NF4_CODES, v).index_select(0, index.reshape(-1).to(torch.int32)).reshape(v.shape)
    a_mul = torch.where(torch.isfinite(amax), amax, float("nan"))  # NaN blocks: c * NaN = NaN
    return restore(codes.mul_(a_mul))  # fl32(c_idx * A); code 7 gives 0 * A = +0 (nf4 has no -0)


def quant_dequant_nf4_double(x: Tensor, q: QType) -> Tensor:
    """``nf4B<BO>b<B>`` along ``q.q_dim`` of float32 ``x`` (§9), BO = ``q.blk_outer_size``, B = ``q.blk_size``.

    Per group: gm = max|x|; gmm = max gm over the outer block, groups with NaN/inf excluded (and NaN);
    k = RHAZ(fl32(fl32(|x|/gm)·7)); t = fl32(fl32(gm/gmm)·448); tq = min(grid(t; 3, -6) RHAZ, 448);
    gd = fl32(fl32(tq/448)·gmm); result ±fl32(fl32(k/7)·gd). gm = 0 gives zeros.
    """
    bo, b = q.blk_outer_size, q.blk_size
    blocks, restore = to_blocks(x, q.q_dim, bo * b)  # [..., n_outer, BO*B]
    groups = blocks.unflatten(-1, (bo, b))  # [..., n_outer, BO, B]
    y = groups.abs()  # the one full-size buffer; the element steps below work in place
    gm = y.amax(dim=-1, keepdim=True)  # [..., n_outer, BO, 1]
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
    _sign_from_(k, groups)  # ±k / 7 = ±(k / 7) and ±(k/7) * gd = ±((k/7) * gd): rounding is symmetric
    return restore(k.div_(levels).mul_(gd).flatten(-2))  # ±fl32(fl32(k/7) * gd)
