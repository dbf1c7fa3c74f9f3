"""MX block floats, integer blocks and their hierarchical forms (``shared/spec/formats.md`` §1-§3).

One engine serves ``QType`` forms (``e<E>m<M>k<K>b<B>[c]``, ``e<E>m<M>K<KO>k<K>B<BO>b<B>...``) and the
microxcaling-compatible ``fakequant.mxfp.quantize_mx``, so the two can never drift apart.

Notation used throughout: a block with maximum magnitude ``amax`` gets a scale exponent ``s``; elements are
``y = |x| / 2^s`` rounded to the element grid and multiplied back by ``2^s``. For integer elements (E = 0)
the element grid is ``k / 2^(M-1)`` with ``k`` in [0, 2^M - 1], so ``s = g + M - 1`` where ``g`` is the
exponent of the integer's unit (formats.md §2), and the E8M0 window applies to ``s`` in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..qtype import QType
from ._common import (
    FLT_MAX, exponent, grid_, ldexp, ldexp_, magnitude_max, pow2, round_int, round_int_, sign_from_,
    significand, to_blocks,
)

__all__ = ["ElementFormat", "quant_dequant_mx", "quant_dequant_mx_hier", "mx_blocks"]

# The smallest fp32 >= sqrt(2): the `round` scale rule bumps the exponent when amax's significand reaches it.
SQRT2_UP = float.fromhex("0x1.6a09e8p0")


@dataclass(frozen=True)
class ElementFormat:
    """An element format in units of the block scale: emax, emin, fraction bits, largest magnitude."""

    exp_bits: int
    man_bits: int

    @property
    def is_int(self) -> bool:
        return self.exp_bits == 0

    @property
    def emax(self) -> int:
        if self.is_int:
            return 0
        return 2 ** (self.exp_bits - 1) - (1 if (self.exp_bits, self.man_bits) == (5, 2) else 0)

    @property
    def emin(self) -> int:
        return 0 if self.is_int else 2 - 2 ** (self.exp_bits - 1)

    @property
    def frac_bits(self) -> int:
        """Fraction bits of the element grid: M, or M - 1 for integers expressed in [0, 2)."""
        return self.man_bits - 1 if self.is_int else self.man_bits

    @property
    def frame(self) -> int:
        """Binades the arithmetic works below the block scale: 1 for E = 8, whose top binade 2^128 is
        beyond float32 (``y = |x| / 2^(s+1)`` then stays finite), else 0."""
        return 1 if self.emax >= 128 else 0

    @property
    def max_value(self) -> float:
        if self.is_int:
            return (2**self.man_bits - 1) / 2 ** (self.man_bits - 1)
        if (self.exp_bits, self.man_bits) == (4, 3):
            return 448.0
        return 2.0**self.emax * (2 - 2.0**-self.man_bits)


def scale_exponent_from(
    e: Tensor, sig: Tensor | None, fmt: ElementFormat, scale_mode: str, round_mode: str
) -> Tensor:
    """Shared exponent ``s`` of blocks whose maximum is ``sig * 2^e`` (``sig`` in [1, 2)) by the scale rule
    (formats.md §1 step 1, §2); ``sig`` may be None for the ``floor`` rule, which does not read it. Shared with
    the NPU implementation, which reads ``e`` and ``sig`` off the bits."""
    if scale_mode == "floor":
        bump = None
    elif scale_mode == "round":
        if not fmt.is_int:
            bump = sig >= SQRT2_UP
        elif round_mode == "floor":
            bump = None  # truncation never carries amax up to 2^M
        else:
            bump = sig >= 2 - 2.0**-fmt.man_bits  # amax would round to 2^M (the carry)
    elif scale_mode == "ceil":
        bump = sig > 1
    elif scale_mode == "rceil":
        bump = sig > fmt.max_value / 2.0**fmt.emax
    else:
        raise ValueError(f"scale mode {scale_mode!r} is not one of floor, round, ceil, rceil")
    s = e - fmt.emax
    return s if bump is None else s + bump.to(torch.int32)


def scale_exponent(amax: Tensor, fmt: ElementFormat, scale_mode: str, round_mode: str) -> Tensor:
    """Shared exponent ``s`` of blocks with maximum ``amax > 0`` (formats.md §1 step 1, §2)."""
    e = exponent(amax)
    sig = None if scale_mode == "floor" else significand(amax, e)  # the floor rule reads only the exponent
    return scale_exponent_from(e, sig, fmt, scale_mode, round_mode)


def quantize_elements(y: Tensor, fmt: ElementFormat, round_mode: str) -> Tensor:
    """Round ``y >= 0`` (already divided by the block scale times ``2^fmt.frame``) to the element grid,
    saturating at max; the result is in the same units as ``y``. ``y`` is consumed: it is overwritten in
    place (the reference's largest cost on CPU is allocating full-size temporaries)."""
    if fmt.is_int:
        q = round_int_(y.mul_(2.0**fmt.frac_bits), round_mode).mul_(2.0**-fmt.frac_bits)
    else:
        q = grid_(y, fmt.man_bits, fmt.emin - fmt.frame, round_mode)
    return q.clamp_(max=fmt.max_value / 2**fmt.frame)


def _scale_back_(q: Tensor, scale: Tensor, x: Tensor) -> Tensor:
    """``±q * scale`` in place, the sign taken from ``x`` (formats.md §0: -0 for a negative ``x`` that
    rounds to zero, +0 for ±0 inputs). A finite product beyond float32 saturates to FLT_MAX (§0, Output);
    a NaN scale (a NaN block) gives NaN. The sign goes on first: ``scale`` is positive or NaN, so
    ``(±q) * scale`` is ``±(q * scale)``.

    A hierarchical group whose exponent is clamped high can have ``scale = +inf``; there an element that
    rounds to 0 gives 0 * inf = NaN, except that inputs ±0 still give +0 (rare: only then the mask pass)."""
    q = sign_from_(q, x).mul_(scale).clamp_(min=-FLT_MAX, max=FLT_MAX)
    if bool(torch.isinf(scale).any()):
        q.masked_fill_((x == 0).logical_and_(~torch.isnan(scale)), 0.0)
    return q


def mx_blocks(
    blocks: Tensor,
    fmt: ElementFormat,
    k_bits: int,
    scale_mode: str = "floor",
    round_mode: str = "nearest",
    flush_subnormal_blocks: bool = False,
) -> Tensor:
    """Quantize-dequantize float32 ``blocks`` of shape ``[..., B]``, one shared exponent per last-dim row.

    ``flush_subnormal_blocks`` is microxcaling's ``flush_fp32_subnorms``: a block whose maximum is an fp32
    subnormal (exponent <= -127) becomes +0.
    Signs come from the input (formats.md §0), flushed blocks are +0.
    """
    k_max = 2 ** (k_bits - 1) - 1
    y = blocks.abs()  # [..., B]: the working buffer; |x| / 2^s and then the result are computed in it
    amax = magnitude_max(y, -1)  # [..., 1]; NaN/inf propagate
    nonfinite = ~torch.isfinite(amax)
    positive = amax > 0
    safe_amax = torch.where(positive & ~nonfinite, amax, torch.ones_like(amax))
    s = scale_exponent(safe_amax, fmt, scale_mode, round_mode)
    # An all-zero block takes E(amax) = -126 (microxcaling's 2^-126 convention); its elements are 0 anyway.
    s = torch.where(positive, s, torch.full_like(s, -126 - fmt.emax))
    nan_block = nonfinite | (s > k_max)
    s = torch.clamp(s, -k_max, k_max)
    # Per-block factors (cheap): the scale carries the block's NaN so no full-size mask pass is needed.
    s_arith = s + fmt.frame
    scale = pow2(s_arith).masked_fill_(nan_block, float("nan"))
    y.mul_(pow2(-s_arith))  # |x| / 2^s, one correctly rounded float32 product
    out = _scale_back_(quantize_elements(y, fmt, round_mode), scale, blocks)
    if flush_subnormal_blocks:
        flushed = positive & (exponent(safe_amax) <= -127)
        out.masked_fill_(flushed, 0.0)
    return out


def quant_dequant_mx(x: Tensor, q: QType) -> Tensor:
    """``e<E>m<M>k<K>b<B>[c]`` along ``q.q_dim`` of a float32 tensor (formats.md §1, §2)."""
    blocks, restore = to_blocks(x, q.q_dim, q.blk_size)  # [..., n_blocks, B]
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    return restore(mx_blocks(blocks, fmt, q.k_bits, q.scale_mode, q.round_mode))


def quant_dequant_mx_hier(x: Tensor, q: QType) -> Tensor:
    """Hierarchical ``e<E>m<M>K<KO>k<K>B<BO>b<B>[c][off<N>]`` (formats.md §3).

    Works in the exponent ``g`` of formats.md §3 (the block scale for E >= 2, the integer unit for E = 0),
    whose window [lo, hi] = [-k_max - exp_offset, k_max - exp_offset] saturates instead of giving NaN.
    """
    fmt = ElementFormat(q.exp_bits, q.man_bits)
    shift = fmt.man_bits - 1 if fmt.is_int else 0  # s = g + shift
    lo, hi = -q.k_max - q.exp_offset, q.k_max - q.exp_offset
    blocks, restore = to_blocks(x, q.q_dim, q.blk_size * q.blk_outer_size)
    groups = blocks.unflatten(-1, (q.blk_outer_size, q.blk_size))  # [..., n_outer, BO, B]

    a = groups.abs()  # [..., n_outer, BO, B]: the working buffer; |x| / 2^s and the result are computed in it
    amax = magnitude_max(a, -1)  # [..., n_outer, BO, 1]
    nonfinite = ~torch.isfinite(amax)
    live = (amax > 0) & ~nonfinite
    safe_amax = torch.where(live, amax, torch.ones_like(amax))
    # Step 1: the E = 0 carry is applied in step 2, at the clamped g.
    first_mode = "floor" if fmt.is_int and q.scale_mode == "round" else q.scale_mode
    g = scale_exponent(safe_amax, fmt, first_mode, q.round_mode) - shift
    g = torch.where(live, g, torch.full_like(g, lo)).clamp(lo, hi)
    # Step 2: integer elements carry when the group maximum would round to 2^M at this g.
    if fmt.is_int and q.scale_mode == "round":
        top = round_int(ldexp(safe_amax, -g.clamp(min=-254)), q.round_mode)
        g = g + ((top >= 2**fmt.man_bits) & live).to(torch.int32)
    # Step 3: no group more than 2^K - 1 binades below the outer block's largest group.
    outer = g.amax(dim=-2, keepdim=True)  # [..., n_outer, 1, 1]
    g = torch.maximum(g, outer - (2**q.k_bits - 1)).clamp(lo, hi)
    # Step 4: elements; below -254 every product is 0 or saturated alike, so clamp for fp32 arithmetic.
    s = (g + shift + fmt.frame).clamp(min=-254)
    scale = ldexp(torch.ones_like(amax), s).masked_fill_(nonfinite, float("nan"))
    # |x| / 2^s; a group clamped at hi can overflow it; it saturates, so cap it at FLT_MAX first.
    q_mag = quantize_elements(ldexp_(a, -s).clamp_(max=FLT_MAX), fmt, q.round_mode)
    return restore(_scale_back_(q_mag, scale, groups).flatten(-2))
