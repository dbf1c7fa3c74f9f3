"""Large batches of the fused 4-bit-weight linear on Hopper: a Gluon kernel on asynchronous ``wgmma``.

At large batch the product is bound by the tensor cores, and the weight decode (repeated for every tile of X)
has to hide under the MMAs. The Triton-language kernel cannot keep an MMA in flight while it decodes the next
tile. Here:

* the MMA computes Yᵀ = W·Xᵀ per program tile: ``BN`` weight rows (its M, 64 per warpgroup) by ``BM``
  activation rows (its N, up to 256);
* each thread loads 16 contiguous code bytes of a weight row (32 weights, one scale block) as four words,
  decodes each byte into one bf16x2 register (``quant_linear_gluon.decode_words``, 6 instructions a byte) and
  writes the 32 weights to shared memory with four 16-byte stores;
* the X tile is copied global -> shared with ``cp.async`` (bf16 activations; ``quant_linear`` converts others
  first, the same rounding the other kernels apply in registers);
* both operands are in shared memory, so the ``wgmma`` runs asynchronously: the next tile's codes are loaded
  and decoded, and its X tile copied, while the tensor cores work on the current one. (With the decoded weight
  as the register operand, ptxas serialised the MMAs: it reuses the operand registers within a tile.)

The loop is software-pipelined by hand with one ``wgmma`` group in flight and one CTA barrier per K tile of 64,
which orders the shared-memory writes of a tile before its MMA. Codes are loaded one tile ahead, X tiles copied
``X_STAGES - 2`` tiles ahead, so deeper X buffering hides more of their latency. The X tile copied after
barrier i (tile i + X_STAGES - 2) lands in the buffer of MMA i-2, and the weight tile written before barrier i
goes to the buffer of MMA i-3 (three weight buffers); every warpgroup retired those MMAs before that barrier.

Scales: E8M0 only (the ``mxfp4`` family, 32-element blocks), exact as in ``quant_linear_gluon``. Needs sm_90.
``quant_linear.quant_linear`` offers it to its tuner as ``TileConfig(wgmma=True)`` for large batches, checked
against the plain-Triton decode before it is timed.
"""

from __future__ import annotations

import torch
import triton

from ._launch import launch
from .quant_linear_gluon import _bases, available, gl, gluon

if gluon is not None:
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    from .quant_linear_gluon import _cta_barrier, decode_words, row_pointers

    # global -> shared cp.async: ``async_copy_global_to_shared`` in triton 3.6, ``async_load`` from 3.7 on.
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

__all__ = ["available", "quant_linear_large_m", "BLOCK_K"]

BLOCK_K = 64  # weights per row per K tile: 2 threads x 16 code bytes (one 128-byte row of a bf16 tile)
SHARED_BYTES = 227 * 1024  # shared memory one CTA may use on Hopper

if gluon is not None:
    BLOCK_K_ = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _load_codes(tile, c_rows, word_in_tile, s_rows, s_cols, KC, KS, EVEN_K: gl.constexpr):
        """(code words [BN, 2, 4] int32, scale bytes [BN, 2] as int32) of K tile ``tile``."""
        cw = tile * (BLOCK_K_ // 8) + word_in_tile
        sb = tile * (BLOCK_K_ // 32) + s_cols
        if EVEN_K:
            c = gl.load(c_rows + cw)
            e = gl.load(s_rows + sb)
        else:
            c = gl.load(c_rows + cw, mask=cw < KC // 4, other=0)
            e = gl.load(s_rows + sb, mask=sb < KS, other=0)
        return c, e.to(gl.int32)

    @gluon.jit
    def _copy_x(buf, tile, x_rows, x_cols):
        """Start the copy of X tile ``tile`` [BM, 64] into ``buf`` (one ``cp.async`` group; X's rows are padded to
        a multiple of 64 columns, so no mask)."""
        _cp_async(buf, x_rows + (tile * BLOCK_K_ + x_cols))
        async_copy.commit_group()

    @gluon.jit
    def _large_m_kernel(
        x_ptr,  # [M, ceil(K / 64) * 64] bf16 activations, row-major, zero past column K
        codes_ptr,  # [N, KC] uint8, two E2M1 codes per byte, element 2k in the low nibble
        scales_ptr,  # [N, KS] uint8 E8M0, one per 32 weights along K
        bias_ptr,  # [N] bias (y's dtype); read only when HAS_BIAS
        y_ptr,  # [M, N] output
        M, N, K, KC, KS, stride_xm, stride_cn, stride_sn, stride_ym,
        HAS_BIAS: gl.constexpr, BIG_SCALES: gl.constexpr,
        EVEN_K: gl.constexpr,  # K % 64 == 0: no masks on the codes and scales
        BN: gl.constexpr,  # weight rows per program: a multiple of 16 x warps
        BM: gl.constexpr,  # activation rows per program: the wgmma's N, <= 256
        GROUP_M: gl.constexpr,  # programs in a group walk GROUP_M X tiles against the same W tiles (L2 reuse)
        X_STAGES: gl.constexpr,  # X tiles in shared memory (>= 3): copies run X_STAGES - 2 tiles ahead
        C_LAYOUT: gl.constexpr,  # [BN, 2, 4] code words: row, half of the K tile, word
        X_LAYOUT: gl.constexpr,  # [BM, 64] activations, 16 bytes per thread
        ACC: gl.constexpr,  # the wgmma accumulator layout [BN, BM]
        SMEM: gl.constexpr,  # shared layout of the operand tiles [rows, 64]
        OUT_LAYOUT: gl.constexpr,  # [BN, BM] with N contiguous per thread, for the store of Y = accᵀ
    ):
        # Program -> (X tile, W tile) in grouped order.
        pid = gl.program_id(0)
        num_m = (M + BM - 1) // BM
        num_n = (N + BN - 1) // BN
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        group_m = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m

        # Code words [BN, 2, 4]: row n, half h, word j -> bytes 4j .. 4j+3 of codes[n, k0/2 + 16h ..] (16 bytes =
        # one scale block per thread); scales [BN, 2]: row n, half h -> scales[n, k0/32 + h].
        c_rows, word_in_tile, s_rows, s_cols = row_pointers(codes_ptr.to(gl.pointer_type(gl.int32)), scales_ptr,
                                                            stride_cn // 4, stride_sn, pid_n, N, BN, 2, 4, C_LAYOUT)
        # Activation pointers [BM, 64]: x[m, k0 + k]. Rows past M read row M-1 (never stored).
        xm = gl.minimum(pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, X_LAYOUT)), M - 1)
        x_rows = x_ptr + gl.expand_dims(xm, 1) * stride_xm
        x_cols = gl.expand_dims(gl.arange(0, BLOCK_K_, layout=gl.SliceLayout(0, X_LAYOUT)), 0)

        ws = gl.allocate_shared_memory(gl.bfloat16, [3, BN, BLOCK_K_], SMEM)
        xs = gl.allocate_shared_memory(gl.bfloat16, [X_STAGES, BM, BLOCK_K_], SMEM)
        n_tiles = (K + BLOCK_K_ - 1) // BLOCK_K_
        last = n_tiles - 1  # loads past the end reload the last tile: in bounds, never used
        AHEAD: gl.constexpr = X_STAGES - 2  # X tiles in flight
        for j in gl.static_range(AHEAD):
            _copy_x(xs.index(j), gl.minimum(j, last), x_rows, x_cols)
        c, e = _load_codes(0, c_rows, word_in_tile, s_rows, s_cols, KC, KS, EVEN_K)
        acc = gl.zeros((BN, BM), gl.float32, ACC)
        for tile in range(n_tiles):
            # Weights [BN, 2, 4, 8] (row, half, word, weight) -> [BN, 64] in memory order.
            w_buf = ws.index(tile % 3)
            w_buf.store(gl.reshape(decode_words(c, e, BIG_SCALES), (BN, BLOCK_K_)))
            c, e = _load_codes(gl.minimum(tile + 1, last), c_rows, word_in_tile, s_rows, s_cols, KC, KS, EVEN_K)
            async_copy.wait_group(AHEAD - 1)  # this thread's part of X tile `tile` has landed (later ones may fly)
            fence_async_shared()
            _cta_barrier()
            _copy_x(xs.index((tile + AHEAD) % X_STAGES), gl.minimum(tile + AHEAD, last), x_rows, x_cols)
            acc = warpgroup_mma(w_buf, xs.index(tile % X_STAGES).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])  # retires the previous tile's MMA
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        async_copy.wait_group(0)

        # acc [BN, BM] is Yᵀ: element (n, m) goes to y[m, n]; stored with N contiguous per thread.
        if HAS_BIAS:
            offs_b = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, ACC))
            acc += gl.expand_dims(gl.load(bias_ptr + offs_b, mask=offs_b < N, other=0.0).to(gl.float32), 1)
        out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), OUT_LAYOUT)
        offs_n = gl.expand_dims(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT_LAYOUT)), 1)
        offs_m = gl.expand_dims(pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT_LAYOUT)), 0)
        gl.store(y_ptr + offs_m * stride_ym + offs_n, out, mask=(offs_n < N) & (offs_m < M))


def layouts(num_warps: int, rows: int, block_m: int) -> dict:
    """The layouts of ``_large_m_kernel`` for ``num_warps`` warps (4 per warpgroup), ``rows`` weight rows and
    ``block_m`` activation rows per program."""
    warp_bits = num_warps.bit_length() - 1
    reps = (rows // (16 * num_warps)).bit_length() - 1  # row repeats per thread beyond the first
    # Code words: 4 per thread (16 bytes, one scale block), two threads per row of a K tile.
    codes = gl.DistributedLinearLayout(
        reg_bases=_bases(1, 2, 2) + _bases(16 * num_warps, reps, 0),
        lane_bases=[[0, 1, 0]] + _bases(1, 4, 0), warp_bases=_bases(16, warp_bits, 0), block_bases=[],
        shape=[rows, 2, 4])
    acts = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_m, 16])
    smem = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    out = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])
    return dict(C_LAYOUT=codes, X_LAYOUT=acts, ACC=acc, SMEM=smem, OUT_LAYOUT=out)


def _constexprs(num_warps: int, rows: int, block_m: int, x_stages: int, *, has_bias: bool, big_scales: bool,
                even_k: bool, group_m: int = 8) -> dict:
    if x_stages < 3:
        raise ValueError(f"quant_linear_large_m: x_stages must be >= 3 (one tile in flight), got {x_stages}")
    shared = (3 * rows + x_stages * block_m) * 2 * BLOCK_K  # three weight tiles, x_stages X tiles, bf16
    if shared > SHARED_BYTES:
        raise ValueError(f"quant_linear_large_m: {rows} weight rows and {x_stages} X tiles of {block_m} rows need "
                         f"{shared} bytes of shared memory, more than the {SHARED_BYTES} a program may use")
    return dict(HAS_BIAS=has_bias, BIG_SCALES=big_scales, EVEN_K=even_k, BN=rows, BM=block_m, GROUP_M=group_m,
                X_STAGES=x_stages, **layouts(num_warps, rows, block_m))


def compile_signature(num_warps: int, rows: int, block_m: int, x_stages: int) -> tuple[dict, dict]:
    """(signature, constexprs) of ``_large_m_kernel`` for an ahead-of-time ``triton.compile`` (bf16 activations
    and output, no bias, scale bytes <= 128, K a multiple of 64)."""
    constexprs = _constexprs(num_warps, rows, block_m, x_stages, has_bias=False, big_scales=False, even_k=True)
    signature = {"x_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16", "y_ptr": "*bf16",
                 "M": "i32", "N": "i32", "K": "i32", "KC": "i32", "KS": "i32",
                 "stride_xm": "i32", "stride_cn": "i32", "stride_sn": "i32", "stride_ym": "i32"}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    return signature, constexprs


def quant_linear_large_m(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         y: torch.Tensor, *, num_warps: int, rows: int, block_m: int, x_stages: int, group_m: int,
                         big_scales: bool) -> torch.Tensor:
    """``y = x · dequant(codes, E8M0 scales per 32)ᵀ (+ bias)`` for ``x`` ``[M, K]``, written into ``y``; programs
    of ``rows`` weight rows by ``block_m`` activation rows, ``x_stages`` X tiles in shared memory. The inputs
    are checked by ``quant_linear``."""
    m, k = x.shape
    n = codes.shape[0]
    if x.dtype != torch.bfloat16:
        raise TypeError(f"quant_linear_large_m: x must be bfloat16 (cp.async copies it as is), got {x.dtype}")
    if k % 8 or codes.stride(0) % 4:
        raise ValueError(f"quant_linear_large_m: K must be a multiple of 8 (code rows are read as 32-bit words), "
                         f"got K={k}")
    if k % BLOCK_K:
        # cp.async copies 16-byte pieces and cannot mask within one: zero columns up to a whole tile (their
        # weights are masked to 0 too). Model dimensions are multiples of 64, so this copy is rare.
        x = torch.nn.functional.pad(x, (0, BLOCK_K - k % BLOCK_K))
    bias_arg = bias if bias is not None else y  # any pointer; read only with HAS_BIAS
    tensors = (x, codes, scales, bias_arg, y)
    key = ("large_m", m, n, k, codes.shape[1], scales.shape[1], x.stride(0), codes.stride(0), scales.stride(0),
           y.stride(0), x.dtype, y.dtype, bias is not None, big_scales, num_warps, rows, block_m, x_stages, group_m)

    def prepare():
        args = tensors + (m, n, k, codes.shape[1], scales.shape[1], x.stride(0), codes.stride(0), scales.stride(0),
                          y.stride(0))
        constexprs = _constexprs(num_warps, rows, block_m, x_stages, has_bias=bias is not None,
                                 big_scales=big_scales, even_k=k % BLOCK_K == 0, group_m=group_m)
        return (triton.cdiv(m, block_m) * triton.cdiv(n, rows),), args, dict(constexprs, num_warps=num_warps)

    launch(_large_m_kernel, key, tensors, prepare)
    return y
