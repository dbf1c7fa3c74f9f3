"""NVFP4: FP4 E2M1 elements in blocks of 16 with an E4M3 block scale (``shared/spec/formats.md`` §8).

Two families share the element and scale formats:

* ``nvf4``: the block scale alone, ``S = E4M3(amax / 6)``; elements ``|x| / S`` rounded to E2M1.
* ``nvfp4``: TransformerEngine's two-level recipe; a per-tensor fp32 encode scale
  ``g = 2688 / A`` (A = max |x| over the finite elements of the whole tensor, 2688 = 448 * 6) maps the
  tensor maximum onto the top of the E4M3 * E2M1 range, and each block stores ``S = E4M3(amax_b * g / 6)``.

Both are evaluated exactly as the spec writes them: each ``fl32(.)`` is one IEEE float32 operation in the
written order, E4M3 and E2M1 rounding are exact ties-to-even. Divisions are always by a tensor (never by a
Python scalar), because CUDA turns ``t / scalar`` into ``t * (1 / scalar)``, which is not correctly rounded.

Public:

* ``quant_dequant_nvf4``, ``quant_dequant_nvfp4``: the references, ``(float32 x, QType) -> float32``.
* ``block_scales``: the per-block E4M3 scales (and nvfp4's per-tensor scale) that a packed tensor stores.
* ``e4m3_round``, ``e4m3_to_bits``, ``e4m3_from_bits``: the E4M3 scale format (OCP E4M3FN bytes).
* ``e2m1_round``, ``e2m1_encode``, ``e2m1_decode``: the E2M1 element format (4-bit codes, sign in bit 3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..qtype import QType
from . import check_input
from ._common import FLT_MAX, grid, magnitude_max, row_pieces, sign_from_, to_blocks

__all__ = [
    "quant_dequant_nvf4",
    "quant_dequant_nvfp4",
    "block_scales",
    "BlockScales",
    "e4m3_round",
    "e4m3_to_bits",
    "e4m3_from_bits",
    "e2m1_round",
    "e2m1_encode",
    "e2m1_decode",
    "E2M1_VALUES",
    "BLOCK",
]

BLOCK = 16  # elements per block along the axis
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MAN_BITS, E4M3_EMIN = 3, -6  # E4M3 grid: 3 fraction bits, subnormals down to 2^-9
TENSOR_SCALE_NUMERATOR = E4M3_MAX * E2M1_MAX  # 2688: nvfp4 maps the tensor max onto 448 * 6

# The eight E2M1 magnitudes; the 4-bit code of a magnitude is its index here, plus 8 for a negative sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --------------------------------------------------------------------------------------------------------
# E2M1 elements


def e2m1_round(y: Tensor) -> Tensor:
    """Round float32 ``y >= 0`` to E2M1 with ties to even, saturating at 6: ``min(grid(y; 1, 0), 6)``.
    NaN stays NaN. See ``_e2m1_round_`` for how."""
    return _e2m1_round_(torch.clamp(y.to(torch.float32), max=E2M1_MAX))


def _e2m1_round_(y: Tensor) -> Tensor:
    """``e2m1_round`` in place on a float32 ``y >= 0`` (or NaN); returns ``y``.

    Uses the rounding of IEEE addition instead of ``grid``'s exponent arithmetic: the E2M1 step is 0.5 on
    [0, 2), 1 on [2, 4) and 2 on [4, 6], and ``fl32(y + C) - C`` rounds ``y`` to a multiple of ``ulp(C)``
    with ties to even for ``C = 2^(22 + max(E(y), 0))`` = 2^22, 2^23, 2^24 (ulp 0.5, 1, 2). ``C`` is an even
    multiple of its ulp, so "even" in the sum is "even" in the grid, and the subtraction is exact. Clamping
    to 6 first is harmless (the grid is monotone and holds 6) and keeps ``y`` inside those binades. ``C`` is
    built from ``y``'s exponent field (biased exponents below 127, i.e. ``y < 1``, count as 127).
    """
    y.clamp_(max=E2M1_MAX)
    c = torch.bitwise_and(y.view(torch.int32), 0x7F800000)  # y's exponent field (the one new tensor)
    c.clamp_(min=127 << 23).add_(22 << 23)  # 2^(22 + max(E(y), 0)) as float32 bits
    c = c.view(torch.float32)
    return y.add_(c).sub_(c)


def e2m1_encode(values: Tensor) -> Tensor:
    """4-bit E2M1 codes (``uint8`` 0..15, sign in bit 3) of float ``values``.

    Values off the grid are rounded like ``e2m1_round`` (ties to even, saturating at ±6); the sign bit is
    the sign bit of the input, so ``-0.0`` (and a small negative value that rounds to zero) encodes as 8.
    E2M1 has no NaN or infinity: a NaN raises ``ValueError``; ±inf saturates to ±6.
    """
    values = values.to(torch.float32)
    if torch.isnan(values).any():
        raise ValueError("e2m1_encode: E2M1 has no NaN encoding; mask NaN blocks before encoding")
    magnitude = e2m1_round(values.abs())
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=values.device)
    # magnitude is exactly one of the table entries, and bucketize (right=False) returns the number of
    # entries strictly below it, which is its index.
    index = torch.bucketize(magnitude.contiguous(), table, out_int32=True)
    sign = torch.signbit(values).to(torch.int32) << 3
    return (index | sign).to(torch.uint8)


def e2m1_decode(codes: Tensor) -> Tensor:
    """Float32 values of 4-bit E2M1 ``codes`` (integer tensor, 0..15; code 8 is ``-0.0``)."""
    codes = codes.to(torch.int32)
    if ((codes < 0) | (codes > 15)).any():
        raise ValueError("e2m1_decode: codes must be in 0..15")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    magnitude = table[codes & 7]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


# --------------------------------------------------------------------------------------------------------
# E4M3 scales


def e4m3_round(v: Tensor) -> Tensor:
    """Round float32 ``v`` to E4M3 (OCP E4M3FN values) like §8's ``E4M3``: ties to even, subnormals down
    to 2^-9, magnitudes above 448 (±inf included) saturate to 448. ``E4M3(v) = min(grid(min(v, 448); 3, -6),
    448)`` for v >= 0; negative values round their magnitude and keep their sign (``-0.0`` stays ``-0.0``),
    NaN stays NaN.
    """
    magnitude = torch.clamp(v.abs(), max=E4M3_MAX)
    rounded = torch.clamp(grid(magnitude, E4M3_MAN_BITS, E4M3_EMIN, "even"), max=E4M3_MAX)
    return torch.copysign(rounded, v)


def _e4m3_round_nonneg(v: Tensor) -> Tensor:
    """``E4M3(v)`` for ``v >= 0`` or NaN (the scale path, where the sign is known)."""
    v = torch.clamp(v, max=E4M3_MAX)
    return torch.clamp(grid(v, E4M3_MAN_BITS, E4M3_EMIN, "even"), max=E4M3_MAX)


def e4m3_to_bits(v: Tensor) -> Tensor:
    """OCP E4M3FN bytes (``uint8``) of ``v``: sign in bit 7, 4 exponent bits (bias 7), 3 mantissa bits.

    ``v`` is first rounded with ``e4m3_round`` (so exact E4M3 values map to their own byte, ±inf saturates
    to ±448). NaN maps to 0x7F, or 0xFF when its sign bit is set.
    """
    v = v.to(torch.float32)
    r = e4m3_round(v)
    a = r.abs()
    bits = a.view(torch.int32)
    # Normal E4M3 (a >= 2^-6): the fp32 exponent re-biased from 127 to 7 and the top 3 fraction bits.
    normal = ((((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)) & 0x7F
    # Subnormal E4M3 (a < 2^-6): a is m * 2^-9 with m in 0..7, so the exponent field is 0.
    subnormal = (a * 512.0).to(torch.int32)
    code = torch.where(a >= 2.0**E4M3_EMIN, normal, torch.where(a < 2.0**E4M3_EMIN, subnormal, 0x7F))
    code = code | (torch.signbit(r).to(torch.int32) << 7)
    return code.to(torch.uint8)


def e4m3_from_bits(b: Tensor) -> Tensor:
    """Float32 values of OCP E4M3FN bytes ``b`` (integer tensor, 0..255). 0x7F and 0xFF are NaN (the latter
    with its sign bit set, so every byte survives ``e4m3_to_bits(e4m3_from_bits(b))``); 0x80 is ``-0.0``."""
    b = b.to(torch.int32)
    if ((b < 0) | (b > 255)).any():
        raise ValueError("e4m3_from_bits: bytes must be in 0..255")
    exp_field = (b >> 3) & 0xF
    man_field = b & 7
    normal = (((exp_field + 120) << 23) | (man_field << 20)).view(torch.float32)
    subnormal = man_field.to(torch.float32) * 2.0**-9
    magnitude = torch.where(exp_field == 0, subnormal, normal)
    magnitude = torch.where((b & 0x7F) == 0x7F, float("nan"), magnitude)
    # Set the sign bit directly (a float negation would not be guaranteed to flip a NaN's sign).
    return (magnitude.view(torch.int32) | ((b >> 7) << 31)).view(torch.float32)


# --------------------------------------------------------------------------------------------------------
# Scales


class BlockScales(NamedTuple):
    """Scales of an nvf4 / nvfp4 tensor, as a packed tensor stores them.

    ``block``: float32 E4M3 values, one per block of 16, shaped like ``x.movedim(dim, -1)`` with the last
    axis replaced by the number of blocks; NaN for blocks holding a NaN or ±inf (byte 0x7F), 0 for blocks
    that quantize to zero. ``tensor``: nvfp4's per-tensor encode scale ``g`` (a 0-dim float32 tensor; an
    element decodes to ``fl32(q * S / g)``), ``None`` for nvf4 (an element decodes to ``q * S``).
    """

    block: Tensor
    tensor: Tensor | None


def _const(value: float, like: Tensor) -> Tensor:
    """A 0-dim float32 tensor on ``like``'s device, so arithmetic with it is a plain tensor op."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _tensor_amax(a: Tensor, amax: Tensor, nonfinite: Tensor) -> Tensor:
    """A = max |x| over the finite elements of the whole tensor (0 when there are none).

    ``a`` holds the magnitudes as blocks ``[..., n_blocks, 16]``, ``amax`` their block maxima. Blocks with
    a NaN/inf are rare, so their finite elements are only looked at when there are any.
    """
    top = torch.where(nonfinite, 0.0, amax).amax()
    if bool(nonfinite.any()):
        rows = a[nonfinite.squeeze(-1)]  # [n_nonfinite_blocks, 16]
        top = torch.maximum(top, torch.where(torch.isfinite(rows), rows, 0.0).amax())
    return top


def _nvf4_scale(amax: Tensor) -> Tensor:
    """nvf4 block scale S = E4M3(fl32(amax / 6)) (§8)."""
    return _e4m3_round_nonneg(amax / _const(E2M1_MAX, amax))


def _nvfp4_scales(a: Tensor, amax: Tensor, nonfinite: Tensor) -> tuple[Tensor, Tensor]:
    """nvfp4's per-tensor encode scale g and block scales S (§8), in TransformerEngine's order."""
    big = _const(FLT_MAX, amax)
    g = torch.minimum(_const(TENSOR_SCALE_NUMERATOR, amax) / _tensor_amax(a, amax, nonfinite), big)
    g_over_6 = g * (_const(1.0, amax) / _const(E2M1_MAX, amax))  # fl32(g * fl32(1/6))
    return g, _e4m3_round_nonneg(torch.minimum(amax * g_over_6, big))


def block_scales(x: Tensor, q: QType) -> BlockScales:
    """The scales ``quant_dequant_nvf4`` / ``quant_dequant_nvfp4`` use for ``x`` along ``q.q_dim``.

    ``x`` is any floating tensor (converted to float32 exactly as ``quant_dequant`` does); ``q`` is an nvf4
    or nvfp4 QType. See ``BlockScales`` for the layout.
    """
    if q.family not in ("nvf4", "nvfp4"):
        raise ValueError(f"block_scales needs an nvf4 or nvfp4 QType, got {str(q)!r} (family {q.family!r})")
    dim = check_input(x, q)
    x32 = (x.reshape(1) if x.dim() == 0 else x).to(torch.float32)
    blocks, _ = to_blocks(x32, dim, BLOCK)  # [..., n_blocks, 16]
    a = blocks.abs()
    amax = a.amax(dim=-1, keepdim=True)  # [..., n_blocks, 1]; NaN/inf propagate
    nonfinite = ~torch.isfinite(amax)
    if q.family == "nvf4":
        g, s = None, _nvf4_scale(amax)
    else:
        g, s = _nvfp4_scales(a, amax, nonfinite)
    s = torch.where(nonfinite, float("nan"), s)
    return BlockScales(s.squeeze(-1), g)


# --------------------------------------------------------------------------------------------------------
# References


def quant_dequant_nvf4(x: Tensor, q: QType) -> Tensor:
    """``nvf4`` along ``q.q_dim`` of float32 ``x`` (§8): S = E4M3(fl32(amax/6)) per block of 16;
    q = min(grid(fl32(|x|/S); 1, 0), 6) ties to even; result ±q·S (exact). S = 0 gives zeros; a block
    with a NaN or ±inf is NaN."""
    blocks, restore = to_blocks(x, q.q_dim, BLOCK)  # [..., n_blocks, 16]
    y = blocks.abs()  # the working buffer; every step below works in it
    amax = magnitude_max(y, -1)  # [..., n_blocks, 1]; NaN/inf propagate
    s = _nvf4_scale(amax)
    # Divide by 1 where S = 0 (the products with S = 0 below are then 0); multiply NaN blocks by NaN.
    s_div = torch.where(s > 0, s, 1.0)
    s_mul = torch.where(torch.isfinite(amax), s, float("nan"))
    _e2m1_round_(y.div_(s_div))  # q = E2M1(fl32(|x| / S))
    return restore(sign_from_(y, blocks).mul_(s_mul))  # ±q * S: at most 2 + 4 significant bits, exact


def quant_dequant_nvfp4(x: Tensor, q: QType) -> Tensor:
    """``nvfp4`` along ``q.q_dim`` of float32 ``x`` (§8, TransformerEngine's order of operations).

    g = min(fl32(2688/A), FLT_MAX); per block S = E4M3(min(fl32(amax_b·fl32(g·fl32(1/6))), FLT_MAX));
    enc = min(fl32(1/fl32(S·fl32(1/g))), FLT_MAX); q = E2M1(min(fl32(|x|·enc), 6)); result ±fl32(q·S/g).
    A = 0 or S = 0 give zeros; a block with a NaN or ±inf is NaN (its finite elements still count in A).
    """
    blocks, restore = to_blocks(x, q.q_dim, BLOCK)  # [..., n_blocks, 16]
    y = blocks.abs()  # the working buffer; every step below works in it, in row_pieces (see below)
    amax = magnitude_max(y, -1)  # [..., n_blocks, 1]; NaN/inf propagate
    nonfinite = ~torch.isfinite(amax)
    g, s = _nvfp4_scales(y, amax, nonfinite)
    one = _const(1.0, amax)
    enc = torch.minimum(one / (s * (one / g)), _const(FLT_MAX, amax))  # S = 0: 1/0 = inf -> FLT_MAX
    s_mul = torch.where(nonfinite, float("nan"), s)
    # The per-tensor scale keeps nvfp4 from being quantized in pieces by reference_quant_dequant, so its
    # elementwise steps go through the blocks in row_pieces here (small temporaries, cache-resident passes).
    for y_piece, x_piece, enc_piece, mul_piece in row_pieces(y, blocks, enc, s_mul):
        _e2m1_round_(y_piece.mul_(enc_piece))  # q = E2M1(min(fl32(|x| * enc), 6))
        # ±q * S is exact (at most 2 + 4 significant bits), so dividing it by g is the one rounding of q·S/g,
        # and rounding is symmetric, so the sign can go on first.
        sign_from_(y_piece, x_piece).mul_(mul_piece).div_(g)
    return restore(y)
