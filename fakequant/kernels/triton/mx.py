"""MX block floats and integer blocks ``e<E>m<M>k<K>b<B>[c]`` on Triton (``shared/spec/formats.md`` §1, §2).

Every element format (E = 0 or 2..8, any M), the four scale rules (floor, round, ceil, rceil), the three
element roundings (nearest, even, floor) and any block size B. One program quantizes a tile of whole
blocks: ``[NBLK, BP]`` when the axis is the last one (row mode), ``[NBLK, BP, BI]`` otherwise (column mode,
blocks along axis 1 of the tile, BI contiguous columns), so each element is read once and written once and
no transpose is materialised. Bit-exact with ``fakequant.formats.mx.quant_dequant_mx``.

Order as in the Triton tutorials: the per-tile math, the kernel, the launcher.
Public: ``quant_dequant_mx(x, q)``.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from ...qtype import QType
from ._common import (
    bits_of, block_segment, cast_out, cdiv, check_input, col_tile, copysign_plus, exponent_and_fraction,
    float_of, is_interpreted, launch, launch_block_kernel, load_f32, max_keep, next_pow2, pow2,
    round_to_int, row_tile, saturation, shared_constants,
)

__all__ = ["fusable_pair", "mx_constants", "quant_dequant_mx", "quant_dequant_mx_pair"]

_FLT_MAX = 3.4028234663852886e38
_ROUND_CODE = {"nearest": 0, "even": 1, "floor": 2}


@triton.jit
def _mx_tile(x, EMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, IS_INT: tl.constexpr,
             KMAX: tl.constexpr, BUMP_GE: tl.constexpr, MAXV: tl.constexpr, SPLIT: tl.constexpr,
             SUB_AMAX: tl.constexpr, ROUND: tl.constexpr, SAT: tl.constexpr):
    """Quantize-dequantize a float32 tile whose blocks run along axis 1 (any rank >= 2).

    EMAX/EMIN/MBITS: the element format (formats.md §1 table; for integers EMAX = EMIN = 0 and the grid
    is k / 2^(M-1)). KMAX: the E8M0-style window 2^(K-1) - 1. BUMP_GE: the scale rule as a threshold on the
    23 fraction bits of amax (s = E(amax) - EMAX + [f >= BUMP_GE]; 2^23 never bumps). MAXV: the largest
    element magnitude. SPLIT: the element grid reaches below 2^(M-127) (E = 8), where 2^(M-p) overflows
    float32 and is applied in two steps. SUB_AMAX: a block maximum that is an fp32 subnormal can give a scale
    above the window's floor (integer elements with K = 8), so its exponent is read exactly. SAT: the output
    dtype's largest finite value; magnitudes are clamped to it (formats.md §0, Output), NaN propagating.
    """
    ab = bits_of(x) & 0x7FFFFFFF
    amax = max_keep(ab, 1)  # int max of |x| bits: NaN > inf > finite, ordered
    if SUB_AMAX:
        e, frac = exponent_and_fraction(tl.maximum(amax, 1))
    else:  # a subnormal amax gives s <= -127 - EMAX + 1 <= -KMAX: clamped to the floor either way
        e = (amax >> 23) - 127
        frac = amax & 0x7FFFFF
    s = e - EMAX + (frac >= BUMP_GE).to(tl.int32)
    s = tl.where(amax > 0, s, -126 - EMAX)  # all-zero block: microxcaling's 2^-126 convention
    nan_block = (amax >= 0x7F800000) | (s > KMAX)
    s = tl.minimum(tl.maximum(s, -KMAX), KMAX)
    scale = tl.where(nan_block, float("nan"), pow2(s, KMAX >= 127))  # a NaN block's scale carries its NaN
    a = float_of(ab) * pow2(-s, KMAX >= 127)  # |x| / 2^s, one correctly rounded product
    if IS_INT:
        t = a * (2.0 ** (MBITS - 1))  # exact (a < 2)
        r = round_to_int(t, ROUND, False)
        q = tl.minimum(r, MAXV * (2.0 ** (MBITS - 1))) * (2.0 ** (1 - MBITS))
    else:
        # p = max(E(a), EMIN) read from the exponent field; 2^(M-p) and 2^(p-M) built from the bits
        binade = tl.maximum(bits_of(a) & 0x7F800000, (EMIN + 127) << 23)  # bits of 2^p
        if SPLIT:
            # p < M - 127 (E = 8 only): 2^(M-p) overflows float32, so apply 2^64 first (exact: a < 2^-104)
            small = binade < (MBITS << 23)
            t_small = (a * 18446744073709551616.0) * float_of(((190 + MBITS) << 23) - binade)
            t = tl.where(small, t_small, a * float_of(((127 + MBITS) << 23) + ((127 << 23) - binade)))
            # 2^(p-M) is a float32 subnormal when p - M < -126
            sub_q = float_of(1 << tl.minimum(tl.maximum((binade >> 23) - MBITS + 22, 0), 22))
            quantum = tl.where(binade >= ((MBITS + 1) << 23), float_of(binade - (MBITS << 23)), sub_q)
            r = round_to_int(t, ROUND, MBITS == 23)
            q = r * quantum
        else:
            t = a * float_of(((127 + MBITS) << 23) + ((127 << 23) - binade))  # a * 2^(M-p): exact, < 2^(M+1)
            r = round_to_int(t, ROUND, MBITS == 23)
            q = r * float_of(binade - (MBITS << 23))  # * 2^(p-M), exact
        q = tl.minimum(q, MAXV)
        if SPLIT:
            q = tl.where(a == float("inf"), float("nan"), q)  # the reference's inf / inf (E = 8)
    # q * 2^s beyond the output dtype's range saturates; NaN (NaN blocks) propagates through the clamp
    out = tl.minimum(q * scale, SAT, propagate_nan=tl.PropagateNan.ALL)
    return copysign_plus(out, x)  # sign from the input; -0 in gives +0 (formats.md §0)


@triton.jit
def _mx_program(
    pid, x_ptr, y_ptr, n_blocks, n_row_blocks, L, I, cs,
    B: tl.constexpr, BP: tl.constexpr, NBLK: tl.constexpr, BI: tl.constexpr, COL: tl.constexpr,
    SCALAR: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr,
    EMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, IS_INT: tl.constexpr, KMAX: tl.constexpr,
    BUMP_GE: tl.constexpr, MAXV: tl.constexpr, SPLIT: tl.constexpr, SUB_AMAX: tl.constexpr,
    ROUND: tl.constexpr, SAT: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program ``pid``'s tile of one tensor: load, quantize block by block, store."""
    if COL:
        offs, mask = col_tile(pid, n_row_blocks, L, I, cs, B, BP, NBLK, BI, SCALAR, I64)
    else:
        offs, mask = row_tile(pid, n_blocks, n_row_blocks, L, B, BP, NBLK, EVEN, I64)
    x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
    y = _mx_tile(x, EMAX, EMIN, MBITS, IS_INT, KMAX, BUMP_GE, MAXV, SPLIT, SUB_AMAX, ROUND, SAT)
    tl.store(y_ptr + offs, cast_out(y, OUT_KIND, INTERPRET, True), mask=mask)


@triton.jit(do_not_specialize=["cs"])
def _mx_kernel(
    x_ptr, y_ptr,  # input and output, same dtype, contiguous
    n_blocks, n_row_blocks, L, I, cs,  # blocks in all (row mode); blocks per slice; axis length; inner size
    B: tl.constexpr, BP: tl.constexpr,  # block size and its power-of-two padding
    NBLK: tl.constexpr, BI: tl.constexpr, COL: tl.constexpr, SCALAR: tl.constexpr, EVEN: tl.constexpr,
    I64: tl.constexpr,
    EMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, IS_INT: tl.constexpr, KMAX: tl.constexpr,
    BUMP_GE: tl.constexpr, MAXV: tl.constexpr, SPLIT: tl.constexpr, SUB_AMAX: tl.constexpr,
    ROUND: tl.constexpr, SAT: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    _mx_program(tl.program_id(0), x_ptr, y_ptr, n_blocks, n_row_blocks, L, I, cs, B, BP, NBLK, BI, COL, SCALAR,
                EVEN, I64, EMAX, EMIN, MBITS, IS_INT, KMAX, BUMP_GE, MAXV, SPLIT, SUB_AMAX, ROUND, SAT, OUT_KIND,
                INTERPRET)


@triton.jit(do_not_specialize=["a_cs", "b_cs"])
def _mx_two_kernel(
    a_x_ptr, a_y_ptr, a_n_blocks, a_n_row_blocks, a_L, a_I, a_cs,  # tensor a, as _mx_kernel's arguments
    b_x_ptr, b_y_ptr, b_n_blocks, b_n_row_blocks, b_L, b_I, b_cs,  # tensor b
    a_programs,  # programs [0, a_programs) do tensor a, the rest tensor b
    A_B: tl.constexpr, A_BP: tl.constexpr, A_NBLK: tl.constexpr, A_BI: tl.constexpr, A_COL: tl.constexpr,
    A_SCALAR: tl.constexpr, A_EVEN: tl.constexpr, A_EMAX: tl.constexpr, A_EMIN: tl.constexpr,
    A_MBITS: tl.constexpr, A_IS_INT: tl.constexpr, A_KMAX: tl.constexpr, A_BUMP_GE: tl.constexpr,
    A_MAXV: tl.constexpr, A_SPLIT: tl.constexpr, A_SUB_AMAX: tl.constexpr, A_ROUND: tl.constexpr,
    B_B: tl.constexpr, B_BP: tl.constexpr, B_NBLK: tl.constexpr, B_BI: tl.constexpr, B_COL: tl.constexpr,
    B_SCALAR: tl.constexpr, B_EVEN: tl.constexpr, B_EMAX: tl.constexpr, B_EMIN: tl.constexpr,
    B_MBITS: tl.constexpr, B_IS_INT: tl.constexpr, B_KMAX: tl.constexpr, B_BUMP_GE: tl.constexpr,
    B_MAXV: tl.constexpr, B_SPLIT: tl.constexpr, B_SUB_AMAX: tl.constexpr, B_ROUND: tl.constexpr,
    I64: tl.constexpr, SAT: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Two independent MX quantizations (two tensors of one dtype, each with its own format, axis and tile)
    in one launch: a GEMM's two operands, so a layer issues one launch where it would issue two."""
    pid = tl.program_id(0)
    if pid < a_programs:
        _mx_program(pid, a_x_ptr, a_y_ptr, a_n_blocks, a_n_row_blocks, a_L, a_I, a_cs, A_B, A_BP, A_NBLK, A_BI,
                    A_COL, A_SCALAR, A_EVEN, I64, A_EMAX, A_EMIN, A_MBITS, A_IS_INT, A_KMAX, A_BUMP_GE, A_MAXV,
                    A_SPLIT, A_SUB_AMAX, A_ROUND, SAT, OUT_KIND, INTERPRET)
    else:
        _mx_program(pid - a_programs, b_x_ptr, b_y_ptr, b_n_blocks, b_n_row_blocks, b_L, b_I, b_cs, B_B, B_BP,
                    B_NBLK, B_BI, B_COL, B_SCALAR, B_EVEN, I64, B_EMAX, B_EMIN, B_MBITS, B_IS_INT, B_KMAX,
                    B_BUMP_GE, B_MAXV, B_SPLIT, B_SUB_AMAX, B_ROUND, SAT, OUT_KIND, INTERPRET)


@triton.jit
def _mx_pair_program(
    pid, x_ptr, ya_ptr, yb_ptr, M, N,
    R: tl.constexpr, C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
    A_EMAX: tl.constexpr, A_EMIN: tl.constexpr, A_MBITS: tl.constexpr, A_IS_INT: tl.constexpr,
    A_KMAX: tl.constexpr, A_BUMP_GE: tl.constexpr, A_MAXV: tl.constexpr, A_SPLIT: tl.constexpr,
    A_SUB_AMAX: tl.constexpr, A_ROUND: tl.constexpr,
    B_EMAX: tl.constexpr, B_EMIN: tl.constexpr, B_MBITS: tl.constexpr, B_IS_INT: tl.constexpr,
    B_KMAX: tl.constexpr, B_BUMP_GE: tl.constexpr, B_MAXV: tl.constexpr, B_SPLIT: tl.constexpr,
    B_SUB_AMAX: tl.constexpr, B_ROUND: tl.constexpr,
    SAT: tl.constexpr, I64: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One read of an [R, C] tile, two quantizations: blocks of BA along the rows (the tile viewed as
    [R * C / BA, BA]) and blocks of BB down the columns (viewed as [R / BB, BB, C]); two writes."""
    n_c = cdiv(N, C)
    n_r = cdiv(M, R)
    pc = pid % n_c
    rest = pid // n_c
    pr = rest % n_r
    pb = rest // n_r
    if I64:
        pb = pb.to(tl.int64)
    rows = pr * R + tl.arange(0, R)[:, None]  # [R, 1]
    cols = pc * C + tl.arange(0, C)[None, :]  # [1, C]
    offs = pb * M * N + rows * N + cols
    mask = (rows < M) & (cols < N)
    x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
    ya = _mx_tile(tl.reshape(x, [R * (C // BA), BA]), A_EMAX, A_EMIN, A_MBITS, A_IS_INT, A_KMAX, A_BUMP_GE,
                  A_MAXV, A_SPLIT, A_SUB_AMAX, A_ROUND, SAT)
    tl.store(ya_ptr + offs, cast_out(tl.reshape(ya, [R, C]), OUT_KIND, INTERPRET, True), mask=mask)
    yb = _mx_tile(tl.reshape(x, [R // BB, BB, C]), B_EMAX, B_EMIN, B_MBITS, B_IS_INT, B_KMAX, B_BUMP_GE,
                  B_MAXV, B_SPLIT, B_SUB_AMAX, B_ROUND, SAT)
    tl.store(yb_ptr + offs, cast_out(tl.reshape(yb, [R, C]), OUT_KIND, INTERPRET, True), mask=mask)


@triton.jit
def _mx_pair_kernel(
    x_ptr, ya_ptr, yb_ptr,  # input [batch, M, N] contiguous; outputs along N (last axis) and along M
    M, N,  # the last two sizes
    R: tl.constexpr, C: tl.constexpr,  # tile rows (a multiple of BB) and columns (a multiple of BA)
    BA: tl.constexpr, BB: tl.constexpr,  # block sizes along N (output a) and along M (output b)
    A_EMAX: tl.constexpr, A_EMIN: tl.constexpr, A_MBITS: tl.constexpr, A_IS_INT: tl.constexpr,
    A_KMAX: tl.constexpr, A_BUMP_GE: tl.constexpr, A_MAXV: tl.constexpr, A_SPLIT: tl.constexpr,
    A_SUB_AMAX: tl.constexpr, A_ROUND: tl.constexpr,
    B_EMAX: tl.constexpr, B_EMIN: tl.constexpr, B_MBITS: tl.constexpr, B_IS_INT: tl.constexpr,
    B_KMAX: tl.constexpr, B_BUMP_GE: tl.constexpr, B_MAXV: tl.constexpr, B_SPLIT: tl.constexpr,
    B_SUB_AMAX: tl.constexpr, B_ROUND: tl.constexpr,
    SAT: tl.constexpr, I64: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    _mx_pair_program(tl.program_id(0), x_ptr, ya_ptr, yb_ptr, M, N, R, C, BA, BB, A_EMAX, A_EMIN, A_MBITS,
                     A_IS_INT, A_KMAX, A_BUMP_GE, A_MAXV, A_SPLIT, A_SUB_AMAX, A_ROUND, B_EMAX, B_EMIN, B_MBITS,
                     B_IS_INT, B_KMAX, B_BUMP_GE, B_MAXV, B_SPLIT, B_SUB_AMAX, B_ROUND, SAT, I64, OUT_KIND,
                     INTERPRET)


@triton.jit(do_not_specialize=["a_cs", "b_cs"])
def _mx_pair_two_kernel(
    g_ptr, ga_ptr, gb_ptr, M, N,  # a pair: g [batch, M, N] along N (ga) and along M (gb), as _mx_pair_kernel
    a_x_ptr, a_y_ptr, a_n_blocks, a_n_row_blocks, a_L, a_I, a_cs,  # tensor a, as _mx_kernel's arguments
    b_x_ptr, b_y_ptr, b_n_blocks, b_n_row_blocks, b_L, b_I, b_cs,  # tensor b
    pair_programs, a_programs,  # programs [0, pair) do the pair, [pair, pair + a) tensor a, the rest b
    R: tl.constexpr, C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
    GA_EMAX: tl.constexpr, GA_EMIN: tl.constexpr, GA_MBITS: tl.constexpr, GA_IS_INT: tl.constexpr,
    GA_KMAX: tl.constexpr, GA_BUMP_GE: tl.constexpr, GA_MAXV: tl.constexpr, GA_SPLIT: tl.constexpr,
    GA_SUB_AMAX: tl.constexpr, GA_ROUND: tl.constexpr,
    GB_EMAX: tl.constexpr, GB_EMIN: tl.constexpr, GB_MBITS: tl.constexpr, GB_IS_INT: tl.constexpr,
    GB_KMAX: tl.constexpr, GB_BUMP_GE: tl.constexpr, GB_MAXV: tl.constexpr, GB_SPLIT: tl.constexpr,
    GB_SUB_AMAX: tl.constexpr, GB_ROUND: tl.constexpr,
    A_B: tl.constexpr, A_BP: tl.constexpr, A_NBLK: tl.constexpr, A_BI: tl.constexpr, A_COL: tl.constexpr,
    A_SCALAR: tl.constexpr, A_EVEN: tl.constexpr, A_EMAX: tl.constexpr, A_EMIN: tl.constexpr,
    A_MBITS: tl.constexpr, A_IS_INT: tl.constexpr, A_KMAX: tl.constexpr, A_BUMP_GE: tl.constexpr,
    A_MAXV: tl.constexpr, A_SPLIT: tl.constexpr, A_SUB_AMAX: tl.constexpr, A_ROUND: tl.constexpr,
    B_B: tl.constexpr, B_BP: tl.constexpr, B_NBLK: tl.constexpr, B_BI: tl.constexpr, B_COL: tl.constexpr,
    B_SCALAR: tl.constexpr, B_EVEN: tl.constexpr, B_EMAX: tl.constexpr, B_EMIN: tl.constexpr,
    B_MBITS: tl.constexpr, B_IS_INT: tl.constexpr, B_KMAX: tl.constexpr, B_BUMP_GE: tl.constexpr,
    B_MAXV: tl.constexpr, B_SPLIT: tl.constexpr, B_SUB_AMAX: tl.constexpr, B_ROUND: tl.constexpr,
    I64: tl.constexpr, SAT: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    """A Linear's whole backward quantization in one launch: grad_output for dgrad and wgrad (a pair), the
    weight for dgrad (a) and the input for wgrad (b); one launch where there would be two."""
    pid = tl.program_id(0)
    if pid < pair_programs:
        _mx_pair_program(pid, g_ptr, ga_ptr, gb_ptr, M, N, R, C, BA, BB, GA_EMAX, GA_EMIN, GA_MBITS, GA_IS_INT,
                         GA_KMAX, GA_BUMP_GE, GA_MAXV, GA_SPLIT, GA_SUB_AMAX, GA_ROUND, GB_EMAX, GB_EMIN,
                         GB_MBITS, GB_IS_INT, GB_KMAX, GB_BUMP_GE, GB_MAXV, GB_SPLIT, GB_SUB_AMAX, GB_ROUND, SAT,
                         I64, OUT_KIND, INTERPRET)
    elif pid < pair_programs + a_programs:
        _mx_program(pid - pair_programs, a_x_ptr, a_y_ptr, a_n_blocks, a_n_row_blocks, a_L, a_I, a_cs, A_B, A_BP,
                    A_NBLK, A_BI, A_COL, A_SCALAR, A_EVEN, I64, A_EMAX, A_EMIN, A_MBITS, A_IS_INT, A_KMAX,
                    A_BUMP_GE, A_MAXV, A_SPLIT, A_SUB_AMAX, A_ROUND, SAT, OUT_KIND, INTERPRET)
    else:
        _mx_program(pid - pair_programs - a_programs, b_x_ptr, b_y_ptr, b_n_blocks, b_n_row_blocks, b_L, b_I,
                    b_cs, B_B, B_BP, B_NBLK, B_BI, B_COL, B_SCALAR, B_EVEN, I64, B_EMAX, B_EMIN, B_MBITS,
                    B_IS_INT, B_KMAX, B_BUMP_GE, B_MAXV, B_SPLIT, B_SUB_AMAX, B_ROUND, SAT, OUT_KIND, INTERPRET)


# Tile per element size (bytes): "row" (elements, warps) along the last axis, "col" (elements along the
# axis, columns, warps) otherwise; the best of scripts/bench_kernels.py --sweep on an H100 (docs/benchmarks.md).
TILES = {2: {"row": (1024, 4), "col": (32, 128, 4)}, 4: {"row": (1024, 4), "col": (32, 128, 4)}}


def _frac_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0] & 0x7FFFFF


def mx_constants(q: QType) -> dict:
    """The kernel's format constexprs for ``q`` (formats.md §1 step 1, §2)."""
    return _mx_constants(q.exp_bits, q.man_bits, q.k_bits, q.scale_mode, q.round_mode)


@functools.lru_cache(maxsize=512)
def _mx_constants(e: int, m: int, k_bits: int, mode: str, round_mode: str) -> dict:
    is_int = e == 0
    if is_int:
        emax = emin = 0
        maxv = (2**m - 1) / 2 ** (m - 1)
    else:
        emax = 2 ** (e - 1) - (1 if (e, m) == (5, 2) else 0)
        emin = 2 - 2 ** (e - 1)
        maxv = 448.0 if (e, m) == (4, 3) else 2.0**emax * (2 - 2.0**-m)
    never = 1 << 23
    if mode == "floor":
        bump = never
    elif mode == "round":
        if not is_int:
            bump = _frac_bits(float.fromhex("0x1.6a09e8p0"))  # significand >= the smallest fp32 >= sqrt(2)
        elif round_mode == "floor":
            bump = never
        else:
            bump = _frac_bits(2 - 2.0**-m) if m < 24 else never  # amax would round to 2^M: the carry
    elif mode == "ceil":
        bump = 1  # any fraction bit set: amax is not a power of two
    elif mode == "rceil":
        bump = _frac_bits(maxv / 2.0**emax) + 1  # significand > max_norm / 2^emax
    else:
        raise ValueError(f"scale mode {mode!r} is not one of floor, round, ceil, rceil")
    return {
        "EMAX": emax, "EMIN": emin, "MBITS": m, "IS_INT": is_int, "KMAX": 2 ** (k_bits - 1) - 1, "BUMP_GE": bump,
        "MAXV": float(maxv) if maxv <= _FLT_MAX else float("inf"), "SPLIT": (not is_int and emin < m - 126),
        "SUB_AMAX": -127 + 1 - emax > -(2 ** (k_bits - 1) - 1),
        "ROUND": _ROUND_CODE[round_mode],
    }


def quant_dequant_mx(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``e<E>m<M>k<K>b<B>[c]`` of ``x`` along ``q.q_dim``; same shape and dtype out (formats.md §1, §2).

    ``tile=(blocks per tile, columns per tile, warps)`` overrides the tile plan (benchmark sweeps).
    """
    if q.family != "mx":
        raise ValueError(f"quant_dequant_mx: expected an e<E>m<M>k<K>b<B> QType, got {q.desc!r} ({q.family})")
    x = check_input(x, q.q_dim, "quant_dequant_mx")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y

    block = q.blk_size
    launch_block_kernel(_mx_kernel, x, y, q, block, TILES, tile,
                        constants=dict(B=block, BP=next_pow2(block), **mx_constants(q), SAT=saturation(x.dtype)))
    return y


def _single_segment(x: torch.Tensor, y: torch.Tensor, q: QType) -> tuple[int, tuple, dict, int]:
    """One tensor's share of a grouped launch: programs, ``_mx_program``'s arguments, its constexprs (tile
    and format; the shared ones come from ``_shared``) and its warps."""
    grid, args, consts, warps = block_segment(x, y, q, q.blk_size, TILES, None)
    return grid, args, dict(B=q.blk_size, BP=next_pow2(q.blk_size), **consts, **mx_constants(q)), warps


def _pair_segment(x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, q_a: QType, q_b: QType
                  ) -> tuple[int, tuple, dict, int]:
    """The pair's share of a launch (``q_a`` along the last axis, ``q_b`` along the one before): programs,
    ``_mx_pair_program``'s arguments, its constexprs (R, C, BA, BB, A_*, B_*) and its warps."""
    m, n = x.shape[-2], x.shape[-1]
    batch = x.numel() // (m * n)
    ba, bb = q_a.blk_size, q_b.blk_size
    target = (1 << 16) if is_interpreted(x) else 4096
    c = max(ba, min(next_pow2(n), 128))
    r = max(bb, min(next_pow2(m), max(1, target // c)))
    grid = batch * -(-m // r) * -(-n // c)
    consts = dict(R=r, C=c, BA=ba, BB=bb, **_prefixed("A_", mx_constants(q_a)), **_prefixed("B_", mx_constants(q_b)))
    return grid, (x, ya, yb, m, n), consts, 4 if r * c <= 4096 else 8


def _prefixed(prefix: str, consts: dict) -> dict:
    return {prefix + k: v for k, v in consts.items()}


def _shared(*xs: torch.Tensor) -> dict:
    """``shared_constants`` plus the saturation bound of the one output dtype."""
    return dict(shared_constants(*xs), SAT=saturation(xs[0].dtype))


def quant_dequant_mx_two(x_a: torch.Tensor, q_a: QType, x_b: torch.Tensor, q_b: QType
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quant_dequant_mx(x_a, q_a), quant_dequant_mx(x_b, q_b))`` in one launch (``_mx_two_kernel``): two
    tensors of one dtype on one device, e.g. a GEMM's input and weight. Bit for bit the two separate calls."""
    if q_a.family != "mx" or q_b.family != "mx":
        raise ValueError(f"quant_dequant_mx_two: expected two e<E>m<M>k<K>b<B> QTypes, got {q_a.desc!r}, {q_b.desc!r}")
    if x_a.dtype != x_b.dtype or x_a.device != x_b.device:
        raise ValueError(f"quant_dequant_mx_two: the tensors must share dtype and device, got {x_a.dtype} on "
                         f"{x_a.device} and {x_b.dtype} on {x_b.device}")
    x_a = check_input(x_a, q_a.q_dim, "quant_dequant_mx_two")
    x_b = check_input(x_b, q_b.q_dim, "quant_dequant_mx_two")
    y_a, y_b = torch.empty_like(x_a), torch.empty_like(x_b)
    if x_a.numel() == 0 or x_b.numel() == 0:
        return quant_dequant_mx(x_a, q_a), quant_dequant_mx(x_b, q_b)

    def prepare():
        (grid_a, args_a, fmt_a, warps_a), (grid_b, args_b, fmt_b, warps_b) = (
            _single_segment(x_a, y_a, q_a), _single_segment(x_b, y_b, q_b))
        kwargs = dict(_prefixed("A_", fmt_a), **_prefixed("B_", fmt_b), **_shared(x_a, x_b),
                      num_warps=max(warps_a, warps_b), enable_fp_fusion=False)
        return (grid_a + grid_b,), (*args_a, *args_b, grid_a), kwargs

    launch(_mx_two_kernel, (q_a, q_b, x_a.shape, x_b.shape, x_a.dtype), (x_a, y_a, x_b, y_b), prepare)
    return y_a, y_b


def _pair_axes(x: torch.Tensor, q_a: QType, q_b: QType) -> tuple[int, int] | None:
    if x.dim() < 2:
        return None
    a, b = q_a.q_dim % x.dim(), q_b.q_dim % x.dim()
    last, second = x.dim() - 1, x.dim() - 2
    return (a, b) if {a, b} == {last, second} else None


def fusable_pair(x: torch.Tensor, q_a: QType, q_b: QType) -> bool:
    """Whether ``quant_dequant_mx_pair`` fuses ``q_a`` and ``q_b`` on ``x``: both MX, quantized along the last
    two axes (one each), power-of-two block sizes up to 128, a supported dtype."""
    if q_a.family != "mx" or q_b.family != "mx" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if _pair_axes(x, q_a, q_b) is None:
        return False
    return all(b & (b - 1) == 0 and b <= 128 for b in (q_a.blk_size, q_b.blk_size))


def quant_dequant_mx_pair(x: torch.Tensor, q_a: QType, q_b: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quant_dequant_mx(x, q_a), quant_dequant_mx(x, q_b))`` in one pass over ``x``, for two MX formats
    along the last two axes (``fusable_pair``): autograd's ``grad_output`` for dgrad (along N) and wgrad
    (along M), or a weight for fprop and dgrad. Bit for bit the two separate results."""
    if not fusable_pair(x, q_a, q_b):
        raise ValueError(
            f"quant_dequant_mx_pair: {q_a.desc!r} and {q_b.desc!r} on a {tuple(x.shape)} {x.dtype} tensor are not a "
            "fusable pair (two MX formats along the last two axes, power-of-two blocks <= 128)"
        )
    a_axis, _b_axis = _pair_axes(x, q_a, q_b)
    if a_axis != x.dim() - 1:  # q_a runs down the columns: swap the roles, swap back at the end
        yb, ya = quant_dequant_mx_pair(x, q_b, q_a)
        return ya, yb
    x = check_input(x, q_a.q_dim, "quant_dequant_mx_pair")
    ya, yb = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return ya, yb

    def prepare():
        grid, args, consts, warps = _pair_segment(x, ya, yb, q_a, q_b)
        return (grid,), args, dict(consts, **_shared(x), num_warps=warps, enable_fp_fusion=False)

    launch(_mx_pair_kernel, (q_a, q_b, x.shape, x.dtype), (x, ya, yb), prepare)
    return ya, yb


def quant_dequant_mx_pair_two(g: torch.Tensor, q_ga: QType, q_gb: QType, x_a: torch.Tensor, q_a: QType,
                              x_b: torch.Tensor, q_b: QType) -> tuple[torch.Tensor, ...]:
    """``(*quant_dequant_mx_pair(g, q_ga, q_gb), *quant_dequant_mx_two(x_a, q_a, x_b, q_b))`` in one launch
    (``_mx_pair_two_kernel``): a Linear's grad_output for dgrad and wgrad, its weight for dgrad and its
    input for wgrad. ``fusable_pair(g, q_ga, q_gb)`` must hold; one dtype and device for all three tensors.
    Bit for bit the separate calls."""
    if not fusable_pair(g, q_ga, q_gb) or q_a.family != "mx" or q_b.family != "mx":
        raise ValueError(
            f"quant_dequant_mx_pair_two: {q_ga.desc!r}/{q_gb.desc!r} on a {tuple(g.shape)} {g.dtype} tensor are not a "
            f"fusable pair, or {q_a.desc!r}, {q_b.desc!r} are not both MX"
        )
    if len({t.dtype for t in (g, x_a, x_b)}) > 1 or len({t.device for t in (g, x_a, x_b)}) > 1:
        raise ValueError("quant_dequant_mx_pair_two: the tensors must share dtype and device, got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in (g, x_a, x_b)))
    if _pair_axes(g, q_ga, q_gb)[0] != g.dim() - 1:  # q_ga runs down the columns: swap, swap back
        gb, ga, y_a, y_b = quant_dequant_mx_pair_two(g, q_gb, q_ga, x_a, q_a, x_b, q_b)
        return ga, gb, y_a, y_b
    g = check_input(g, q_ga.q_dim, "quant_dequant_mx_pair_two")
    x_a = check_input(x_a, q_a.q_dim, "quant_dequant_mx_pair_two")
    x_b = check_input(x_b, q_b.q_dim, "quant_dequant_mx_pair_two")
    if min(g.numel(), x_a.numel(), x_b.numel()) == 0:
        return (*quant_dequant_mx_pair(g, q_ga, q_gb), *quant_dequant_mx_two(x_a, q_a, x_b, q_b))
    ga, gb, y_a, y_b = torch.empty_like(g), torch.empty_like(g), torch.empty_like(x_a), torch.empty_like(x_b)

    def prepare():
        grid_p, args_p, consts_p, warps_p = _pair_segment(g, ga, gb, q_ga, q_gb)
        grid_a, args_a, fmt_a, warps_a = _single_segment(x_a, y_a, q_a)
        grid_b, args_b, fmt_b, warps_b = _single_segment(x_b, y_b, q_b)
        pair = {("G" + k if k[:2] in ("A_", "B_") else k): v for k, v in consts_p.items()}  # A_ -> GA_, B_ -> GB_
        kwargs = dict(pair, **_prefixed("A_", fmt_a), **_prefixed("B_", fmt_b), **_shared(g, x_a, x_b),
                      num_warps=max(warps_p, warps_a, warps_b), enable_fp_fusion=False)
        return (grid_p + grid_a + grid_b,), (*args_p, *args_a, *args_b, grid_p, grid_a), kwargs

    launch(_mx_pair_two_kernel, (q_ga, q_gb, q_a, q_b, g.shape, x_a.shape, x_b.shape, g.dtype),
           (g, ga, gb, x_a, y_a, x_b, y_b), prepare)
    return ga, gb, y_a, y_b
