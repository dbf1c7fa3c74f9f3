"""``int8sym`` on Triton: symmetric int8 with one scale per slice along the axis (``shared/spec/formats.md``
§10), bit-exact with ``fakequant.formats.intq.quant_dequant_int8sym``.

The "block" is the whole slice, so a program owns whole slices: ``NR`` rows of the last axis (row mode) or
``BI`` columns of a ``[outer, L, inner]`` tensor (column mode). When a slice fits in one chunk of ``CH``
elements it is loaded once; otherwise the program walks the slice twice (maximum, then quantize), the second
walk backwards so that it starts on what the first read last. step = fl32(amax / 127);
q = min(RNE(fl32(|x| / step)), 127) * step with the input's sign; a zero (or underflowed) step gives zeros,
a slice with NaN/inf is NaN.

Order as in the Triton tutorials: per-tile math, kernel, launcher. Public: ``quant_dequant_int8sym``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...qtype import QType
from ._common import (
    FLT_MAX, I64_FROM, bits_of, cast_out, cdiv, check_input, copysign_plus, float_of, geometry, is_interpreted,
    launch, load_f32, max_keep, next_pow2, out_kind, round_to_int,
)

__all__ = ["quant_dequant_int8sym"]


@triton.jit
def _int8_values(x, amax_b):
    """Quantize-dequantize ``x`` against its slice maximum ``amax_b`` (int bits, broadcastable)."""
    amax = float_of(amax_b)
    step = tl.div_rn(amax, 127.0)
    live = step > 0.0  # False for a zero or underflowed step, and for NaN
    step_div = tl.where(live, step, 1.0)
    step_mul = tl.where(amax_b < 0x7F800000, tl.where(live, step, 0.0), float("nan"))
    r = round_to_int(tl.minimum(tl.div_rn(float_of(bits_of(x) & 0x7FFFFFFF), step_div), 128.0), 1, False)
    mag = tl.minimum(tl.minimum(r, 127.0) * step_mul, FLT_MAX, propagate_nan=tl.PropagateNan.ALL)
    return copysign_plus(mag, x)  # a float negation compiles to 0 - mag, which loses -0


@triton.jit(do_not_specialize=["cs"])
def _int8sym_kernel(
    x_ptr, y_ptr,  # input and output, same dtype, contiguous
    n_slices, L, I, cs,  # slices (row mode: rows); axis length; inner size (1 in row mode); 1 (see col_tile)
    NR: tl.constexpr, CH: tl.constexpr, BI: tl.constexpr,  # rows per program, chunk along L, columns
    COL: tl.constexpr, SCALAR: tl.constexpr, SINGLE: tl.constexpr, I64: tl.constexpr, OUT_KIND: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if COL:
        # tile [CH, BI]: CH positions along L of BI columns of one outer index
        n_i = cdiv(I, BI)
        po = pid // n_i
        if I64:
            po = po.to(tl.int64)
        i = (pid % n_i) * BI + tl.arange(0, BI)[None, :]
        if SCALAR:  # whole slices per thread, unvectorised columns (col_tile's SCALAR)
            base = po * L * I + i * cs
        else:
            base = po * L * I + i
        lpos = tl.arange(0, CH)[:, None]
        cmask = i < I
        if SINGLE:
            mask = cmask & (lpos < L)
            x = load_f32(x_ptr + base + lpos * I, mask, OUT_KIND, INTERPRET)
            amax = max_keep(bits_of(x) & 0x7FFFFFFF, 0)
            tl.store(y_ptr + base + lpos * I, cast_out(_int8_values(x, amax), OUT_KIND, INTERPRET), mask=mask)
        else:
            amax = tl.full([1, BI], 0, tl.int32)
            for start in range(0, L, CH):
                mask = cmask & (start + lpos < L)
                x = load_f32(x_ptr + base + (start + lpos) * I, mask, OUT_KIND, INTERPRET)
                amax = tl.maximum(amax, max_keep(bits_of(x) & 0x7FFFFFFF, 0))
            last = ((L - 1) // CH) * CH
            for k in range(0, L, CH):
                start = last - k
                mask = cmask & (start + lpos < L)
                offs = base + (start + lpos) * I
                x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
                tl.store(y_ptr + offs, cast_out(_int8_values(x, amax), OUT_KIND, INTERPRET), mask=mask)
    else:
        # tile [NR, CH]: NR whole rows, CH positions along the row
        rows = pid * NR + tl.arange(0, NR)[:, None]
        if I64:
            rows = rows.to(tl.int64)
        base = rows * L
        lpos = tl.arange(0, CH)[None, :]
        rmask = rows < n_slices
        if SINGLE:
            mask = rmask & (lpos < L)
            x = load_f32(x_ptr + base + lpos, mask, OUT_KIND, INTERPRET)
            amax = max_keep(bits_of(x) & 0x7FFFFFFF, 1)
            tl.store(y_ptr + base + lpos, cast_out(_int8_values(x, amax), OUT_KIND, INTERPRET), mask=mask)
        else:
            amax = tl.full([NR, 1], 0, tl.int32)
            for start in range(0, L, CH):
                mask = rmask & (start + lpos < L)
                x = load_f32(x_ptr + base + start + lpos, mask, OUT_KIND, INTERPRET)
                amax = tl.maximum(amax, max_keep(bits_of(x) & 0x7FFFFFFF, 1))
            last = ((L - 1) // CH) * CH
            for k in range(0, L, CH):
                start = last - k
                mask = rmask & (start + lpos < L)
                offs = base + start + lpos
                x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
                tl.store(y_ptr + offs, cast_out(_int8_values(x, amax), OUT_KIND, INTERPRET), mask=mask)


MAX_SINGLE = 16384  # elements of one slice held at once (registers); longer slices take two walks


def quant_dequant_int8sym(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``int8sym`` of ``x`` along ``q.q_dim`` (formats.md §10). ``tile=(rows or columns, chunk, warps)``
    overrides the plan (benchmark sweeps)."""
    if q.family != "int8sym":
        raise ValueError(f"quant_dequant_int8sym: expected the int8sym QType, got {q.desc!r} ({q.family})")
    x = check_input(x, q.q_dim, "quant_dequant_int8sym")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y

    def prepare():
        g = geometry(x, q.q_dim)
        interp = is_interpreted(x)
        lp = next_pow2(g.length)
        target = (1 << 16) if interp else 8192
        col = g.inner > 1
        if col:
            bi = min(next_pow2(g.inner), 32 if not interp else 256)
            ch = min(lp, max(1, target // bi))
            scalar = False
            if tile is not None:
                bi, ch = tile[0], tile[1]
                scalar = len(tile) > 3 and bool(tile[3])
            grid = g.outer * triton.cdiv(g.inner, bi)
            nr = 1
        else:
            ch = min(lp, MAX_SINGLE if lp <= MAX_SINGLE else 4096)
            nr = max(1, min(next_pow2(g.outer), target // ch)) if ch >= lp else 1
            if tile is not None:
                nr, ch = tile[0], tile[1]
            grid = triton.cdiv(g.outer, nr)
            bi = 1
            scalar = False
        warps = tile[2] if tile is not None else (8 if nr * ch * bi >= 8192 else 4)
        kwargs = {
            "NR": nr, "CH": ch, "BI": bi, "COL": col, "SCALAR": scalar, "SINGLE": ch >= g.length,
            "I64": x.numel() >= I64_FROM, "OUT_KIND": out_kind(x.dtype), "INTERPRET": interp,
            "num_warps": warps, "enable_fp_fusion": False,
        }
        return (grid,), (x, y, g.outer, g.length, g.inner, 1), kwargs

    launch(_int8sym_kernel, (q, x.shape, x.dtype, tile), (x, y), prepare)
    return y
