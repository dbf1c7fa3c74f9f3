"""Exact building blocks shared by the reference formats (``shared/spec/formats.md`` §0).

Everything here works on float32 tensors and is exact: exponents come from the bits, never from ``log2``;
rounding is applied to an exact value ``t`` (never ``floor(t + 0.5)`` in float32, which rounds
``0.5 - 2^-25`` up); scaling is by powers of two built from the bits.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

FLT_MAX = torch.finfo(torch.float32).max
_TWO_POW_64 = 2.0**64
INT32_MIN = -(2**31)  # the bits of -0.0 read as an int32; no other float32 has them
_HALF_BELOW = float.fromhex("0x1.fffffep-2")  # 0.5 - 2^-25, the float32 just below 1/2
# Elements per piece of work (1 MiB of float32), for row_pieces and reference_quant_dequant: big enough that
# per-call overheads vanish, small enough that a piece's temporaries stay in cache and in the allocator's free
# lists (larger pieces, 4 MiB and up, were sometimes returned to the OS between pieces and faulted in again).
PIECE_ELEMENTS = 1 << 18


def row_pieces(*tensors: Tensor) -> Iterable[tuple[Tensor, ...]]:
    """Matching views of ``tensors``, split along dim 0 (which all share) into pieces of about PIECE_ELEMENTS
    elements of the first; 0-dim tensors, and tensors not on the CPU, come whole.

    For a quantizer that ``reference_quant_dequant`` does not split for it (nvfp4, whose scale is per tensor):
    its elementwise steps, everything after the block statistics, run piece by piece, so that their
    temporaries are small enough for the allocator to reuse and for the cache to hold. Per-block factors
    (``[..., n_blocks, 1]``) split alike with their elements (``[..., n_blocks, B]``); every element is
    computed alone, so the results do not depend on the split.
    """
    first = tensors[0]
    if first.dim() == 0 or first.device.type != "cpu":
        return [tensors]
    if any(t.dim() == 0 or t.shape[0] != first.shape[0] for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"row_pieces needs tensors of one size along dim 0, got shapes {shapes}")
    rows = max(1, PIECE_ELEMENTS * first.shape[0] // max(first.numel(), 1))
    return zip(*(t.split(rows) for t in tensors))


def exponent(a: Tensor) -> Tensor:
    """``floor(log2 a)`` of float32 ``a > 0`` as int32, exact, fp32 subnormals included.

    Normal numbers read their biased exponent field; subnormals are first scaled by 2^64 (exact) so that
    they become normal. Values ``<= 0`` give garbage that callers mask out. (The callers' tensors are per
    block; the second path costs several passes over them and is taken only when some value needs it.)
    """
    sub = a < 2.0**-126
    if bool(sub.any()):
        a = torch.where(sub, a * _TWO_POW_64, a)
        e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
        return torch.where(sub, e - 64, e)
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def pow2_normal(e: Tensor) -> Tensor:
    """Exact float32 ``2^e`` for int32 ``e`` in [-126, 127], built from the exponent field."""
    return ((e + 127) << 23).view(torch.float32)


def pow2(e: Tensor) -> Tensor:
    """Exact float32 ``2^e`` for int32 ``e`` in [-149, 127] (subnormal powers included); e above 127 gives
    2^127, e below -149 gives 0."""
    e = e.to(torch.int32)
    normal = pow2_normal(e.clamp(-126, 127))
    low = e < -126
    if not bool(low.any()):  # subnormal powers are rare; skip their passes when none is asked for
        return normal
    # 2^e for e < -126 is 2^(e + 64) * 2^-64, both factors exact and the product exact (a subnormal).
    small = pow2_normal(e.clamp(-126 - 64, -127) + 64) * 2.0**-64
    return torch.where(low, small, normal)


def ldexp(a: Tensor, e: Tensor | int) -> Tensor:
    """``a * 2^e`` as one correctly rounded float32 product for e in [-149, 127]; beyond that range the
    factor is split in two (used only to normalise subnormals, where both steps are exact)."""
    e = torch.as_tensor(e, dtype=torch.int32, device=a.device)
    e1 = e.clamp(-149, 127)
    out = a * pow2(e1)
    if bool((e != e1).any()):  # the second factor is 2^0 (skipped) unless some e is outside [-149, 127]
        out = out * pow2(e - e1)
    return out


def ldexp_(a: Tensor, e: Tensor | int) -> Tensor:
    """``ldexp`` in place on ``a``, which already has the broadcast shape (full-size elements)."""
    e = torch.as_tensor(e, dtype=torch.int32, device=a.device)
    e1 = e.clamp(-149, 127)
    a.mul_(pow2(e1))
    if bool((e != e1).any()):
        a.mul_(pow2(e - e1))
    return a


def significand(a: Tensor, e: Tensor) -> Tensor:
    """``a / 2^e`` in [1, 2) for ``e = exponent(a)``; exact."""
    return ldexp(a, -e)


def round_half_away_(t: Tensor) -> Tensor:
    """RHAZ of float32 ``t >= 0`` (ties away from zero) **in place**, exactly, in two passes and no temporary:
    ``floor(fl32(t + p))`` with ``p = 0.5 - 2^-25``, the float32 just below 1/2. Returns ``t``.

    ``floor(fl32(t + 0.5))`` is wrong only where the sum rounds up to an integer (t = 0.5 - 2^-25 gives the tie
    1 - 2^-25, which rounds to 1). With ``t = n + r``, n an integer and r in [0, 1):

    * r >= 1/2: ``t + p >= n + 1 - 2^-25``, within 2^-25 below n + 1 (or above it). Floats just below n + 1 are
      at least 2^-24 apart, so the sum rounds to n + 1 (at n = 0 the tie 1 - 2^-25 goes to the even 1).
    * r < 1/2 and t < 2^23: ``t <= n + 1/2 - u`` with u = ulp(t) (n + 1/2 is a multiple of u), so the sum is at
      least u + 2^-25 below n + 1, more than half the spacing of the floats just below n + 1 (that spacing is
      u for n >= 1, 2^-24 for n = 0), and rounds below n + 1.
    * t >= 2^23: t is an integer and p is less than half its ulp, so the sum rounds to t.

    Subnormal t give 0, inf and NaN stay. Checked against ``round_int`` on every float32 in [0, 2^24].
    """
    return t.add_(_HALF_BELOW).floor_()


def round_int_(t: Tensor, mode: str) -> Tensor:
    """Round exact float32 ``t >= 0`` to an integer **in place**: ``nearest`` (ties away from zero),
    ``even`` (ties to even), ``floor`` (toward zero). Returns ``t``."""
    if mode == "floor":
        return t.floor_()
    if mode == "even":
        return t.round_()
    if mode != "nearest":
        raise ValueError(f"rounding mode {mode!r} is not one of nearest, even, floor")
    return round_half_away_(t)


def round_int(t: Tensor, mode: str) -> Tensor:
    """``round_int_`` on a copy, with ``nearest`` written out as its definition (the fast forms are tested
    against it): ``f + [t - f >= 1/2]`` with ``f = floor(t)``; ``t - f`` is exact (both share t's ulp)."""
    if mode != "nearest":
        return round_int_(t.clone(), mode)
    f = torch.floor(t)
    return (t - f).ge_(0.5).add_(f)


def grid_(v: Tensor, man_bits: int, emin: int, mode: str) -> Tensor:
    """Round ``v >= 0`` **in place** to a float with ``man_bits`` fraction bits and minimum exponent ``emin``
    (subnormals included): p = max(E(v), emin), result = round(v * 2^(M-p)) * 2^(p-M). Returns ``v``.

    ``2^p`` is read straight from the exponent field of ``v`` (masking the mantissa), floored at ``2^emin``;
    dividing by the quantum ``2^(p-M)`` and multiplying back are exact. A quantum below 2^-149 (only for
    emin = -127 with M = 23) is raised to 2^-149, which leaves every float32 ``v`` unchanged, as it should.
    """
    if not -127 <= emin <= 127 or not 0 <= man_bits <= 23:
        raise ValueError(f"grid needs emin in -127..127 and man_bits in 0..23, got {emin}, {man_bits}")
    quantum = (v.view(torch.int32) & 0x7F800000).view(torch.float32)
    quantum.clamp_(min=2.0**emin).mul_(2.0**-man_bits)
    if emin - man_bits < -149:
        quantum.clamp_(min=2.0**-149)
    return round_int_(v.div_(quantum), mode).mul_(quantum)


def grid(v: Tensor, man_bits: int, emin: int, mode: str) -> Tensor:
    """``grid_`` on a copy."""
    return grid_(v.clone(), man_bits, emin, mode)


def to_blocks(x: Tensor, dim: int, block: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Move ``dim`` last, zero-pad it to a multiple of ``block`` and split it into blocks.

    Returns ``blocks`` of shape ``[..., n_blocks, block]`` and ``restore`` that maps a tensor of that shape
    back to ``x``'s shape (dropping the padding, moving the axis back).
    """
    moved = x.movedim(dim, -1)
    length = moved.shape[-1]
    pad = (-length) % block
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    blocks = moved.reshape(*moved.shape[:-1], -1, block)  # [..., n_blocks, block]

    def restore(y: Tensor) -> Tensor:
        flat = y.reshape(*y.shape[:-2], -1)[..., :length]  # [..., length]
        return flat.movedim(-1, dim)

    return blocks, restore


def block_nonfinite(blocks: Tensor, dims: int | tuple[int, ...] = -1) -> Tensor:
    """True where the block (reduced over ``dims``) holds a NaN or ±inf; keeps dims for broadcasting."""
    return (~torch.isfinite(blocks)).any(dim=dims, keepdim=True) if isinstance(dims, int) else (
        (~torch.isfinite(blocks)).amax(dim=dims, keepdim=True)
    )


def magnitude_max(a: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Maximum over ``dim`` (kept for broadcasting) of float32 magnitudes ``a``: ``a >= 0``, +inf and NaN
    allowed, as ``x.abs()`` gives them (abs clears every sign bit, NaN's included).

    Read off the int32 bit patterns: non-negative floats order like their patterns, and every NaN pattern
    (above 0x7F800000) lies above +inf's, so a block holding a NaN still has a NaN maximum. On CPU an integer
    maximum over short blocks runs 3-5x faster than a float one, which has to test for NaN.
    """
    return a.view(torch.int32).amax(dim=dim, keepdim=True).view(torch.float32)


def apply_sign(x: Tensor, magnitude: Tensor) -> Tensor:
    """``-|q|`` for negative ``x`` (so ``-0`` when it quantized to zero), ``+|q|`` otherwise (±0 in → +0)."""
    return torch.where(x < 0, -magnitude, magnitude)


def sign_from_(magnitude: Tensor, x: Tensor) -> Tensor:
    """``apply_sign`` in place on ``magnitude >= 0`` (or NaN) shaped like ``x``; returns ``magnitude``. (A NaN
    ``x`` lends its own sign; its element is NaN in every caller, since NaN makes its whole block NaN.)

    One copysign pass. Its sign source must not hold -0 (x = -0 gives +0). -0 is the only float32 whose bits
    read as the int32 minimum, so one integer min (a read-only pass) tells whether ``x`` has any; if it does,
    the sign comes from ``x + 0.0`` instead (-0 + +0 = +0, every other value unchanged).
    """
    if x.numel() and bool(x.view(torch.int32).amin() == INT32_MIN):
        x = x + 0.0
    return magnitude.copysign_(x)


def saturating_cast_(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``saturating_cast`` for results that hold no intended ±inf, clamping ``y`` in place (one pass less
    than keeping infinities apart)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return y.to(dtype)
    big = torch.finfo(dtype).max
    return y.clamp_(-big, big).to(dtype)


def saturating_cast(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast exact float32 results to ``dtype``; finite values beyond its largest finite value saturate."""
    if dtype == torch.float32 or dtype == torch.float64:
        return y.to(dtype)
    big = torch.finfo(dtype).max
    return torch.where(torch.isinf(y), y, y.clamp(-big, big)).to(dtype)
