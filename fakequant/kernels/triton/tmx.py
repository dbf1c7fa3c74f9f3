"""``tmx<N>`` on Triton: paired-exponent block floats (``shared/spec/formats.md`` §5), bit-exact with
``fakequant.formats.tmx.quant_dequant_tmx``.

A 16-block is 8 pairs; one program holds whole blocks as a ``[NBLK, 4, 2, 2]`` tile (axis -1) or
``[NBLK, 4, 2, 2, BI]`` (other axes): axis 3 is the pair, axes 1-2 the pair's index in the block, so the pair
maxima are a reduction over axis 3 and the block maximum one over axes 2 and 1.

Order as in the Triton tutorials: per-tile math, kernel, launcher. Public: ``quant_dequant_tmx``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...qtype import QType
from ._common import (
    bits_of, cast_out, check_input, col_tile3, copysign_plus, exponent_and_fraction, float_of, launch_block_kernel,
    load_f32, max_keep, pow2, rhaz_small, row_tile,
)

__all__ = ["quant_dequant_tmx"]


@triton.jit
def _tmx_tile(x, MBITS: tl.constexpr):
    """Q = eb for pairs whose maximum reaches 2^eb (eb = E of the block maximum, exact, subnormals included),
    eb - 1 otherwise; elements min(RHAZ(|x| * 2^(M-1-Q)), 2^M - 1) * 2^(Q+1-M). Both factors are split in a
    per-pair part and a per-block remainder exactly as the reference does, so tiny blocks (Q down to -149)
    take the same two roundings."""
    ab = bits_of(x) & 0x7FFFFFFF
    v2 = max_keep(ab, 3)  # pair maxima [.., 4, 2, 1]
    vb = max_keep(max_keep(v2, 2), 1)  # block maximum [.., 1, 1, 1]
    finite = vb < 0x7F800000
    live = (vb > 0) & finite
    e, _ = exponent_and_fraction(tl.maximum(tl.minimum(vb, 0x7F7FFFFF), 1))
    eb = tl.where(live, e, 0)
    top = v2 >= bits_of(pow2(eb))  # the pair reaches the block's top binade
    q_low = tl.maximum(eb - 1, -149)
    up = MBITS - 1 - q_low
    up_rest = tl.maximum(up - 127, 0)
    up_pair = pow2(tl.where(top, up - up_rest - 1, up - up_rest))
    down = q_low + 1 - MBITS
    down_rest = tl.minimum(down + 126, 0)
    down_pair = pow2(tl.where(top, down - down_rest + 1, down - down_rest))
    down_rest_f = tl.where(finite, pow2(down_rest), float("nan"))  # a block with NaN/inf is NaN
    t = (float_of(ab) * up_pair) * pow2(up_rest)
    k = rhaz_small(t, 2 ** MBITS - 1)
    return copysign_plus((k * down_pair) * down_rest_f, x)


@triton.jit(do_not_specialize=["cs"])
def _tmx_kernel(
    x_ptr, y_ptr,  # input and output, same dtype, contiguous
    n_blocks, n_row_blocks, L, I, cs,  # blocks in all (row mode); 16-blocks per slice; axis length; inner size
    NBLK: tl.constexpr, BI: tl.constexpr, COL: tl.constexpr, SCALAR: tl.constexpr, EVEN: tl.constexpr,
    I64: tl.constexpr,
    MBITS: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if COL:
        offs, mask = col_tile3(pid, n_row_blocks, L, I, cs, 4, 2, 2, NBLK, BI, SCALAR, I64)
        x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
        tl.store(y_ptr + offs, cast_out(_tmx_tile(x, MBITS), OUT_KIND, INTERPRET), mask=mask)
    else:
        # load [NBLK, 16] flat (16-byte loads), view it as [NBLK, 4, 2, 2] for the pair/block maxima
        offs, mask = row_tile(pid, n_blocks, n_row_blocks, L, 16, 16, NBLK, EVEN, I64)
        x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
        y = tl.reshape(_tmx_tile(tl.reshape(x, [NBLK, 4, 2, 2]), MBITS), [NBLK, 16])
        tl.store(y_ptr + offs, cast_out(y, OUT_KIND, INTERPRET), mask=mask)


# Tile per element size (bytes): "row" (elements, warps) along the last axis, "col" (elements along the
# axis, columns, warps) otherwise; the best of scripts/bench_kernels.py --sweep on an H100 (docs/benchmarks.md).
TILES = {2: {"row": (1024, 2), "col": (16, 256, 2)}, 4: {"row": (512, 2), "col": (16, 512, 4)}}


def quant_dequant_tmx(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``tmx<N>`` of ``x`` along ``q.q_dim`` (formats.md §5), M = N - 2."""
    if q.family != "tmx":
        raise ValueError(f"quant_dequant_tmx: expected a tmx<N> QType, got {q.desc!r} ({q.family})")
    x = check_input(x, q.q_dim, "quant_dequant_tmx")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    launch_block_kernel(_tmx_kernel, x, y, q, 16, TILES, tile, constants={"MBITS": q.man_bits})
    return y
