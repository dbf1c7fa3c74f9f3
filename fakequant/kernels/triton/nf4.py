"""NF4 (QLoRA NormalFloat4, blocks of 64) on Triton (``shared/spec/formats.md`` §9), bit-exact with
``fakequant.formats.nf4.quant_dequant_nf4``.

One program holds whole 64-blocks as a ``[NBLK, 64]`` tile (axis -1) or ``[NBLK, 64, BI]`` (other axes).
Per element: w = fl32(x * -fl32(1/A)); the code index is 15 - #{-t_i <= w} (NaN w counts every threshold,
as the reference's bucketize does), found by a 4-level binary search over the thresholds as constants;
the result is fl32(c * A).

Order as in the Triton tutorials: per-tile math, kernel, launcher. Public: ``quant_dequant_nf4``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...formats.nf4 import NF4_CODES, NF4_THRESHOLDS
from ...qtype import QType
from ._common import (
    bits_of, cast_out, check_input, col_tile, float_of, launch_block_kernel, load_f32, max_keep, row_tile,
)

__all__ = ["quant_dequant_nf4"]


# The negated thresholds -t_i in ascending order (formats.md §9 table), as float32 constants: count(-t_i <= w)
# is found by a 4-level binary search over them with selects, so no table is read until the code itself.
_NT = [-t for t in reversed(NF4_THRESHOLDS)]
T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14 = (tl.constexpr(float(v)) for v in _NT)


@triton.jit
def _nf4_tile(x, code_ptr):
    """``code_ptr``: the 16 codes by count, i.e. c_(15 - count) (a 64-byte table, L1-resident)."""
    ab = bits_of(x) & 0x7FFFFFFF
    amax_b = max_keep(ab, 1)
    amax = float_of(amax_b)
    inv = tl.div_rn(1.0, tl.where(amax > 0, amax, 1.0))
    w = x * -inv
    c8 = w >= T7
    c4 = w >= tl.where(c8, T11, T3)
    c2 = w >= tl.where(c8, tl.where(c4, T13, T9), tl.where(c4, T5, T1))
    t1 = tl.where(c8, tl.where(c4, tl.where(c2, T14, T12), tl.where(c2, T10, T8)),
                  tl.where(c4, tl.where(c2, T6, T4), tl.where(c2, T2, T0)))
    c1 = w >= t1
    count = c8.to(tl.int32) * 8 + c4.to(tl.int32) * 4 + c2.to(tl.int32) * 2 + c1.to(tl.int32)
    count = tl.where(w != w, 15, count)  # NaN (0 * inf for blocks with A < 2^-128) counts every threshold
    code = tl.load(code_ptr + count)
    a_mul = tl.where(amax_b < 0x7F800000, amax, float("nan"))  # a block with NaN/inf is NaN
    return code * a_mul


@triton.jit(do_not_specialize=["cs"])
def _nf4_kernel(
    x_ptr, y_ptr, code_ptr,  # input, output (same dtype, contiguous), the 16 codes by threshold count
    n_blocks, n_row_blocks, L, I, cs,  # blocks in all (row mode); 64-blocks per slice; axis length; inner size
    NBLK: tl.constexpr, BI: tl.constexpr, COL: tl.constexpr, SCALAR: tl.constexpr, EVEN: tl.constexpr,
    I64: tl.constexpr,
    OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if COL:
        offs, mask = col_tile(pid, n_row_blocks, L, I, cs, 64, 64, NBLK, BI, SCALAR, I64)
    else:
        offs, mask = row_tile(pid, n_blocks, n_row_blocks, L, 64, 64, NBLK, EVEN, I64)
    x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
    tl.store(y_ptr + offs, cast_out(_nf4_tile(x, code_ptr), OUT_KIND, INTERPRET), mask=mask)


# Tile per element size (bytes): "row" (elements, warps) along the last axis, "col" (elements along the
# axis, columns, warps) otherwise; the best of scripts/bench_kernels.py --sweep on an H100 (docs/benchmarks.md).
TILES = {2: {"row": (1024, 2), "col": (64, 64, 4)}, 4: {"row": (512, 2), "col": (64, 32, 1)}}


@functools.cache
@functools.lru_cache(maxsize=16)
def _codes(device: torch.device) -> torch.Tensor:
    """The 16 code values on ``device``, made once per device (a host-to-device copy per call would cost
    more than the kernel on small operands)."""
    return torch.tensor(list(reversed(NF4_CODES)), dtype=torch.float32, device=device)  # code by count


def quant_dequant_nf4(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """NF4 of ``x`` along ``q.q_dim`` (formats.md §9)."""
    if q.family != "nf4":
        raise ValueError(f"quant_dequant_nf4: expected the nf4 QType, got {q.desc!r} ({q.family})")
    x = check_input(x, q.q_dim, "quant_dequant_nf4")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    launch_block_kernel(_nf4_kernel, x, y, q, 64, TILES, tile, extra=(_codes(x.device),))
    return y
