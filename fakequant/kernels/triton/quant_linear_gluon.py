"""Decode-sized batches (M <= 16) of the fused 4-bit-weight linear, written in Gluon with explicit layouts.

The Triton-language kernel in ``quant_linear.py`` decodes the weight into a blocked layout and lets the compiler
move it into the tensor cores' operand layout (shared memory or register shuffles, and a re-pairing of the
decoded halves): about 6.5 SASS instructions per weight element, and at batch <= 16 the kernel is bound by
them. Here every layout is chosen so that nothing moves:

* each thread loads 16 contiguous code bytes of a row (one 16-byte load of four words) = 32 weights = exactly
  one scale block, so each thread needs one scale byte per row;
* each byte decodes to one bf16x2 register holding its two weights (low nibble first), multiplied by the block
  scale in the same inline-PTX call (four bytes per call, ``decode_words``);
* the logical K order of the MMA is a permutation of memory order chosen so that those registers already are
  the ``mma.sync`` A fragments (rows of W are the MMA's M, the batch its N: Yᵀ = W·Xᵀ); the activations are
  loaded in the same permuted order (each thread 64 contiguous bytes of a row of X), so the sum is unchanged.

Within a 128-weight piece of a row, lane ``t`` (0..3) of a row group holds bytes ``16t .. 16t+15``, i.e.
weights ``32t .. 32t+31``; weight ``32t + 2b + i`` (byte b, nibble i) sits at MMA k index ``8b + 2t + i``.

Why the warps split K: a program of ``KW`` x ``WR`` warps covers ``BN`` weight rows (``WR`` warps along the rows,
each ``RG`` groups of 16) and, per loop step, ``KW`` x ``U`` pieces of 128 weights of each row, K-warp ``w``
taking the ``U`` adjacent pieces ``wU .. wU + U - 1`` (adjacent rather than strided by ``KW``: 7.1 against
8.1 us at 4096x4096, batch 1, on an H100). The product is a rank-3 MMA (one [16·RG, 128·U] x [128·U, BM] product per
K-warp) whose K-warp axis is summed once at the end, through shared memory. So a program walks the whole of K
(or a large slice of it) with few steps, each step's loads all in flight at once; enough programs fill the GPU
without the global split-K reduction, whose fence, counter and exchange cost about 1 us of exposed time per
call (an H100 at 4096x4096, docs/benchmarks.md). ``SPLIT_K`` > 1 is still offered for weights with few rows.

Scales: E8M0 only (MX formats with 32-element blocks, the ``mxfp4`` family). The decoded byte is the E2M1
value times 2^-126 (see ``_decode_asm``); one bf16x2 multiply by 2^126·S = 2^(e-1) finishes it, exact while the
scale byte e <= 128 (blocks below about 16 in magnitude). ``BIG_SCALES`` adds a second multiply for larger
blocks and NaN scales. ``mul.rn.bf16x2`` needs sm_90 (Hopper). Codes are read as 32-bit words, so K must be a
multiple of 8 (rows of whole words).

``quant_linear.quant_linear`` offers these kernels to its tuner as ``TileConfig(gluon=True)`` candidates for
batches up to 16; they are verified against the plain-Triton decode before being timed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ._launch import launch

try:  # Gluon ships with triton >= 3.5; without it the Triton-language kernel is used alone.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # pragma: no cover - depends on the installed triton
    gluon = gl = mma_v2 = None

__all__ = ["available", "quant_linear_small_m", "PIECE_K", "SmallMShape"]

PIECE_K = 128  # weights per row in one warp's piece of a loop step: 4 lanes x 16 bytes x 2


def available(device: torch.device | None = None) -> bool:
    """Gluon is importable and ``device`` (default: the current CUDA device) is sm_90 or newer."""
    if gluon is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


# A word of four code bytes ($8) and bf16x2 factors ($9, and $10 with two) -> for each byte i the bf16 (low,
# high) nibble values ($2i, $2i+1) times the factors. A ``prmt`` takes byte i out (zero-extended) into b; then
# m = b·0x40040 = b<<6 | b<<18 puts the low nibble's magnitude at bits 6..8 and the high nibble's at 22..24
# (bf16 exponent/mantissa bits: the E2M1 value times 2^-126; code 1 is the bf16 subnormal 2^-127);
# s = b·0x1001000 = b<<12 | b<<24 puts the signs at bits 15 and 31. Hopper's bf16 arithmetic keeps subnormal
# inputs, so the multiplies are exact.
def _decode_asm(factors: int) -> str:
    lines = ["{", ".reg .b32 b, m, s, d;"]
    for i in range(4):
        lines += [f"prmt.b32 b, $8, 0, {0x4440 + i:#x};", "mul.lo.u32 m, b, 0x40040;", "mul.lo.u32 s, b, 0x1001000;",
                  "and.b32 m, m, 0x01C001C0;", "and.b32 s, s, 0x80008000;", "or.b32 d, m, s;",
                  "mul.rn.bf16x2 d, d, $9;"]
        if factors == 2:
            lines.append("mul.rn.bf16x2 d, d, $10;")
        lines.append(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, d;")
    return "\n".join(lines + ["}"])


class SmallMShape(NamedTuple):
    """How a ``_small_m_kernel`` program is cut: ``k_warps`` warps along K x ``row_warps`` warps along the rows,
    each of those covering ``row_groups`` groups of 16 weight rows; ``pieces`` 128-weight pieces per K-warp per
    loop step; ``block_m`` activation rows (the MMA's N: 8 serves batches up to 8 with half the MMAs and
    activation registers of 16)."""

    k_warps: int
    row_warps: int
    row_groups: int
    pieces: int
    block_m: int

    @classmethod
    def from_tile(cls, block_m: int, block_n: int, block_k: int, num_warps: int, k_warps: int) -> SmallMShape:
        """The shape of a ``TileConfig``: ``block_n`` rows and ``block_k`` weights of each row per program step."""
        row_warps = num_warps // max(k_warps, 1)
        shape = cls(k_warps, row_warps, block_n // (16 * max(row_warps, 1)), block_k // (PIECE_K * max(k_warps, 1)),
                    block_m)
        if (shape.rows != block_n or shape.block_k != block_k or shape.num_warps != num_warps
                or block_m not in (8, 16) or not all(_pow2(v) for v in shape[:4])):
            raise ValueError(f"quant_linear_small_m: no Gluon program shape for block_m={block_m}, "
                             f"block_n={block_n}, block_k={block_k}, num_warps={num_warps}, k_warps={k_warps}: "
                             f"block_m must be 8 or 16, num_warps = k_warps x row warps, block_n = 16 x row warps x "
                             f"row groups and block_k = 128 x k_warps x pieces, all powers of two")
        return shape

    @property
    def num_warps(self) -> int:
        return self.k_warps * self.row_warps

    @property
    def rows(self) -> int:
        return 16 * self.row_warps * self.row_groups

    @property
    def block_k(self) -> int:
        return PIECE_K * self.k_warps * self.pieces


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


if gluon is not None:
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # triton 3.6 / later names
    _DECODE_ONE = gl.constexpr(_decode_asm(1))
    _DECODE_TWO = gl.constexpr(_decode_asm(2))
    PIECE_K_ = gl.constexpr(PIECE_K)

    @gluon.jit
    def _decode_word(c, f1, f2, BIG_SCALES: gl.constexpr):
        """bf16 (low, high) nibble values of the four code bytes of each int32 word of ``c``: 8 tensors."""
        if BIG_SCALES:
            return gl.inline_asm_elementwise(_DECODE_TWO, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [c, f1, f2],
                                             dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
        return gl.inline_asm_elementwise(_DECODE_ONE, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [c, f1],
                                         dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _fence_gpu(NW: gl.constexpr):
        """``membar.gl`` in every thread (see ``quant_linear._fence_gpu``)."""
        gl.inline_asm_elementwise("membar.gl;\nmov.u32 $0, $1;", "=r,r",
                                  [gl.full([32 * NW], 0, gl.int32, gl.BlockedLayout([1], [32], [NW], [0]))],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def row_pointers(codes_ptr, scales_ptr, stride_c, stride_s, pid_n, N, BN: gl.constexpr, A: gl.constexpr,
                     B: gl.constexpr, C_LAYOUT: gl.constexpr):
        """Pointers of a program's ``BN`` weight rows for a code tile [BN, A, B] in ``C_LAYOUT`` whose part a (B
        code elements, of ``codes_ptr``'s type) is one scale block: (code row pointers [BN, 1, 1], element
        offsets a·B + b [1, A, B], scale row pointers [BN, 1], scale offsets a [1, A]). Rows past N read row N-1
        instead of being masked (valid memory; their outputs are never stored)."""
        l_n: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, C_LAYOUT))
        l_a: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, C_LAYOUT))
        l_b: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, C_LAYOUT))
        rows = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=l_n), N - 1)
        a3 = gl.expand_dims(gl.expand_dims(gl.arange(0, A, layout=l_a), 0), 2)
        b3 = gl.expand_dims(gl.expand_dims(gl.arange(0, B, layout=l_b), 0), 1)
        c_rows = codes_ptr + gl.expand_dims(gl.expand_dims(rows, 1), 2) * stride_c
        s_layout: gl.constexpr = gl.SliceLayout(2, C_LAYOUT)
        rows2 = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, s_layout)), N - 1)
        a2 = gl.expand_dims(gl.arange(0, A, layout=gl.SliceLayout(0, s_layout)), 0)
        return c_rows, a3 * B + b3, scales_ptr + gl.expand_dims(rows2, 1) * stride_s, a2

    @gluon.jit
    def _finish(acc, y_ptr, bias_ptr, offs_n, offs_m, mask, stride_ym, N, HAS_BIAS: gl.constexpr):
        """Y[m, n] = acc[n, m] (+ bias[n]) in y's dtype."""
        if HAS_BIAS:
            acc += gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
        gl.store(y_ptr + offs_m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def decode_words(c, e, BIG_SCALES: gl.constexpr):
        """bf16 weights [..., 8] in memory order of the int32 words ``c`` of four code bytes (little-endian: byte
        0 holds weights 0 and 1) times the scale bytes ``e`` (int32 E8M0, one per word of the last axis of ``c``,
        which ``e`` lacks). Four bytes per asm call: one ``prmt`` takes each byte out of the word, where loading
        bytes and widening them costs two instructions more per byte."""
        # 2^(e-1) as bf16x2 (the decode's 2^126 times the scale 2^(e-127)): exponent field e + 126, right for
        # e <= 128 (byte 0, 2^-127, gives 2^-1: exact too). Larger bytes need a second factor 2^(e-128), and
        # byte 255 (NaN) a NaN factor: BIG_SCALES.
        if BIG_SCALES:
            f1 = ((gl.minimum(e, 128) + 126) << 7) * 0x10001
            f2 = gl.where(e == 255, 0x7FC07FC0, ((gl.maximum(e, 128) - 1) << 7) * 0x10001)
        else:
            f1 = ((e + 126) << 7) * 0x10001
            f2 = f1
        zero = gl.zeros_like(c)
        last: gl.constexpr = len(c.shape) - 1
        f1 = gl.expand_dims(f1, last) + zero
        f2 = gl.expand_dims(f2, last) + zero
        l0, h0, l1, h1, l2, h2, l3, h3 = _decode_word(c, f1, f2, BIG_SCALES)
        # join(join(v0, v2), join(v1, v3))[..., i, j] = v_{2i+j}: byte order; then nibble order innermost.
        lo = gl.join(gl.join(l0, l2), gl.join(l1, l3))
        hi = gl.join(gl.join(h0, h2), gl.join(h1, h3))
        return gl.reshape(gl.join(lo, hi), c.shape + [8])

    @gluon.jit
    def _step_product(acc, c, e, xv, KW: gl.constexpr, U: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr,
                      BIG_SCALES: gl.constexpr, MMA: gl.constexpr):
        """``acc`` [KW, BN, BM] + each K-warp's decoded weight [BN, 128·U] · activations [128·U, BM], k in the
        permuted order."""
        # Code words [BN, A, 4] (A = KW·U·4 scale blocks, a = (w·U + u)·4 + t) -> weights [BN, A, 4, 8] in memory
        # order -> [BN, KW, U, 4 (t), 16 (byte), 2 (nibble)] -> (w, n, u, byte, t, nibble) -> [KW, BN, 128·U]:
        # MMA k = 128u + 8·byte + 2t + nibble, and the register layout already is mma.sync's A fragment
        # (asserted: no data moves).
        w = gl.reshape(decode_words(c, e, BIG_SCALES), (BN, KW, U, 4, 16, 2))
        w = gl.reshape(gl.permute(w, (1, 0, 2, 4, 3, 5)), (KW, BN, PIECE_K_ * U))
        w = gl.convert_layout(w, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2), assert_trivial=True)
        # Activations [A, 32, BM] (32 weights of block a) -> [KW, U, 4 (t), 16 (byte), 2 (nibble), BM] ->
        # (w, u, byte, t, nibble, m) -> [KW, 128·U, BM]: the same k order.
        xv = gl.reshape(xv.to(gl.bfloat16), (KW, U, 4, 16, 2, BM))
        xv = gl.reshape(gl.permute(xv, (0, 1, 3, 2, 4, 5)), (KW, PIECE_K_ * U, BM))
        xv = gl.convert_layout(xv, gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2), assert_trivial=True)
        return mma_v2(w, xv, acc)

    @gluon.jit
    def _small_m_kernel(
        x_ptr,  # [M, K] activations (bf16 / fp16 / fp32), row-major
        codes_ptr,  # [N, KC] uint8, two E2M1 codes per byte, element 2k in the low nibble; KC % 4 == 0
        scales_ptr,  # [N, KS] uint8 E8M0, one per 32 weights along K
        bias_ptr,  # [N] bias (y's dtype); read only when HAS_BIAS
        y_ptr,  # [M, N] output
        ws_ptr,  # [M, N] float32 split-K workspace, zero between launches
        cnt_ptr,  # [N programs] int32 split-K counters, zero between launches
        M, N, K, KC, KS, stride_xm, stride_cn, stride_sn, stride_ym,
        HAS_BIAS: gl.constexpr, BIG_SCALES: gl.constexpr, SPLIT_K: gl.constexpr,
        EVEN_K: gl.constexpr,  # K % (128·KW·U) == 0: no masks along K
        NW: gl.constexpr,  # warps per program: KW x row warps
        KW: gl.constexpr,  # warps along K
        U: gl.constexpr,  # 128-weight pieces per K-warp per loop step
        BN: gl.constexpr,  # weight rows per program: 16 x row warps x row groups per warp
        BM: gl.constexpr,  # activation rows per program (the MMA's N): 8 or 16
        C_LAYOUT: gl.constexpr,  # [BN, A, 4] code words: row, scale block of the step, word
        X_LAYOUT: gl.constexpr,  # [A, 32, BM] activations: scale block of the step, weight within it, batch row
        MMA: gl.constexpr,  # rank-3 mma.sync layout [KW, BN, BM]
    ):
        STEP_K: gl.constexpr = PIECE_K_ * KW * U
        A: gl.constexpr = STEP_K // 32
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        # Code words [BN, A, 4]: row n, block a, word j -> bytes 4j .. 4j+3 of codes[n, k0/2 + 16a ..]; scales
        # [BN, A]: row n, block a -> scales[n, k0/32 + a].
        c_rows, word_in_step, s_rows, a2 = row_pointers(codes_ptr.to(gl.pointer_type(gl.int32)), scales_ptr,
                                                        stride_cn // 4, stride_sn, pid_n, N, BN, A, 4, C_LAYOUT)
        # Activation pointers [A, 32, BM]: block a, e, batch row m -> x[m, k0 + 32a + e]; rows past M masked
        # (no memory traffic at batch 1).
        xl_a: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, X_LAYOUT))
        xl_e: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, X_LAYOUT))
        xl_m: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, X_LAYOUT))
        xa3 = gl.expand_dims(gl.expand_dims(gl.arange(0, A, layout=xl_a), 1), 2)
        xe3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=xl_e), 0), 2)
        xm3 = gl.expand_dims(gl.expand_dims(gl.arange(0, BM, layout=xl_m), 0), 1)
        x_cols = xa3 * 32 + xe3  # [A, 32, 1]
        x_rows = x_ptr + xm3 * stride_xm
        m_ok = xm3 < M

        n_steps = (K + STEP_K - 1) // STEP_K
        per_split = (n_steps + SPLIT_K - 1) // SPLIT_K
        step0 = pid_k * per_split
        step1 = gl.minimum(step0 + per_split, n_steps)
        acc = gl.zeros((KW, BN, BM), gl.float32, MMA)
        for step in range(step0, step1):
            k0 = step * STEP_K
            cw = k0 // 8 + word_in_step
            sb = k0 // 32 + a2
            xk = k0 + x_cols
            # The weight is read once: evict_first keeps it from pushing the activations, which every program
            # re-reads, out of the caches (2-4% at batch 8-16 on an H100).
            if EVEN_K:
                c = gl.load(c_rows + cw, eviction_policy="evict_first")
                e = gl.load(s_rows + sb, eviction_policy="evict_first")
                xv = gl.load(x_rows + xk, mask=m_ok, other=0.0)
            else:
                c = gl.load(c_rows + cw, mask=cw < KC // 4, other=0, eviction_policy="evict_first")
                e = gl.load(s_rows + sb, mask=sb < KS, other=0, eviction_policy="evict_first")
                xv = gl.load(x_rows + xk, mask=m_ok & (xk < K), other=0.0)
            acc = _step_product(acc, c, e.to(gl.int32), xv, KW, U, BN, BM, BIG_SCALES, MMA)

        # The K-warps' partial products summed (through shared memory); [BN, BM] is Yᵀ: (n, m) goes to y[m, n].
        # (gl.reduce with a Gluon combine: ``gl.sum``'s is a Triton-language jit function, which the offline
        # compile in the CPU tests cannot use under TRITON_INTERPRET=1.)
        total = gl.reduce(acc, 0, _add)
        OUT: gl.constexpr = gl.SliceLayout(0, MMA)
        offs_ny = gl.expand_dims(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT)), 1)
        offs_my = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, OUT)), 0)
        mask = (offs_ny < N) & (offs_my < M)
        if SPLIT_K == 1:
            _finish(total, y_ptr, bias_ptr, offs_ny, offs_my, mask, stride_ym, N, HAS_BIAS)
        else:
            # Split-K as in ``quant_linear._quant_linear_kernel``: partial sums added into the workspace, a GPU
            # fence in every thread and a barrier before the one counter increment; the last slice takes the
            # totals with an atomic exchange (leaving zeros), resets the counter and writes Y.
            ws_ptrs = ws_ptr + offs_my * N + offs_ny
            gl.atomic_add(ws_ptrs, total, mask=mask, sem="relaxed")
            _fence_gpu(NW)
            _cta_barrier()
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                _fence_gpu(NW)
                total = gl.atomic_xchg(ws_ptrs, gl.zeros((BN, BM), gl.float32, OUT), mask=mask, sem="relaxed")
                gl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
                _finish(total, y_ptr, bias_ptr, offs_ny, offs_my, mask, stride_ym, N, HAS_BIAS)


def _bases(scale: int, count: int, dim: int, rank: int = 3) -> list[list[int]]:
    """``count`` linear-layout bases doubling from ``scale`` along ``dim``."""
    return [[(scale << i) if d == dim else 0 for d in range(rank)] for i in range(count)]


def layouts(shape: SmallMShape):
    """(code-word layout [BN, A, 4], activation layout [A, 32, BM], rank-3 MMA layout) of a program shape."""
    kw, wr, rg, u = (v.bit_length() - 1 for v in shape[:4])  # log2 of each
    warp_blocks = 4 * shape.pieces  # scale blocks of one K-warp per step: block a = (w·U + u)·4 + t
    codes = gl.DistributedLinearLayout(
        reg_bases=_bases(1, 2, 2) + [[8, 0, 0]] + _bases(16 * shape.row_warps, rg, 0) + _bases(4, u, 1),
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=_bases(16, wr, 0) + _bases(warp_blocks, kw, 1), block_bases=[],
        shape=[shape.rows, shape.block_k // 32, 4])
    acts = gl.DistributedLinearLayout(
        reg_bases=_bases(1, 5, 1) + ([[0, 0, 8]] if shape.block_m == 16 else []) + _bases(4, u, 0),
        lane_bases=[[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[0, 0, 0]] * wr + _bases(warp_blocks, kw, 0), block_bases=[],
        shape=[shape.block_k // 32, 32, shape.block_m])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[shape.k_warps, shape.row_warps, 1],
                                    instr_shape=[1, 16, 8])
    return codes, acts, mma


def _constexprs(shape: SmallMShape, split_k: int, *, has_bias: bool, big_scales: bool, even_k: bool) -> dict:
    codes_layout, acts_layout, mma = layouts(shape)
    return dict(HAS_BIAS=has_bias, BIG_SCALES=big_scales, SPLIT_K=split_k, EVEN_K=even_k, NW=shape.num_warps,
                KW=shape.k_warps, U=shape.pieces, BN=shape.rows, BM=shape.block_m, C_LAYOUT=codes_layout,
                X_LAYOUT=acts_layout, MMA=mma)


def compile_signature(shape: SmallMShape, split_k: int) -> tuple[dict, dict]:
    """(signature, constexprs) of ``_small_m_kernel`` for an ahead-of-time ``triton.compile`` (bf16 activations
    and output, no bias, scale bytes <= 128, K a multiple of the step): what ``scripts/sass_loop_mix.py`` and the
    instruction-budget test compile."""
    constexprs = _constexprs(shape, split_k, has_bias=False, big_scales=False, even_k=True)
    signature = {"x_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16", "y_ptr": "*bf16",
                 "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KC": "i32", "KS": "i32",
                 "stride_xm": "i32", "stride_cn": "i32", "stride_sn": "i32", "stride_ym": "i32"}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    return signature, constexprs


def quant_linear_small_m(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, *, shape: SmallMShape, split_k: int,
                         big_scales: bool) -> torch.Tensor:
    """``y = x · dequant(codes, E8M0 scales per 32)ᵀ (+ bias)`` for ``x`` ``[M <= shape.block_m, K]``, K a
    multiple of 8, written into ``y``.

    ``ws`` / ``cnt``: the split-K workspace ``[M, N]`` float32 and counters ``[ceil(N / shape.rows)]`` int32,
    zero between launches (the kernel leaves them so); unused when ``split_k == 1``. ``big_scales``: some scale
    byte exceeds 128 (or is 255); a second multiply keeps those blocks exact. The other inputs are checked by
    ``quant_linear.quant_linear``.
    """
    m, k = x.shape
    n = codes.shape[0]
    if m > shape.block_m:
        raise ValueError(f"quant_linear_small_m: at most block_m={shape.block_m} rows, got {m}")
    if k % 8:
        raise ValueError(f"quant_linear_small_m: K must be a multiple of 8 (code rows read as words), got {k}")
    bias_arg = bias if bias is not None else y  # any pointer; read only with HAS_BIAS
    tensors = (x, codes, scales, bias_arg, y, ws, cnt)
    key = ("small_m", m, n, k, x.stride(0), codes.stride(0), scales.stride(0), y.stride(0), x.dtype, y.dtype,
           bias is not None, big_scales, split_k, shape)

    def prepare():
        args = tensors + (m, n, k, codes.shape[1], scales.shape[1], x.stride(0), codes.stride(0), scales.stride(0),
                          y.stride(0))
        constexprs = _constexprs(shape, split_k, has_bias=bias is not None, big_scales=big_scales,
                                 even_k=k % shape.block_k == 0)
        return (triton.cdiv(n, shape.rows), split_k), args, dict(constexprs, num_warps=shape.num_warps)

    # Through the prepared-launch cache: Gluon's ordinary launch rebuilds and hashes the layout arguments on
    # every call, host time a decode step cannot afford.
    launch(_small_m_kernel, key, tensors, prepare)
    return y
