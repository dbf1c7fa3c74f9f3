"""Decode-sized batches (M <= 16) of the fused 4-bit-weight linear, written in Gluon with explicit layouts.

The Triton-language kernel in ``quant_linear.py`` decodes the weight into a blocked layout and lets the compiler
move it into the tensor cores' operand layout (shared memory or register shuffles, and a re-pairing of the
decoded halves): about 6.5 SASS instructions per weight element, and at batch <= 16 the kernel is bound by
them. Here every layout is chosen so that nothing moves:

* each thread loads 16 contiguous code bytes of a row (one 16-byte load) = 32 weights = exactly one scale
  block, so each thread needs one scale byte per row;
* each byte decodes in one inline-PTX call to one bf16x2 register holding its two weights (low nibble first),
  multiplied by the block scale in the same call;
* the logical K order of the MMA is a permutation of memory order chosen so that those registers already are
  the ``mma.sync`` A fragments (rows of W are the MMA's M, the batch its N: Yᵀ = W·Xᵀ); the activations are
  loaded in the same permuted order (each thread 64 contiguous bytes of a row of X), so the sum is unchanged.

Within a K tile of 128 weights, lane ``t`` (0..3) of a row group holds bytes ``16t .. 16t+15``, i.e. weights
``32t .. 32t+31``; weight ``32t + 2b + i`` (byte b, nibble i) sits at MMA k index ``8b + 2t + i``.

Scales: E8M0 only (MX formats with 32-element blocks, the ``mxfp4`` family). The decoded byte is the E2M1
value times 2^-126 (see ``_decode_asm``); one bf16x2 multiply by 2^126·S = 2^(e-1) finishes it, exact while the
scale byte e <= 128 (blocks below about 16 in magnitude). ``BIG_SCALES`` adds a second multiply for larger
blocks and NaN scales. ``mul.rn.bf16x2`` needs sm_90 (Hopper).

``quant_linear.quant_linear`` offers these kernels to its tuner as ``TileConfig(gluon=True)`` candidates for
batches up to 16; they are verified against the plain-Triton decode before being timed.
"""

from __future__ import annotations

import torch
import triton

from ._launch import launch

try:  # Gluon ships with triton >= 3.5; without it the Triton-language kernel is used alone.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # pragma: no cover - depends on the installed triton
    gluon = gl = mma_v2 = None

__all__ = ["available", "quant_linear_small_m", "BLOCK_K"]

BLOCK_K = 128  # weights per row per K tile: 4 lanes x 16 bytes x 2


def available(device: torch.device | None = None) -> bool:
    """Gluon is importable and ``device`` (default: the current CUDA device) is sm_90 or newer."""
    if gluon is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


# One code byte ($2, zero-extended) and bf16x2 factors ($3, and $4 with two) -> bf16 (low, high) nibble values
# ($0, $1) times the factors. m = b·0x40040 = b<<6 | b<<18 puts the low nibble's magnitude at bits 6..8 and the
# high nibble's at 22..24 (bf16 exponent/mantissa bits: the E2M1 value times 2^-126; code 1 is the bf16
# subnormal 2^-127); s = b·0x1001000 = b<<12 | b<<24 puts the signs at bits 15 and 31. Hopper's bf16 arithmetic
# keeps subnormal inputs, so the multiplies are exact.
#
# ``nbytes=4``: the input is a word of four code bytes, each taken out with a ``prmt`` (byte i zero-extended) and
# decoded the same way; outputs $2i, $2i+1 are byte i's values, the word is $8 and the factors $9 (and $10).
def _decode_asm(factors: int, nbytes: int = 1) -> str:
    word = 2 * nbytes
    lines = ["{", ".reg .b32 b, m, s, d;"]
    for i in range(nbytes):
        byte = f"${word}" if nbytes == 1 else "b"
        if nbytes > 1:
            lines.append(f"prmt.b32 b, ${word}, 0, {0x4440 + i:#x};")
        lines += [f"mul.lo.u32 m, {byte}, 0x40040;", f"mul.lo.u32 s, {byte}, 0x1001000;", "and.b32 m, m, 0x01C001C0;",
                  "and.b32 s, s, 0x80008000;", "or.b32 d, m, s;", f"mul.rn.bf16x2 d, d, ${word + 1};"]
        if factors == 2:
            lines.append(f"mul.rn.bf16x2 d, d, ${word + 2};")
        lines.append(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, d;")
    return "\n".join(lines + ["}"])


if gluon is not None:
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # triton 3.6 / later names
    _DECODE_ONE = gl.constexpr(_decode_asm(1))
    _DECODE_TWO = gl.constexpr(_decode_asm(2))
    _DECODE_WORD_ONE = gl.constexpr(_decode_asm(1, 4))
    _DECODE_WORD_TWO = gl.constexpr(_decode_asm(2, 4))
    BLOCK_K_ = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _decode(c, f1, f2, BIG_SCALES: gl.constexpr):
        """bf16 (low, high) nibble values of the code bytes ``c`` (int32) times ``f1`` (and ``f2``)."""
        if BIG_SCALES:
            return gl.inline_asm_elementwise(_DECODE_TWO, "=h,=h,r,r,r", [c, f1, f2],
                                             dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        return gl.inline_asm_elementwise(_DECODE_ONE, "=h,=h,r,r", [c, f1], dtype=(gl.bfloat16, gl.bfloat16),
                                         is_pure=True, pack=1)

    @gluon.jit
    def _decode_word(c, f1, f2, BIG_SCALES: gl.constexpr):
        """bf16 (low, high) nibble values of the four code bytes of each int32 word of ``c``: 8 tensors."""
        if BIG_SCALES:
            return gl.inline_asm_elementwise(_DECODE_WORD_TWO, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [c, f1, f2],
                                             dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
        return gl.inline_asm_elementwise(_DECODE_WORD_ONE, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [c, f1],
                                         dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)

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
    def _factors(e, c, BIG_SCALES: gl.constexpr):
        """The decode's bf16x2 factors for scale bytes ``e`` (int32 E8M0), broadcast over the last axis of ``c``."""
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
        return gl.expand_dims(f1, last) + zero, gl.expand_dims(f2, last) + zero

    @gluon.jit
    def decode_bytes(c, e, BIG_SCALES: gl.constexpr):
        """bf16 weights [..., 2] of the code bytes ``c`` (the low nibble's value first) times the scale bytes ``e``
        (int32 E8M0, one per byte of the last axis of ``c``, which ``e`` lacks)."""
        c = c.to(gl.int32)
        f1, f2 = _factors(e, c, BIG_SCALES)
        lo, hi = _decode(c, f1, f2, BIG_SCALES)
        return gl.join(lo, hi)

    @gluon.jit
    def decode_words(c, e, BIG_SCALES: gl.constexpr):
        """bf16 weights [..., 8] in memory order of the int32 words ``c`` of four code bytes (little-endian: byte
        0 holds weights 0 and 1) times the scale bytes ``e`` (int32 E8M0, one per word of the last axis of ``c``,
        which ``e`` lacks). Four bytes per asm call: one ``prmt`` takes each byte out of the word, where loading
        bytes and widening them costs two instructions more per byte."""
        f1, f2 = _factors(e, c, BIG_SCALES)
        l0, h0, l1, h1, l2, h2, l3, h3 = _decode_word(c, f1, f2, BIG_SCALES)
        # join(join(v0, v2), join(v1, v3))[..., i, j] = v_{2i+j}: byte order; then nibble order innermost.
        lo = gl.join(gl.join(l0, l2), gl.join(l1, l3))
        hi = gl.join(gl.join(h0, h2), gl.join(h1, h3))
        return gl.reshape(gl.join(lo, hi), c.shape + [8])

    @gluon.jit
    def _tile_product(acc, c, e, xv, BN: gl.constexpr, BM: gl.constexpr, BIG_SCALES: gl.constexpr,
                      MMA: gl.constexpr):
        """``acc`` + the tile's decoded weight [BN, 128] · activations [128, BM], k in the permuted order."""
        # Code bytes [BN, 4, 16] (row, lane t, byte) -> weights [BN, 4, 16, 2] -> (row, byte, t, nibble) ->
        # [BN, 128]: MMA k = 8·byte + 2t + nibble, and the register layout is already mma.sync's A fragment
        # (asserted: no data moves).
        w = gl.reshape(gl.permute(decode_bytes(c, e, BIG_SCALES), (0, 2, 1, 3)), (BN, BLOCK_K_))
        w = gl.convert_layout(w, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2), assert_trivial=True)
        # Activations [4, 32, BM] (weight 32t + 2·byte + nibble of the tile) -> [4, 16, 2, BM] -> (byte, t,
        # nibble, m) -> [128, BM]: the same k order.
        xv = gl.reshape(gl.permute(gl.reshape(xv.to(gl.bfloat16), (4, 16, 2, BM)), (1, 0, 2, 3)), (BLOCK_K_, BM))
        xv = gl.convert_layout(xv, gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2), assert_trivial=True)
        return mma_v2(w, xv, acc)

    @gluon.jit
    def _small_m_kernel(
        x_ptr,  # [M, K] activations (bf16 / fp16 / fp32), row-major
        codes_ptr,  # [N, KC] uint8, two E2M1 codes per byte, element 2k in the low nibble
        scales_ptr,  # [N, KS] uint8 E8M0, one per 32 weights along K
        bias_ptr,  # [N] bias (y's dtype); read only when HAS_BIAS
        y_ptr,  # [M, N] output
        ws_ptr,  # [M, N] float32 split-K workspace, zero between launches
        cnt_ptr,  # [N tiles] int32 split-K counters, zero between launches
        M, N, K, KC, KS, stride_xm, stride_cn, stride_sn, stride_ym,
        HAS_BIAS: gl.constexpr, BIG_SCALES: gl.constexpr, SPLIT_K: gl.constexpr,
        EVEN_K: gl.constexpr,  # K % 128 == 0: no masks along K
        NW: gl.constexpr,  # warps per program
        BN: gl.constexpr,  # weight rows per program: 16 x warps x row groups per warp
        C_LAYOUT: gl.constexpr,  # [BN, 4, 16] code bytes: row, lane t, byte
        X_LAYOUT: gl.constexpr,  # [4, 32, 16] activations: lane t, weight within t's 32, batch row
        MMA: gl.constexpr,
    ):
        BM: gl.constexpr = 16
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        # Code bytes [BN, 4, 16]: row n, lane t, byte j -> codes[n, k0/2 + 16t + j]; scales [BN, 4]: row n, lane
        # t -> scales[n, k0/32 + t].
        c_rows, byte_in_tile, s_rows, t2 = row_pointers(codes_ptr, scales_ptr, stride_cn, stride_sn, pid_n, N, BN, 4,
                                                        16, C_LAYOUT)
        # Activation pointers [4, 32, 16]: lane t, e, batch row m -> x[m, k0 + 32t + e]; rows past M masked
        # (no memory traffic at batch 1).
        xl_t: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, X_LAYOUT))
        xl_e: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, X_LAYOUT))
        xl_m: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, X_LAYOUT))
        xt3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=xl_t), 1), 2)
        xe3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=xl_e), 0), 2)
        xm3 = gl.expand_dims(gl.expand_dims(gl.arange(0, BM, layout=xl_m), 0), 1)
        x_cols = xt3 * 32 + xe3  # [4, 32, 1]
        x_rows = x_ptr + xm3 * stride_xm
        m_ok = xm3 < M

        n_tiles = (K + BLOCK_K_ - 1) // BLOCK_K_
        per_split = (n_tiles + SPLIT_K - 1) // SPLIT_K
        tile0 = pid_k * per_split
        tile1 = gl.minimum(tile0 + per_split, n_tiles)
        acc = gl.zeros((BN, BM), gl.float32, MMA)
        for tile in range(tile0, tile1):
            k0 = tile * BLOCK_K_
            cb = k0 // 2 + byte_in_tile
            sb = k0 // 32 + t2
            xk = k0 + x_cols
            if EVEN_K:
                c = gl.load(c_rows + cb)
                e = gl.load(s_rows + sb)
                xv = gl.load(x_rows + xk, mask=m_ok, other=0.0)
            else:
                c = gl.load(c_rows + cb, mask=cb < KC, other=0)
                e = gl.load(s_rows + sb, mask=sb < KS, other=0)
                xv = gl.load(x_rows + xk, mask=m_ok & (xk < K), other=0.0)
            acc = _tile_product(acc, c, e.to(gl.int32), xv, BN, BM, BIG_SCALES, MMA)

        # acc [BN, BM] is Yᵀ: element (n, m) goes to y[m, n].
        offs_ny = gl.expand_dims(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)), 1)
        offs_my = gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, MMA)), 0)
        mask = (offs_ny < N) & (offs_my < M)
        if SPLIT_K == 1:
            _finish(acc, y_ptr, bias_ptr, offs_ny, offs_my, mask, stride_ym, N, HAS_BIAS)
        else:
            # Split-K as in ``quant_linear._quant_linear_kernel``: partial sums added into the workspace, a GPU
            # fence in every thread and a barrier before the one counter increment; the last slice takes the
            # totals with an atomic exchange (leaving zeros), resets the counter and writes Y.
            ws_ptrs = ws_ptr + offs_my * N + offs_ny
            gl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            _fence_gpu(NW)
            _cta_barrier()
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                _fence_gpu(NW)
                total = gl.atomic_xchg(ws_ptrs, gl.zeros((BN, BM), gl.float32, MMA), mask=mask, sem="relaxed")
                gl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
                _finish(total, y_ptr, bias_ptr, offs_ny, offs_my, mask, stride_ym, N, HAS_BIAS)


def layouts(num_warps: int, row_groups: int = 1):
    """(code layout, activation layout, MMA layout, rows per program) for ``num_warps`` warps, each covering
    ``row_groups`` groups of 16 weight rows (more groups reuse each warp's activation fragments)."""
    warps = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    groups = [[(16 * num_warps) << i, 0, 0] for i in range(row_groups.bit_length() - 1)]
    codes = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [8, 0, 0]] + groups,
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=warps, block_bases=[], shape=[16 * num_warps * row_groups, 4, 16])
    acts = gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0], [0, 16, 0], [0, 0, 8]],
        lane_bases=[[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[0, 0, 0]] * len(warps), block_bases=[], shape=[4, 32, 16])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    return codes, acts, mma, 16 * num_warps * row_groups


def _constexprs(num_warps: int, row_groups: int, split_k: int, *, has_bias: bool, big_scales: bool,
                even_k: bool) -> dict:
    codes_layout, acts_layout, mma, rows = layouts(num_warps, row_groups)
    return dict(HAS_BIAS=has_bias, BIG_SCALES=big_scales, SPLIT_K=split_k, EVEN_K=even_k, NW=num_warps, BN=rows,
                C_LAYOUT=codes_layout, X_LAYOUT=acts_layout, MMA=mma)


def compile_signature(num_warps: int, row_groups: int, split_k: int) -> tuple[dict, dict]:
    """(signature, constexprs) of ``_small_m_kernel`` for an ahead-of-time ``triton.compile`` (bf16 activations
    and output, no bias, scale bytes <= 128, K a multiple of 128): what ``scripts/sass_loop_mix.py`` and the
    instruction-budget test compile."""
    constexprs = _constexprs(num_warps, row_groups, split_k, has_bias=False, big_scales=False, even_k=True)
    signature = {"x_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16", "y_ptr": "*bf16",
                 "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KC": "i32", "KS": "i32",
                 "stride_xm": "i32", "stride_cn": "i32", "stride_sn": "i32", "stride_ym": "i32"}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    return signature, constexprs


def quant_linear_small_m(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, *, split_k: int, num_warps: int,
                         row_groups: int, big_scales: bool) -> torch.Tensor:
    """``y = x · dequant(codes, E8M0 scales per 32)ᵀ (+ bias)`` for ``x`` ``[M <= 16, K]``, written into ``y``.

    ``ws`` / ``cnt``: the split-K workspace ``[M, N]`` float32 and counters ``[ceil(N / rows per program)]``
    int32, zero between launches (the kernel leaves them so); unused when ``split_k == 1``. ``big_scales``: some
    scale byte exceeds 128 (or is 255); a second multiply keeps those blocks exact. The other inputs are checked
    by ``quant_linear.quant_linear``.
    """
    m, k = x.shape
    n = codes.shape[0]
    if m > 16:
        raise ValueError(f"quant_linear_small_m: at most 16 rows, got {m}")
    rows = 16 * num_warps * row_groups
    bias_arg = bias if bias is not None else y  # any pointer; read only with HAS_BIAS
    tensors = (x, codes, scales, bias_arg, y, ws, cnt)
    key = ("small_m", m, n, k, codes.shape[1], scales.shape[1], x.stride(0), codes.stride(0), scales.stride(0),
           y.stride(0), x.dtype, y.dtype, bias is not None, big_scales, split_k, num_warps, row_groups)

    def prepare():
        args = tensors + (m, n, k, codes.shape[1], scales.shape[1], x.stride(0), codes.stride(0), scales.stride(0),
                          y.stride(0))
        constexprs = _constexprs(num_warps, row_groups, split_k, has_bias=bias is not None, big_scales=big_scales,
                                 even_k=k % BLOCK_K == 0)
        return (triton.cdiv(n, rows), split_k), args, dict(constexprs, num_warps=num_warps)

    # Through the prepared-launch cache: Gluon's ordinary launch rebuilds and hashes the layout arguments on
    # every call, host time a decode step cannot afford.
    launch(_small_m_kernel, key, tensors, prepare)
    return y
