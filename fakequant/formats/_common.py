"""Exact building blocks shared by the reference formats (``shared/spec/formats.md`` §0).

Everything here works on float32 tensors and is exact: exponents come from the bits, never from ``log2``;
rounding is applied to an exact value ``t`` (never ``floor(t + 0.5)`` in float32, which rounds
``0.5 - 2^-25`` up); scaling is by powers of two built from the bits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

FLT_MAX = torch.finfo(torch.float32).max
_TWO_POW_64 = 2.0**64


def exponent(a: Tensor) -> Tensor:
    """``floor(log2 a)`` of float32 ``a > 0`` as int32, exact, fp32 subnormals included.

    Normal numbers read their biased exponent field; subnormals are first scaled by 2^64 (exact) so that
    they become normal. Values ``<= 0`` give garbage that callers mask out.
    """
    sub = a < 2.0**-126
    a = torch.where(sub, a * _TWO_POW_64, a)
    e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
    return torch.where(sub, e - 64, e)


def pow2(e: Tensor) -> Tensor:
    """Exact float32 ``2^e`` for int32 ``e`` in [-149, 127] (subnormal powers included)."""
    e = e.to(torch.int32)
    normal = ((e.clamp(-126, 127) + 127) << 23).view(torch.float32)
    # 2^e for e < -126 is 2^(e + 64) * 2^-64, both factors exact and the product exact (a subnormal).
    small = ((e.clamp(-126 - 64, -127) + 64 + 127) << 23).view(torch.float32) * 2.0**-64
    return torch.where(e < -126, small, normal)


def ldexp(a: Tensor, e: Tensor | int) -> Tensor:
    """``a * 2^e`` as one correctly rounded float32 product for e in [-149, 127]; beyond that range the
    factor is split in two (used only to normalise subnormals, where both steps are exact)."""
    e = torch.as_tensor(e, dtype=torch.int32, device=a.device)
    e1 = e.clamp(-149, 127)
    e2 = e - e1
    return a * pow2(e1) * pow2(e2)


def significand(a: Tensor, e: Tensor) -> Tensor:
    """``a / 2^e`` in [1, 2) for ``e = exponent(a)``; exact."""
    return ldexp(a, -e)


def round_int_(t: Tensor, mode: str) -> Tensor:
    """Round exact float32 ``t >= 0`` to an integer **in place**: ``nearest`` (ties away from zero),
    ``even`` (ties to even), ``floor`` (toward zero). Returns ``t``."""
    if mode == "floor":
        return t.floor_()
    if mode == "even":
        return t.round_()
    if mode != "nearest":
        raise ValueError(f"rounding mode {mode!r} is not one of nearest, even, floor")
    f = torch.floor(t)
    # t - floor(t) is exact for t < 2^24 (both share t's ulp), so the tie test is exact: t = f + [frac >= 1/2].
    return t.sub_(f).ge_(0.5).add_(f)


def round_int(t: Tensor, mode: str) -> Tensor:
    """``round_int_`` on a copy."""
    return round_int_(t.clone(), mode)


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


def apply_sign(x: Tensor, magnitude: Tensor) -> Tensor:
    """``-|q|`` for negative ``x`` (so ``-0`` when it quantized to zero), ``+|q|`` otherwise (±0 in → +0)."""
    return torch.where(x < 0, -magnitude, magnitude)


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
