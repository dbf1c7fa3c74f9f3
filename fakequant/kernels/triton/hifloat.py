"""HiFloat formats on Triton: HiF8 (elementwise, saturating or not), HiF4 (v14) and ``hifx<N>_v12``
(``shared/spec/formats.md`` §4, §6, §7), bit-exact with ``fakequant.formats.hifloat``.

HiF8 is elementwise, so its kernel streams the flat tensor whatever the axis. HiF4 and HiFX quantize
64-blocks made of 8 groups of 2 quads of 4 elements: one program holds whole blocks as a
``[NBLK, 8, 2, 4]`` tile (axis -1) or ``[NBLK, 8, 2, 4, BI]`` (any other axis, BI contiguous columns) and
takes quad, group and block maxima by reducing axes 3, 2, 1; nothing is transposed in memory.

Order as in the Triton tutorials: per-tile math, kernels, launchers.
Public: ``quant_dequant_hif8``, ``quant_dequant_hif4``, ``quant_dequant_hifx``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...qtype import QType
from ._common import (
    I64_FROM, bf16_rne, bits_of, cast_out, check_input, col_tile3, copysign_plus, float_of, is_interpreted, launch,
    launch_block_kernel, load_f32, max_keep, out_kind, rhaz_small, row_tile,
)

__all__ = ["quant_dequant_hif4", "quant_dequant_hif8", "quant_dequant_hifx"]


# --------------------------------------------------------------------------------------------- tile math
@triton.jit
def _hif8_values(x, SATURATE: tl.constexpr):
    """HiF8 of float32 ``x`` (formats.md §6 table): round half away on the grid of x's binade by adding half
    a grid step to the bits and clearing the bits below it (a carry moves into the next binade), flush below
    2^-23 to +0, [2^-23, 2^-22) to 2^-22, then overflow to ±32768 or ±inf."""
    b = bits_of(x)
    f = (b >> 23) & 0xFF  # biased exponent: e = f - 127
    ae = tl.abs(f - 127)
    # bits below the grid step: 23 - (3, 2, 1 mantissa bits for |e| <= 3, 4..7, 8..15); 23 for the denormal
    # binades e = -22..-16 (2^e only); 0 (keep every bit) beyond 2^15 and for inf/NaN
    step = 20 + (ae >= 4).to(tl.int32) + (ae >= 8).to(tl.int32)
    step = tl.where(f < 112, 23, tl.where(f > 142, 0, step))
    add = (1 << step) >> 1
    mask = -(1 << step)
    add = tl.where(f == 104, 1 << 23, add)  # [2^-23, 2^-22) -> 2^-22: a carry into the next binade
    mask = tl.where(f < 104, 0, mask)  # below 2^-23: +0
    y = float_of((b + add) & mask)
    if SATURATE:
        # clamp keeps NaN; inf and anything rounded past 2^15 -> ±32768
        return tl.minimum(tl.maximum(y, -32768.0, propagate_nan=tl.PropagateNan.ALL), 32768.0,
                          propagate_nan=tl.PropagateNan.ALL)
    big = (bits_of(y) & 0x7FFFFFFF) > 0x47000000  # |y| > 2^15 (NaN too: kept below)
    inf = float_of((bits_of(y) & -2147483648) | 0x7F800000)
    return tl.where(big & (y == y), inf, y)


@triton.jit
def _hifx_tile(x, MBITS: tl.constexpr):
    """hifx<N>_v12 of a float32 tile whose 64-blocks are laid out on axes 1..3 as [8, 2, 4] (formats.md §4).

    Quad, group and block maxima as int bits (NaN > inf > finite). base = clamp(E(v64) - 2, -46, 16); the
    group takes one more binade when its maximum is >= 2^(base+2), the quad one more when >= 2^(base+d8+1);
    so Q = base + d8 + d4, elements min(RHAZ(|x| * 2^(M-1-Q)), 2^M - 1) * 2^(Q+1-M).
    """
    ab = bits_of(x) & 0x7FFFFFFF
    v4 = max_keep(ab, 3)  # [.., 8, 2, 1]
    v8 = max_keep(v4, 2)  # [.., 8, 1, 1]
    v64 = max_keep(v8, 1)  # [.., 1, 1, 1]
    # E(v64) from the exponent field: a subnormal or zero block gives <= -127 and clamps to -46 anyway
    base = tl.minimum(tl.maximum((v64 >> 23) - 129, -46), 16)
    gexp = base + (v8 >= ((base + 129) << 23)).to(tl.int32)  # v8 >= 2^(base+2)
    qexp = gexp + (v4 >= ((gexp + 128) << 23)).to(tl.int32)  # v4 >= 2^(gexp+1)
    up = float_of((127 + MBITS - 1 - qexp) << 23)  # 2^(M-1-Q)
    down = float_of((128 - MBITS + qexp) << 23)  # 2^(Q+1-M)
    down = tl.where(v64 >= 0x7F800000, float("nan"), down)  # a block with NaN/inf is NaN
    k = rhaz_small(float_of(ab) * up, 2 ** MBITS - 1)
    return copysign_plus(k * down, x)


@triton.jit
def _hif4_tile(x):
    """HiF4 (v14) of a float32 tile whose 64-blocks are laid out on axes 1..3 as [8, 2, 4] (formats.md §7).

    SF = E6M2(clamp(bf16(fl32(Vmax * c)), 2^-48, 49152)) (RNE), REC = bf16(fl32(1 / SF)) read from its two
    fraction bits (1 / {1, 1.25, 1.5, 1.75} in bf16 times 2^-e); f8 = [fl32(V8 * REC) >= 4],
    f4 = [fl32(V16 * REC) >= 2 * 2^f8], D = f8 + f4; k = min(RHAZ(fl32(|x| * 4 * REC / 2^D)), 7);
    result ±k * 2^(D-2) * SF.
    """
    ab = bits_of(x) & 0x7FFFFFFF
    v16 = max_keep(ab, 3)
    v8 = max_keep(v16, 2)
    vmax_b = max_keep(v8, 1)
    finite = vmax_b < 0x7F800000
    vmax = float_of(tl.where(finite, vmax_b, 0))
    sf = bf16_rne(vmax * 0.142578125)
    sf = tl.minimum(tl.maximum(sf, 3.552713678800501e-15), 49152.0)  # [2^-48, 49152]
    sfb = bits_of(sf)
    sfb = (sfb + 0xFFFFF + ((sfb >> 21) & 1)) & -2097152  # E6M2: 2 fraction bits, nearest-even
    sf = float_of(sfb)
    frac = (sfb >> 21) & 3
    rec_m = tl.where(frac == 0, 1.0, tl.where(frac == 1, 0.80078125, tl.where(frac == 2, 0.66796875, 0.5703125)))
    rec = rec_m * float_of((254 - ((sfb >> 23) & 0xFF)) << 23)  # * 2^-e, exact
    f8 = (float_of(v8) * rec >= 4.0).to(tl.int32)
    pow_f8 = (1 + f8).to(tl.float32)
    d = f8 + (float_of(v16) * rec >= 2.0 * pow_f8).to(tl.int32)
    up = rec * float_of((129 - d) << 23)  # 4 * REC / 2^D, exact
    down = sf * float_of((125 + d) << 23)  # SF * 2^D / 4, exact
    down = tl.where(finite, down, float("nan"))
    k = rhaz_small(float_of(ab) * up, 7)
    return copysign_plus(k * down, x)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _hif8_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, SATURATE: tl.constexpr, I64: tl.constexpr,
                 OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """Elementwise: a flat stream of BLOCK elements per program."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
    # HiF8 values are exact in bf16 and fp16 and within their range; unsaturated overflow is ±inf
    tl.store(y_ptr + offs, cast_out(_hif8_values(x, SATURATE), OUT_KIND, INTERPRET, True), mask=mask)


@triton.jit(do_not_specialize=["cs"])
def _hif_block64_kernel(
    x_ptr, y_ptr,  # input and output, same dtype, contiguous
    n_blocks, n_row_blocks, L, I, cs,  # blocks in all (row mode); 64-blocks per slice; axis length; inner size
    NBLK: tl.constexpr, BI: tl.constexpr, COL: tl.constexpr, SCALAR: tl.constexpr, EVEN: tl.constexpr,
    I64: tl.constexpr,
    HIF4: tl.constexpr, MBITS: tl.constexpr,  # HiF4, or hifx with M = N - 1
    OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if COL:
        offs, mask = col_tile3(pid, n_row_blocks, L, I, cs, 8, 2, 4, NBLK, BI, SCALAR, I64)
        x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
        if HIF4:
            y = _hif4_tile(x)
        else:
            y = _hifx_tile(x, MBITS)
    else:
        # load [NBLK, 64] flat (16-byte loads), view it as [NBLK, 8, 2, 4] for the quad/group/block maxima
        offs, mask = row_tile(pid, n_blocks, n_row_blocks, L, 64, 64, NBLK, EVEN, I64)
        x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
        xv = tl.reshape(x, [NBLK, 8, 2, 4])
        if HIF4:
            y = tl.reshape(_hif4_tile(xv), [NBLK, 64])
        else:
            y = tl.reshape(_hifx_tile(xv, MBITS), [NBLK, 64])
    tl.store(y_ptr + offs, cast_out(y, OUT_KIND, INTERPRET), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
# Tile per element size (bytes): "row" (elements, warps) along the last axis, "col" (elements along the
# axis, columns, warps) otherwise; the best of scripts/bench_kernels.py --sweep on an H100 (docs/benchmarks.md).
TILES = {2: {"row": (1024, 2), "col": (64, 128, 4)}, 4: {"row": (1024, 4), "col": (64, 128, 4)}}
HIF8_TILES = {2: (4096, 4), 4: (2048, 4)}  # elementwise: (elements, warps)


def quant_dequant_hif8(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """HiF8 of ``x`` (elementwise; formats.md §6), saturating unless ``q.saturating`` is False."""
    if q.family != "hif8":
        raise ValueError(f"quant_dequant_hif8: expected the hif8 QType, got {q.desc!r} ({q.family})")
    x = check_input(x, q.q_dim, "quant_dequant_hif8")
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y

    def prepare():
        interp = is_interpreted(x)
        block, warps = HIF8_TILES[2 if x.element_size() <= 2 else 4]
        if tile:
            block, warps = tile[0], tile[2]
        if interp:
            block = 1 << 16
        kwargs = {"BLOCK": block, "SATURATE": q.saturating, "I64": n >= I64_FROM, "OUT_KIND": out_kind(x.dtype),
                  "INTERPRET": interp, "num_warps": warps, "enable_fp_fusion": False}
        return (triton.cdiv(n, block),), (x, y, n), kwargs

    launch(_hif8_kernel, (q, x.shape, x.dtype, tile), (x, y), prepare)
    return y


def _block64(x: torch.Tensor, q: QType, hif4: bool, mbits: int, name: str, tile) -> torch.Tensor:
    x = check_input(x, q.q_dim, name)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    launch_block_kernel(_hif_block64_kernel, x, y, q, 64, TILES, tile, constants={"HIF4": hif4, "MBITS": mbits})
    return y


def quant_dequant_hif4(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """HiF4 (v14) of ``x`` along ``q.q_dim`` (formats.md §7)."""
    if q.family != "hif4":
        raise ValueError(f"quant_dequant_hif4: expected the hif4 QType, got {q.desc!r} ({q.family})")
    return _block64(x, q, True, 1, "quant_dequant_hif4", tile)


def quant_dequant_hifx(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """hifx<N>_v12 of ``x`` along ``q.q_dim`` (formats.md §4)."""
    if q.family != "hifx":
        raise ValueError(f"quant_dequant_hifx: expected a hifx<N>_v12 QType, got {q.desc!r} ({q.family})")
    return _block64(x, q, False, q.man_bits, "quant_dequant_hifx", tile)
