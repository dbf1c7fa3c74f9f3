"""Fused 4-bit-weight linear: ``Y = X · dequant(W)ᵀ (+ b)`` with W stored as packed E2M1 codes + block scales.

Used by ``fakequant.nn.QuantLinear``'s ``triton`` backend. Each program loads a tile of activations and the
packed weight tile (two codes per byte, one scale byte per block of 32 or 16), decodes the weight to bf16 in
registers and feeds the tensor cores (``tl.dot``, bf16 operands, float32 accumulation); the dequantized
weight never touches global memory, so a decode-sized batch moves ~4.25 bits per weight instead of 16.

Weight encodings (``fakequant.packing``): codes ``[N, ceil(K/2)]`` uint8, element 2k in the low nibble;
scales ``[N, ceil(K/BLK)]`` uint8, E8M0 (MX, BLK = 32 or any even size dividing BLOCK_K) or E4M3 (NVFP4,
BLK = 16, with an optional per-tensor encode scale g: w = q·S/g).

At batch <= 16 with MX weights on Hopper the tuner also weighs the Gluon kernel of ``quant_linear_gluon``
(``TileConfig(gluon=True)``), which decodes straight into the MMA's register fragments and is usually faster;
at larger batches the Gluon kernel of ``quant_linear_wgmma`` (``TileConfig(wgmma=True)``), whose asynchronous
Hopper MMAs run while the next weight tile decodes.
Candidates are timed with the L2 cache emptied by a read (``_time_cold``) and launched through the prepared-
launch cache (``_launch``), so an eager decode step pays little host time per call.

Order (as the Triton tutorials): jit helpers and the kernel with its arguments commented, the tile
configurations, the launcher that checks its inputs and picks a configuration.

Public: ``quant_linear`` (the launcher), ``dequantize``, ``TileConfig``, ``CONFIGS_SMALL_M`` / ``_MEDIUM_M`` /
``_LARGE_M``, ``ALL_CONFIGS`` (the fused ones), ``tuned_config``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import quant_linear_gluon, quant_linear_wgmma
from ._launch import launch

__all__ = ["quant_linear", "dequantize", "TileConfig", "CONFIGS_SMALL_M", "CONFIGS_MEDIUM_M", "CONFIGS_LARGE_M",
           "ALL_CONFIGS", "tuned_config"]


# ----------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _e2m1_to_f32(code):
    """Float32 value of 4-bit E2M1 codes (int32, 0..15). The code's low 3 bits shifted into an fp16's exponent
    and mantissa fields give 2^(e-15)·(1 + m/2) (e ≥ 1) or m·2^-15 (e = 0, an fp16 subnormal, exact); times
    2^14 that is the E2M1 value. The sign bit moves to bit 15."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _e8m0_to_f32(b):
    """2^(b - 127) for E8M0 bytes (int32): the byte is the float32 exponent field; byte 0 is the subnormal
    2^-127 and byte 255 NaN (OCP)."""
    bits = tl.where(b == 0, 0x00400000, b << 23)
    bits = tl.where(b == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_to_f32(b):
    """OCP E4M3FN bytes (int32) as float32: exponent bias 7 re-biased to 127, subnormals m·2^-9, 0x7F NaN."""
    e = (b >> 3) & 0xF
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    value = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    value = tl.where((b & 0x7F) == 0x7F, float("nan"), value)
    return tl.where((b & 0x80) != 0, -value, value)


# Inline-PTX decode of four code bytes (one 32-bit register, pack=4) into eight bf16 values, for sm_90.
# PRMT spreads bytes (c0, c1) to bits 0..7 and 16..23 of t; then per bf16 half the code's magnitude bits
# move to bf16's exponent/mantissa bits 6..8 and its sign to bit 15, which reads as the E2M1 value times
# 2^-126 (0.5 becomes the bf16 subnormal 2^-127); one bf16x2 multiply by 2^126 makes it exact (Hopper's
# bf16 arithmetic keeps subnormals). Inputs are copied to temporaries first: "=r" outputs may share
# registers with inputs.
_HALVES = """
    shl.b32 a, {t}, {sm};
    shl.b32 b, {t}, {ss};
    and.b32 b, b, 0x80008000;
    and.b32 a, a, 0x01C001C0;
    or.b32 {d}, a, b;
    mul.rn.bf16x2 {d}, {d}, bias;
"""
_DECODE_ASM = tl.constexpr(
    "{\n.reg .b32 w, t01, t23, a, b, d0, d1, d2, d3, bias;\nmov.b32 w, $4;\n"
    "mov.b32 bias, 0x7E807E80;\n"  # bf16x2 (2^126, 2^126)
    "prmt.b32 t01, w, 0, 0x4140;\n"  # bytes (c0, 0, c1, 0)
    "prmt.b32 t23, w, 0, 0x4342;\n"  # bytes (c2, 0, c3, 0)
    + _HALVES.format(d="d0", t="t01", sm=6, ss=12)  # low nibbles of c0, c1
    + _HALVES.format(d="d1", t="t23", sm=6, ss=12)  # low nibbles of c2, c3
    + _HALVES.format(d="d2", t="t01", sm=2, ss=8)  # high nibbles of c0, c1
    + _HALVES.format(d="d3", t="t23", sm=2, ss=8)  # high nibbles of c2, c3
    + "mov.b32 $0, d0;\nmov.b32 $1, d1;\nmov.b32 $2, d2;\nmov.b32 $3, d3;\n}"
)


@triton.jit
def _e2m1x2_to_bf16_asm(c):
    """(low-nibble values, high-nibble values) in bf16 of the uint8 code bytes ``c``: outputs $0/$1 (low
    nibbles of bytes 0-1, 2-3) and $2/$3 (high nibbles), element 2i in the low half of each register."""
    return tl.inline_asm_elementwise(
        _DECODE_ASM, "=r,=r,=r,=r,r", [c], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
    )


@triton.jit
def _e8m0_to_bf16(b):
    """2^(b - 127) as bf16 (exact: the byte is bf16's exponent field; 0 is the subnormal 2^-127, 255 NaN)."""
    bits = tl.where(b == 0, 0x0040, b << 7)
    bits = tl.where(b == 255, 0x7FC0, bits)
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode_tile(codes_ptr, scales_ptr, offs_n, mask_n, k0, KC, KS, stride_cn, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLK: tl.constexpr, E4M3: tl.constexpr,
                 DECODE_ASM: tl.constexpr):
    """The weight tile ``[BLOCK_N, BLOCK_K]`` at rows ``offs_n``, columns ``k0 ..``, decoded to bf16 (q·S; the
    nvfp4 1/g is left to the caller). Codes and scales beyond the row's length read as 0."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    NB_K: tl.constexpr = BLOCK_K // BLK
    offs_c = k0 // 2 + tl.arange(0, HALF_K)
    c = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_c[None, :],
                mask=mask_n[:, None] & (offs_c[None, :] < KC), other=0)
    offs_s = k0 // BLK + tl.arange(0, NB_K)
    sb = tl.load(scales_ptr + offs_n[:, None] * stride_sn + offs_s[None, :],
                 mask=mask_n[:, None] & (offs_s[None, :] < KS), other=0).to(tl.int32)
    if DECODE_ASM:
        if E4M3:
            scale = _e4m3_to_f32(sb).to(tl.bfloat16)  # E4M3 values are exact in bf16
        else:
            # The byte is bf16's exponent field: 2^(b-127), one shift. Byte 255 reads as +inf (the block's
            # outputs are inf/NaN, as the reference's NaN block) and byte 0 as 0 instead of 2^-127 (a
            # block below 2^-126 contributes 0): the only departures from the reference's weight values.
            scale = (sb << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
        lo, hi = _e2m1x2_to_bf16_asm(c)
        # join puts (low, high) last, so the reshape interleaves them: element 2k, 2k+1 of each byte.
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, NB_K, BLK)) * scale[:, :, None]  # exact: powers of 2
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    else:
        c = c.to(tl.int32)
        code = tl.reshape(tl.join(c & 0xF, c >> 4), (BLOCK_N, BLOCK_K))
        if E4M3:
            scale = _e4m3_to_f32(sb)
        else:
            scale = _e8m0_to_f32(sb)
        w = tl.reshape(_e2m1_to_f32(code), (BLOCK_N, NB_K, BLK)) * scale[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(tl.bfloat16)
    return w


@triton.jit
def _fence_gpu(INTERPRET: tl.constexpr):
    """``membar.gl`` in every thread: its earlier global writes and atomics are performed at GPU scope
    before its later ones (the interpreter runs programs one after another and needs none)."""
    if not INTERPRET:
        tl.inline_asm_elementwise("membar.gl;\nmov.u32 $0, $1;", "=r,r", [tl.full([1], 0, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _finish(acc, y_ptr, bias_ptr, g, offs_m, offs_n, mask_n, mask, stride_ym, HAS_BIAS: tl.constexpr,
            DIV_G: tl.constexpr):
    """Y tile = acc (/ g) (+ bias), cast to the output dtype."""
    if DIV_G:
        acc = acc / g  # nvfp4: w = q·S/g, the 1/g factored out of the sum
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every batch size (M = 1 included)
def _quant_linear_kernel(
    x_ptr,  # [M, K] activations (bf16 / fp16 / fp32), row-major, contiguous
    codes_ptr,  # [N, KC] uint8, KC = ceil(K / 2): two E2M1 codes per byte, element 2k in the low nibble
    scales_ptr,  # [N, KS] uint8, KS = ceil(K / BLK): one E8M0 or E4M3 byte per block of BLK along K
    gscale_ptr,  # [1] float32 per-tensor encode scale g (w = q·S/g); read only when DIV_G
    bias_ptr,  # [N] bias in the output dtype; read only when HAS_BIAS
    y_ptr,  # [M, N] output, x's dtype
    ws_ptr,  # [M, N] float32 split-K workspace, zero between launches (SPLIT_K > 1)
    cnt_ptr,  # [tiles] int32 split-K arrival counters, zero between launches (SPLIT_K > 1)
    M, N, K, KC, KS,
    stride_xm, stride_cn, stride_sn, stride_ym,
    BLK: tl.constexpr,  # scale block length along K (32 MX, 16 NVFP4); divides BLOCK_K
    E4M3: tl.constexpr,  # scale bytes are E4M3 (NVFP4) instead of E8M0 (MX)
    DIV_G: tl.constexpr,  # divide the product by the per-tensor scale g (nvfp4)
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs per output tile, each over a slice of K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DECODE_ASM: tl.constexpr,  # decode with the inline-PTX bf16x2 path (sm_90) instead of plain Triton ops
    SWAP_AB: tl.constexpr,  # compute Yᵀ = W·Xᵀ (weight as the register A operand of the MMA)
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1
):
    # Program ids: tiles of Y in grouped order (GROUP_M rows of tiles share weight tiles in L2), and the
    # K slice of a split-K program.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Only builtins here, no jit'd library helpers (tl.cdiv, tl.zeros): those fail under the interpreter when
    # triton.language was imported before TRITON_INTERPRET was set (torch._dynamo imports it).
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % group_m)
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_per_split = (((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    g = 1.0
    if DIV_G:
        g = tl.load(gscale_ptr)

    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _decode_tile(codes_ptr, scales_ptr, offs_n, mask_n, k0, KC, KS, stride_cn, stride_sn,
                         BLOCK_N, BLOCK_K, BLK, E4M3, DECODE_ASM)
        if INTERPRET:
            # The CPU interpreter's bf16 dot is wrong (triton 3.x); round the operands to bf16 and let the
            # float32 dot (numpy, exact products) stand in for the tensor cores.
            if SWAP_AB:
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.bfloat16).to(tl.float32)), acc)
            else:
                acc = tl.dot(x.to(tl.bfloat16).to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        elif SWAP_AB:
            # Yᵀ tile = W · Xᵀ: the decoded weight is the MMA's A operand straight from registers, Xᵀ comes
            # from shared memory; no shared-memory round trip for W.
            acc = tl.dot(w, tl.trans(x.to(tl.bfloat16)), acc)
        else:
            acc = tl.dot(x.to(tl.bfloat16), tl.trans(w), acc)

    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        _finish(acc, y_ptr, bias_ptr, g, offs_m, offs_n, mask_n, mask, stride_ym, HAS_BIAS, DIV_G)
    else:
        # Split-K without extra launches: every slice adds its partial sums into the float32 workspace, then
        # counts itself in; the last slice to arrive takes the totals, writes Y, and leaves the workspace tile
        # and the counter at zero for the next launch. Every thread fences its adds at GPU scope before the
        # barrier that precedes the one counter increment of its program, and fences again after the
        # counter's acquire. The totals are taken with one atomic exchange per element (read and zero): a
        # load then a zeroing store would be done by different threads (the two ops get different register
        # layouts) and raced on an H100, losing a slice's sums in about one launch in ten.
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        _fence_gpu(INTERPRET)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            _fence_gpu(INTERPRET)
            if INTERPRET:  # programs run one at a time there (and it has no float atomic exchange)
                total = tl.load(ws_ptrs, mask=mask, other=0.0)
                tl.store(ws_ptrs, tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), mask=mask)
            else:
                total = tl.atomic_xchg(ws_ptrs, tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), mask=mask,
                                       sem="relaxed")
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")
            _finish(total, y_ptr, bias_ptr, g, offs_m, offs_n, mask_n, mask, stride_ym, HAS_BIAS, DIV_G)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, gscale_ptr,  # as in _quant_linear_kernel
    w_ptr,  # [N, K] output weight (bf16 / fp16 / fp32)
    N, K, KC, KS, stride_cn, stride_sn, stride_wn,
    BLK: tl.constexpr, E4M3: tl.constexpr, DIV_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DECODE_ASM: tl.constexpr,
):
    """The packed weight decoded to ``w_ptr``'s dtype, one [BLOCK_N, BLOCK_K] tile per program: the first half
    of the dequantize-then-GEMM path that large batches may take."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w = _decode_tile(codes_ptr, scales_ptr, offs_n, mask_n, k0, KC, KS, stride_cn, stride_sn,
                     BLOCK_N, BLOCK_K, BLK, E4M3, DECODE_ASM)
    if DIV_G:
        w = w.to(tl.float32) / tl.load(gscale_ptr)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------------------- configs
class TileConfig(NamedTuple):
    """One way to run the product. ``split_k``: programs per output tile, each over a slice of K (reduced in
    the kernel). ``decode_asm``: the inline-PTX bf16x2 decode (about 6 SASS instructions per weight element
    in the loop instead of 11-13, from sm_90 builds). ``swap_ab``: Yᵀ = W·Xᵀ with the decoded weight as the
    wgmma's register operand, which lets Triton keep one wgmma group in flight while the next tile decodes
    (W as the shared-memory operand forces a wait after every MMA). ``dequant_gemm``: not fused: decode the
    whole weight to x's dtype (``block_n`` x ``block_k`` tiles), then ``F.linear`` (cuBLAS); a candidate for
    large batches, where the one-off decode is small next to the matrix product. ``gluon``: batch <= ``block_m``
    (8 or 16), MX weights, K a multiple of 8: the Gluon kernel of ``quant_linear_gluon`` (explicit layouts, the
    decoded weight already in the MMA's registers); ``k_warps`` of the ``num_warps`` warps split K inside a
    program, ``block_n`` = 16 x (``num_warps`` / ``k_warps``) x row groups per warp, ``block_k`` = 128 x
    ``k_warps`` x pieces per warp: the weights of a row one program step reads.
    ``wgmma``: MX weights, K a multiple of 8: the Gluon kernel of ``quant_linear_wgmma`` (asynchronous Hopper
    ``wgmma``, the decode of the next tile under the current MMA); ``block_m`` activation rows (<= 256),
    ``block_n`` weight rows (a multiple of 16 x ``num_warps``), ``block_k`` 64, ``num_stages`` X tiles in shared
    memory (>= 3)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    decode_asm: bool = False
    swap_ab: bool = False
    dequant_gemm: bool = False
    gluon: bool = False
    wgmma: bool = False
    k_warps: int = 1


T = TileConfig
# Candidates per batch-size bucket; the first of each list uses the plain-Triton decode and is the tuner's
# correctness reference for the others.
# Decode-sized batches (M <= 16) are bound by reading and decoding the weight: enough programs (N tiles times
# K slices) to give every scheduler several warps, so that the decode's latency is hidden.
CONFIGS_SMALL_M = [
    T(16, 32, 256, 1, 4, 4),
    T(16, 32, 512, 1, 4, 3, decode_asm=True),
    T(16, 64, 512, 1, 4, 3, decode_asm=True),
    T(16, 16, 512, 1, 4, 3, decode_asm=True),
    T(16, 32, 512, 2, 4, 3, decode_asm=True),
    T(16, 32, 256, 4, 4, 4, decode_asm=True),
    T(16, 64, 512, 2, 4, 3, decode_asm=True),
    T(16, 64, 256, 4, 4, 4, decode_asm=True),
    T(16, 64, 256, 8, 4, 4, decode_asm=True),
    T(16, 128, 256, 4, 4, 3, decode_asm=True),
    T(16, 64, 256, 2, 4, 4, decode_asm=True, swap_ab=True),
    T(16, 64, 512, 4, 4, 3, decode_asm=True),
    T(16, 64, 512, 2, 8, 3, decode_asm=True),
    T(16, 128, 512, 2, 8, 3, decode_asm=True),
    T(16, 128, 256, 2, 8, 4, decode_asm=True),
    # Gluon (MX weights), the best of sweeps on an H100 at batch 1-16 (docs/benchmarks.md). Warps split K
    # (k_warps 8: a program walks all of K in few steps, no global split-K): block_m 8 for batches up to 8,
    # 16 above; then the earlier warps-along-rows shapes with split-K, for weights with few rows.
    T(8, 16, 2048, 1, 8, 1, gluon=True, k_warps=8),
    T(8, 32, 1024, 1, 16, 1, gluon=True, k_warps=8),
    T(8, 16, 4096, 1, 8, 1, gluon=True, k_warps=8),
    T(16, 32, 4096, 1, 8, 1, gluon=True, k_warps=8),
    T(16, 32, 2048, 1, 8, 1, gluon=True, k_warps=8),
    T(16, 32, 1024, 1, 8, 1, gluon=True, k_warps=8),
    T(16, 32, 1024, 2, 4, 1, gluon=True, k_warps=4),
    T(16, 64, 128, 16, 4, 1, gluon=True),
    T(16, 64, 128, 8, 4, 1, gluon=True),
    T(16, 128, 128, 8, 4, 1, gluon=True),
]
_DEQUANT_GEMM = T(64, 64, 256, 1, 4, 1, decode_asm=True, dequant_gemm=True)
CONFIGS_MEDIUM_M = [
    T(64, 64, 128, 1, 4, 4),
    T(64, 128, 64, 1, 8, 5, wgmma=True),
    T(128, 128, 64, 1, 8, 3, wgmma=True),
    T(256, 128, 64, 1, 8, 5, wgmma=True),
    T(64, 64, 128, 2, 4, 4, decode_asm=True),
    T(64, 128, 128, 1, 4, 4, decode_asm=True),
    T(64, 128, 128, 1, 4, 4, decode_asm=True, swap_ab=True),
    T(128, 128, 64, 1, 8, 4, decode_asm=True, swap_ab=True),
    _DEQUANT_GEMM,
]
# Large batches are bound by the tensor cores: big tiles, the decode amortised over BLOCK_M rows.
CONFIGS_LARGE_M = [
    T(128, 256, 64, 1, 8, 3),
    T(128, 256, 64, 1, 8, 3, decode_asm=True),
    T(256, 128, 64, 1, 8, 3, decode_asm=True, swap_ab=True),
    T(256, 128, 64, 1, 8, 4, decode_asm=True, swap_ab=True),
    T(128, 256, 64, 1, 8, 3, decode_asm=True, swap_ab=True),
    T(128, 128, 64, 1, 8, 4, decode_asm=True, swap_ab=True),
    # Gluon wgmma (MX weights): block_m activation rows = the MMA's N, block_n weight rows, num_stages X tiles.
    # On an H100 (docs/benchmarks.md) 256x128 with five X tiles was fastest: one program per SM, X copies
    # three tiles ahead; two programs per SM (three X tiles) and six X tiles (two weight buffers) were slower.
    T(256, 128, 64, 1, 8, 5, wgmma=True),
    T(256, 128, 64, 1, 8, 4, wgmma=True),
    T(128, 128, 64, 1, 8, 3, wgmma=True),
    _DEQUANT_GEMM,
]
ALL_CONFIGS = CONFIGS_SMALL_M + CONFIGS_MEDIUM_M[:-1] + CONFIGS_LARGE_M
# Under TRITON_INTERPRET=1 (CPU tests) one small configuration, no tuning.
_INTERPRET_CONFIG = TileConfig(16, 16, 64, 1, 4, 1, 2)

_TUNED: dict[tuple, TileConfig] = {}
_TIMINGS: dict[tuple, list] = {}  # key -> [(config, median ms)] measured by the tuner
_REFUSED: dict[tuple, list] = {}  # key -> [(config, why)] refused by the tuner (wrong output or no compile)
# Split-K scratch, zero between launches (the kernel leaves it so): float32 sums per (device, M, N) and
# arrival counters per (device, tiles). Launches that share them must be ordered (one stream).
_WORKSPACE: dict[tuple, torch.Tensor] = {}
_FLUSH: dict[int, torch.Tensor] = {}  # per device: the buffer _time_cold reads to empty the L2 cache
_SLEEP_CYCLES = 200_000  # about 100 us of GPU clock: longer than the host needs to queue one call


def _scratch(key: tuple, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = _WORKSPACE.get(key)
    if t is None:
        t = _WORKSPACE[key] = torch.zeros(shape, dtype=dtype, device=device)
    return t


def _m_bucket(m: int) -> int:
    """The batch sizes that share a tuned configuration: the largest of ``m``'s bucket (a configuration chosen
    for a bucket must serve all of it; the Gluon ones serve up to their ``block_m`` rows)."""
    for top in (1, 4, 8, 16, 64, 256):
        if m <= top:
            return top
    return 4096


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dequantize(codes: torch.Tensor, scales: torch.Tensor, *, k: int, block: int, e4m3: bool = False,
               tensor_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
               config: TileConfig = _DEQUANT_GEMM) -> torch.Tensor:
    """The packed weight ``[N, k]`` decoded to ``dtype`` on the GPU (weight = q·S, or q·S/g for nvfp4)."""
    n = codes.shape[0]
    w = torch.empty((n, k), device=codes.device, dtype=dtype)
    gscale = None if tensor_scale is None else tensor_scale.reshape(1).to(torch.float32).contiguous()
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(k, config.block_k))
    _dequantize_kernel[grid](
        codes, scales, gscale if gscale is not None else codes, w, n, k, codes.shape[1], scales.shape[1],
        codes.stride(0), scales.stride(0), w.stride(0),
        BLK=block, E4M3=e4m3, DIV_G=gscale is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DECODE_ASM=config.decode_asm and not _interpreting(), num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return w


@functools.lru_cache(maxsize=None)
def _small_m_shape(cfg: TileConfig) -> quant_linear_gluon.SmallMShape:
    """The Gluon program shape of ``cfg``, validated once per configuration (a decode step launches each layer's
    configuration again and again; the check costs about a microsecond of host time)."""
    return quant_linear_gluon.SmallMShape.from_tile(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.k_warps)


def _launch(cfg: TileConfig, x, codes, scales, gscale, bias, K, blk, e4m3, out_dtype, big_scales=True) -> torch.Tensor:
    M, N = x.shape[0], codes.shape[0]
    if cfg.gluon:
        y = torch.empty((M, N), device=x.device, dtype=out_dtype)
        ws = _scratch(("ws", x.device, M, N), (M, N), torch.float32, x.device)
        programs = triton.cdiv(N, cfg.block_n)
        cnt = _scratch(("cnt", x.device, programs), (programs,), torch.int32, x.device)
        return quant_linear_gluon.quant_linear_small_m(x, codes, scales, bias, y, ws, cnt, shape=_small_m_shape(cfg),
                                                       split_k=cfg.split_k, big_scales=big_scales)
    if cfg.wgmma:
        y = torch.empty((M, N), device=x.device, dtype=out_dtype)
        # The kernel copies X into shared memory as is: other dtypes are rounded to bf16 first, as the other
        # kernels round them in registers.
        return quant_linear_wgmma.quant_linear_large_m(
            x.to(torch.bfloat16), codes, scales, bias, y, num_warps=cfg.num_warps, rows=cfg.block_n,
            block_m=cfg.block_m, x_stages=cfg.num_stages, group_m=cfg.group_m, big_scales=big_scales)
    if cfg.dequant_gemm:
        w = dequantize(codes, scales, k=K, block=blk, e4m3=e4m3, tensor_scale=gscale, dtype=x.dtype, config=cfg)
        return torch.nn.functional.linear(x, w, bias).to(out_dtype)
    y = torch.empty((M, N), device=x.device, dtype=out_dtype)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if cfg.split_k > 1:
        ws = _scratch(("ws", x.device, M, N), (M, N), torch.float32, x.device)
        cnt = _scratch(("cnt", x.device, tiles), (tiles,), torch.int32, x.device)
    else:
        ws = cnt = y  # unused
    dummy = codes  # any pointer for the unused arguments
    tensors = (x, codes, scales, gscale if gscale is not None else dummy, bias if bias is not None else dummy, y, ws,
               cnt)
    strides = (x.stride(0), codes.stride(0), scales.stride(0), y.stride(0))
    key = ("fused", cfg, M, N, K, codes.shape[1], scales.shape[1], strides, blk, e4m3, gscale is not None,
           bias is not None, x.dtype, out_dtype)

    def prepare():
        return (tiles, cfg.split_k), tensors + (M, N, K, codes.shape[1], scales.shape[1]) + strides, dict(
            BLK=blk, E4M3=e4m3, DIV_G=gscale is not None, HAS_BIAS=bias is not None,
            SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            DECODE_ASM=cfg.decode_asm and not _interpreting(), SWAP_AB=cfg.swap_ab, INTERPRET=_interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    launch(_quant_linear_kernel, key, tensors, prepare)  # the prepared-launch cache: a decode step's host time
    return y


def _hopper_mx_fits(k: int, blk: int, e4m3: bool, device: torch.device) -> bool:
    """Both Gluon kernels can run this call: E8M0 scales per 32, K a multiple of 8 (code rows read as 32-bit
    words), a Hopper (or newer) GPU."""
    return (k % 8 == 0 and blk == 32 and not e4m3 and device.type == "cuda" and not _interpreting()
            and quant_linear_gluon.available(device))


def _candidates(m: int, k: int, blk: int, e4m3: bool, device: torch.device) -> list[TileConfig]:
    pool = CONFIGS_SMALL_M if m <= 16 else CONFIGS_MEDIUM_M if m <= 256 else CONFIGS_LARGE_M
    gluon_ok = _hopper_mx_fits(k, blk, e4m3, device)
    bucket = _m_bucket(m)  # the tuned choice must serve every batch of the bucket (a Gluon one: up to block_m)
    return [c for c in pool if c.block_k % blk == 0 and c.block_k <= max(64, triton.next_power_of_2(k))
            and (gluon_ok or not (c.gluon or c.wgmma)) and (not c.gluon or c.block_m >= bucket)]


def tuned_config(key: tuple) -> TileConfig | None:
    """The configuration chosen for a ``(m_bucket, N, K, blk, e4m3, dtype)`` key, if one was tuned."""
    return _TUNED.get(key)


def quant_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    *,
    block: int,
    e4m3: bool = False,
    tensor_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
    max_scale_byte: int | None = None,
) -> torch.Tensor:
    """``x · dequant(codes, scales)ᵀ (+ bias)`` for ``x`` ``[M, K]``, codes ``[N, ceil(K/2)]`` uint8, scales
    ``[N, ceil(K/block)]`` uint8 (E8M0, or E4M3 with ``e4m3=True``), optional nvfp4 ``tensor_scale`` g
    (weight = q·S/g). Returns ``[M, N]`` in x's dtype; products in bf16, sums in float32.

    The first call for a shape bucket times the candidate tile configurations and keeps the fastest
    (``config`` forces one); under ``TRITON_INTERPRET=1`` a single small configuration is used.
    ``max_scale_byte``: the largest E8M0 scale byte, if the caller knows it (``QuantLinear`` caches it): at
    most 128 lets the Gluon kernel fold its decode's rebias into the scale (one multiply per weight pair
    instead of two); unknown (None) is always exact.
    """
    if x.dim() != 2:
        raise ValueError(f"quant_linear kernel: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"quant_linear kernel: x must be bfloat16, float16 or float32, got {x.dtype}")
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"quant_linear kernel: codes and scales must be uint8, got {codes.dtype}, {scales.dtype}")
    M, K = x.shape
    N = codes.shape[0]
    if codes.shape != (N, (K + 1) // 2) or scales.shape != (N, -(-K // block)):
        raise ValueError(
            f"quant_linear kernel: for x {tuple(x.shape)} and block {block} expected codes ({N}, {(K + 1) // 2}) "
            f"and scales ({N}, {-(-K // block)}), got {tuple(codes.shape)} and {tuple(scales.shape)}"
        )
    if block % 2 or 64 % block:
        raise ValueError(f"quant_linear kernel: scale block {block} must be an even divisor of 64")
    devices = {t.device for t in (x, codes, scales, tensor_scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"quant_linear kernel: all tensors must be on one device, got {sorted(map(str, devices))}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"quant_linear kernel: bias must be ({N},) of dtype {x.dtype}")
    x = x.contiguous()
    codes, scales = codes.contiguous(), scales.contiguous()
    gscale = None if tensor_scale is None else tensor_scale.reshape(1).to(torch.float32).contiguous()
    if M == 0:
        return torch.empty((0, N), device=x.device, dtype=x.dtype)
    # A tuned configuration serves its whole bucket by construction (``_candidates``); a forced one is checked.
    if config is None:
        if _interpreting() or x.device.type != "cuda":
            config = _INTERPRET_CONFIG
        else:
            key = (_m_bucket(M), N, K, block, e4m3, x.dtype, bias is not None)
            config = _TUNED.get(key)
            if config is None:
                config = _tune(key, x, codes, scales, gscale, bias, K, block, e4m3)
    elif config.gluon and not (M <= config.block_m and _hopper_mx_fits(K, block, e4m3, x.device)):
        raise ValueError(f"quant_linear kernel: the Gluon configuration needs a Hopper (sm_90+) GPU, at most "
                         f"block_m={config.block_m} rows, K a multiple of 8 and MX scales per 32, got M={M}, K={K}, "
                         f"block {block}, e4m3={e4m3} on {x.device}")
    elif config.wgmma and not _hopper_mx_fits(K, block, e4m3, x.device):
        raise ValueError(f"quant_linear kernel: the wgmma configuration needs a Hopper (sm_90+) GPU, MX scales per "
                         f"32 and K a multiple of 8, got K={K}, block {block}, e4m3={e4m3} on {x.device}")
    big = max_scale_byte is None or max_scale_byte > 128
    return _launch(config, x, codes, scales, gscale, bias, K, block, e4m3, x.dtype, big)


def _time_cold(fn, reps: int = 15) -> float:
    """Median GPU time (ms) of ``fn`` with the L2 cache holding none of its data, as when a model's layers take
    turns: before each call a buffer twice the L2 size is *read* (``triton.testing.do_bench`` writes one, which
    leaves the L2 full of dirty lines whose write-back then competes with the timed kernel's reads, penalising
    the kernels that read fastest). A GPU sleep after the flush lets the host queue the timed call before its
    start event: otherwise the event interval also holds the call's host time, a few microseconds that hid
    the differences between 7.5 and 11.5 us kernels on an H100 (docs/benchmarks.md)."""
    dev = torch.cuda.current_device()
    flush = _FLUSH.get(dev)
    if flush is None:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
        flush = _FLUSH[dev] = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")
    fn()  # warm up (compile, first-launch preparation)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.max()
        torch.cuda._sleep(_SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _tune(key, x, codes, scales, gscale, bias, K, block, e4m3) -> TileConfig:
    """Time each candidate (``_time_cold``) and keep the fastest for ``key``.

    Every candidate's output is first compared with the plain-Triton decode of the first candidate; one
    that disagrees beyond bf16 rounding (relative L2 1e-2) is refused, so a miscompiled path is never chosen.
    """
    candidates = _candidates(x.shape[0], K, block, e4m3, x.device)
    reference = _launch(candidates[0], x, codes, scales, gscale, bias, K, block, e4m3, torch.float32)
    ref_norm = float(reference.double().norm()) or 1.0
    best, best_ms, refused, timings = None, float("inf"), [], []
    for cfg in candidates:
        try:
            out = _launch(cfg, x, codes, scales, gscale, bias, K, block, e4m3, torch.float32)
            rel = float((out.double() - reference.double()).norm()) / ref_norm
            if not rel < 1e-2:  # NaN included
                refused.append((cfg, rel))
                continue
            ms = _time_cold(lambda: _launch(cfg, x, codes, scales, gscale, bias, K, block, e4m3, x.dtype))
        except Exception as err:  # noqa: BLE001 -- a configuration that does not compile or fit is skipped
            refused.append((cfg, repr(err)[:200]))
            continue
        timings.append((cfg, ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    _REFUSED[key] = refused
    _TIMINGS[key] = timings
    if best is None:
        raise RuntimeError(f"quant_linear kernel: no tile configuration ran for {key}: {refused}")
    _TUNED[key] = best
    return best
