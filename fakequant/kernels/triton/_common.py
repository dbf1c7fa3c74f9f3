"""Pieces shared by the Triton kernels: exact bit-level arithmetic, tile geometry, the output cast.

Numerics follow ``shared/spec/formats.md`` §0: exponents are read from the bits (never ``tl.log2``),
scaling is by powers of two built from the bits, rounding is applied to exact values, and the exact float32
result is cast to the input dtype with saturation. Everything here runs both compiled and under
``TRITON_INTERPRET=1``; where the interpreter's own casts are not IEEE-exact (its float32 -> bfloat16 cast
truncates) the kernels take an exact integer path selected by the ``INTERPRET`` constexpr.

Launcher-side helpers (plain Python) are at the bottom: input checks, the ``[outer, L, inner]`` geometry of
a quantization axis, and the tile shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import launch

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite float32

# ----------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def bits_of(x):
    """The int32 bit pattern of float32 ``x``."""
    return x.to(tl.int32, bitcast=True)


@triton.jit
def float_of(b):
    """The float32 whose bit pattern is int32 ``b``."""
    return b.to(tl.float32, bitcast=True)


# Reductions and integer division are written here rather than called from triton.language's standard
# library (tl.max, tl.cdiv): those are @jit functions created when triton is first imported, and if that
# happened before TRITON_INTERPRET=1 was set (torch imports triton early) the interpreter cannot call them.
# The reductions still name the standard max combiner, which the interpreter runs as one numpy call.
@triton.jit
def max_keep(x, AXIS: tl.constexpr):
    """Maximum of ``x`` along ``AXIS``, kept as a size-1 axis (used on int bit patterns)."""
    return tl.reduce(x, AXIS, tl.standard._elementwise_max, keep_dims=True)


@triton.jit
def max_all(x):
    """Maximum of every element of ``x`` (a scalar)."""
    return tl.reduce(x, None, tl.standard._elementwise_max)


@triton.jit
def cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def exponent_and_fraction(ab):
    """``(E, f)`` of the positive finite float32 with bits ``ab``: E = floor(log2 a) exactly and f its 23
    fraction bits after normalisation (so a = (1 + f / 2^23) * 2^E), fp32 subnormals included.

    A subnormal's bits, read as an integer m < 2^23, convert to float32 exactly; float(m) has the same
    significand as a = m * 2^-149, and E(a) = E(float(m)) - 149.
    """
    sub = ab < 0x00800000
    nb = tl.where(sub, bits_of(ab.to(tl.float32)), ab)
    e = (nb >> 23) - tl.where(sub, 127 + 149, 127)
    return e, nb & 0x7FFFFF


@triton.jit
def pow2(e, SUBNORMAL: tl.constexpr = True):
    """Exact float32 ``2^e`` for int32 ``e`` in [-149, 127] (subnormal powers included); with
    ``SUBNORMAL=False`` the caller promises e >= -126 and gets the cheaper normal-only form."""
    normal = (tl.maximum(e, -126) + 127) << 23
    if SUBNORMAL:
        small = 1 << tl.minimum(tl.maximum(e + 149, 0), 22)
        return float_of(tl.where(e >= -126, normal, small))
    return float_of(normal)


@triton.jit
def round_to_int(t, ROUND: tl.constexpr, T_MAY_REACH_2_23: tl.constexpr):
    """Round exact float32 ``t`` in [0, 2^24) to an integer: ROUND 0 = nearest (ties away), 1 = even,
    2 = floor (toward zero). Exact: t + 2^23 - 2^23 is t rounded half-even for t < 2^23 (the sum has ulp 1),
    and the residual d = t - RNE(t) is exact, so ties are decided on the exact t (formats.md §0)."""
    r = (t + 8388608.0) - 8388608.0
    if T_MAY_REACH_2_23:
        r = tl.where(t >= 8388608.0, t, r)  # already an integer there
    if ROUND == 0:
        r = tl.where(t - r == 0.5, r + 1.0, r)
    elif ROUND == 2:
        r = tl.where(t - r < 0.0, r - 1.0, r)
    return r


@triton.jit
def load_f32(ptrs, mask, IN_KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """Load input elements as float32 (exact for every input dtype). The interpreter's bfloat16 -> float32
    cast mishandles subnormals, so there the bits are widened by hand (a bfloat16 is the top half of a
    float32)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRET and IN_KIND == 1:
        return float_of(x.to(tl.int16, bitcast=True).to(tl.int32) << 16)
    return x.to(tl.float32)


@triton.jit
def cast_out(y, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr, SATURATED: tl.constexpr = False):
    """Cast an exact float32 result to the output dtype as ``saturating_cast`` does: finite values beyond the
    dtype's largest finite value become it, ±inf and NaN stay, rounding is to nearest-even.

    OUT_KIND 0 = float32, 1 = bfloat16, 2 = float16. ``SATURATED``: the caller already clamped magnitudes to
    the dtype's largest finite value (``saturation(dtype)``) and produces no ±inf, so a plain cast is exact.
    The interpreter truncates float32 -> bfloat16, so there the rounding is done on the bits.
    """
    if OUT_KIND == 0:
        return y
    elif OUT_KIND == 1:
        if INTERPRET:
            b = bits_of(y)
            ab = b & 0x7FFFFFFF
            r = (ab + 0x7FFF + ((ab >> 16) & 1)) >> 16
            r = tl.minimum(r, 0x7F7F)  # finite beyond the largest bfloat16 saturates
            r = tl.where(ab > 0x7F800000, 0x7FC0, tl.where(ab == 0x7F800000, 0x7F80, r))
            r = r | ((b >> 16) & 0x8000)
            return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
        elif SATURATED:
            return y.to(tl.bfloat16)
        else:
            big = 3.3895313892515355e38  # largest finite bfloat16
            finite = (bits_of(y) & 0x7FFFFFFF) < 0x7F800000
            return tl.where(finite, tl.minimum(tl.maximum(y, -big), big), y).to(tl.bfloat16)
    else:
        if SATURATED:
            return y.to(tl.float16)
        finite = (bits_of(y) & 0x7FFFFFFF) < 0x7F800000
        return tl.where(finite, tl.minimum(tl.maximum(y, -65504.0), 65504.0), y).to(tl.float16)


@triton.jit
def row_tile(pid, n_blocks, n_row_blocks, L, B: tl.constexpr, BP: tl.constexpr, NBLK: tl.constexpr,
             EVEN: tl.constexpr, I64: tl.constexpr):
    """Offsets and mask of a ``[NBLK, BP]`` tile of whole blocks along the last (contiguous) axis.

    Row ``r`` of the tile is block ``pid * NBLK + r`` of the flattened ``[outer, ceil(L / B)]`` grid of blocks;
    column ``j`` is its j-th element (``j < B``; BP is B rounded up to a power of two). ``EVEN``: L % B == 0,
    so block k starts at k * B. Otherwise the block's row and position are recovered by division.
    """
    blk = pid * NBLK + tl.arange(0, NBLK)[:, None]  # [NBLK, 1]
    if I64:
        blk = blk.to(tl.int64)
    j = tl.arange(0, BP)[None, :]  # [1, BP]
    if EVEN:
        offs = blk * B + j
        mask = (blk < n_blocks) & (j < B)
    else:
        row = blk // n_row_blocks
        start = (blk - row * n_row_blocks) * B
        offs = row * L + start + j
        mask = (blk < n_blocks) & (j < B) & (start + j < L)
    return offs, mask


@triton.jit
def col_tile(pid, n_row_blocks, L, I, cs, B: tl.constexpr, BP: tl.constexpr, NBLK: tl.constexpr,
             BI: tl.constexpr, SCALAR: tl.constexpr, I64: tl.constexpr):
    """Offsets and mask of a ``[NBLK, BP, BI]`` tile of a ``[outer, L, I]`` tensor quantized along L: NBLK
    consecutive blocks of B elements along L (axis 1 of the tile) for BI consecutive columns (axis 2, the
    contiguous one). The blocks reduce along axis 1, so no transpose is ever materialised.

    ``SCALAR``: the column offsets are multiplied by ``cs`` (always 1, but a runtime value the compiler cannot
    see), so the loads are not vectorised along the columns: each thread then owns whole block columns (the
    block maxima reduce inside the thread and per-block work is done once per block) at the price of one
    2- or 4-byte access per element; a warp still reads 32 consecutive columns per row.
    """
    n_i = cdiv(I, BI)
    n_l = cdiv(n_row_blocks, NBLK)
    pi = pid % n_i
    rest = pid // n_i
    pl = rest % n_l
    po = rest // n_l
    if I64:
        po = po.to(tl.int64)
    bl = pl * NBLK + tl.arange(0, NBLK)[:, None, None]  # [NBLK, 1, 1]
    j = tl.arange(0, BP)[None, :, None]  # [1, BP, 1]
    i = pi * BI + tl.arange(0, BI)[None, None, :]  # [1, 1, BI]
    pos = bl * B + j  # position along L
    if SCALAR:
        offs = po * L * I + pos * I + i * cs
    else:
        offs = po * L * I + pos * I + i
    mask = (j < B) & (pos < L) & (i < I)
    return offs, mask


@triton.jit
def row_tile3(pid, n_blocks, n_row_blocks, L, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
              NBLK: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr):
    """``row_tile`` for blocks of B = S1*S2*S3 elements with a nested layout: a ``[NBLK, S1, S2, S3]`` tile
    whose element (r, a, b, c) is element (a*S2 + b)*S3 + c of block pid*NBLK + r (HiFX/HiF4: 8 groups of
    2 quads of 4; tmx: 4 x 2 pairs of 2). Reductions over axes 3, 2, 1 give quad, group and block maxima."""
    B: tl.constexpr = S1 * S2 * S3
    blk = pid * NBLK + tl.arange(0, NBLK)[:, None, None, None]  # [NBLK, 1, 1, 1]
    if I64:
        blk = blk.to(tl.int64)
    j = (tl.arange(0, S1)[None, :, None, None] * S2 + tl.arange(0, S2)[None, None, :, None]) * S3 \
        + tl.arange(0, S3)[None, None, None, :]  # [1, S1, S2, S3]
    if EVEN:
        offs = blk * B + j
        mask = (blk < n_blocks) & (j < B)
    else:
        row = blk // n_row_blocks
        start = (blk - row * n_row_blocks) * B
        offs = row * L + start + j
        mask = (blk < n_blocks) & (start + j < L)
    return offs, mask


@triton.jit
def col_tile3(pid, n_row_blocks, L, I, cs, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
              NBLK: tl.constexpr, BI: tl.constexpr, SCALAR: tl.constexpr, I64: tl.constexpr):
    """``col_tile`` with the nested block layout of ``row_tile3``: a ``[NBLK, S1, S2, S3, BI]`` tile."""
    B: tl.constexpr = S1 * S2 * S3
    n_i = cdiv(I, BI)
    n_l = cdiv(n_row_blocks, NBLK)
    pi = pid % n_i
    rest = pid // n_i
    pl = rest % n_l
    po = rest // n_l
    if I64:
        po = po.to(tl.int64)
    bl = pl * NBLK + tl.arange(0, NBLK)[:, None, None, None, None]  # [NBLK, 1, 1, 1, 1]
    j = (tl.arange(0, S1)[None, :, None, None, None] * S2 + tl.arange(0, S2)[None, None, :, None, None]) * S3 \
        + tl.arange(0, S3)[None, None, None, :, None]  # [1, S1, S2, S3, 1]
    i = pi * BI + tl.arange(0, BI)[None, None, None, None, :]  # [1, 1, 1, 1, BI]
    pos = bl * B + j
    if SCALAR:
        offs = po * L * I + pos * I + i * cs
    else:
        offs = po * L * I + pos * I + i
    mask = (pos < L) & (i < I)
    return offs, mask


@triton.jit
def rhaz_small(t, LIMIT: tl.constexpr):
    """min(RHAZ(t), LIMIT) for float32 t >= 0 (any size; NaN gives garbage the caller masks), LIMIT < 2^23:
    t is first capped at LIMIT + 1, which does not change the capped result."""
    return tl.minimum(round_to_int(tl.minimum(t, LIMIT + 1.0), 0, False), LIMIT)


@triton.jit
def bf16_rne(v):
    """Round positive finite float32 ``v`` to bfloat16 (nearest-even) on the bits; the result as float32."""
    b = bits_of(v)
    return float_of((b + 0x7FFF + ((b >> 16) & 1)) & -65536)


@triton.jit
def copysign_plus(mag, x):
    """``mag`` (>= 0 or NaN) with the sign of ``x + 0`` (so -0 in gives +0): formats.md §0's sign rule.

    Done on the bits: Triton compiles a float negation ``-mag`` as ``0 - mag``, which turns -0 into +0.
    """
    return float_of(bits_of(mag) | (bits_of(x + 0.0) & -2147483648))


# ------------------------------------------------------------------------------------------ launcher helpers

SUPPORTED_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def out_kind(dtype: torch.dtype) -> int:
    return SUPPORTED_DTYPES[dtype]


def saturation(dtype: torch.dtype) -> float:
    """The largest finite value of ``dtype``: results are clamped to it (formats.md §0, Output)."""
    return float(torch.finfo(dtype).max)


def check_input(x: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """Validate a launcher's input and return it contiguous (a copy only when it is not)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name}: dtype {x.dtype} is not supported by the Triton kernels (allowed: {allowed})")
    if not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        raise ValueError(f"{name}: axis dim={dim} is out of range for a tensor of rank {x.dim()}")
    return x if x.is_contiguous() else x.contiguous()


@dataclass(frozen=True)
class Geometry:
    """A contiguous tensor seen as ``[outer, L, inner]`` around its quantization axis of length L."""

    outer: int
    length: int
    inner: int

    @property
    def numel(self) -> int:
        return self.outer * self.length * self.inner


def geometry(x: torch.Tensor, dim: int) -> Geometry:
    shape = list(x.shape) or [1]
    dim %= len(shape)
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = 1
    for s in shape[dim + 1:]:
        inner *= s
    return Geometry(outer, shape[dim], inner)


def is_interpreted(x: torch.Tensor) -> bool:
    """Kernels on CPU tensors only run under ``TRITON_INTERPRET=1`` (checked by the dispatcher)."""
    return x.device.type == "cpu"


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class TilePlan:
    """How a launcher tiles ``[outer, L, inner]``: row mode (inner == 1) or column mode, and the tile sizes."""

    col: bool
    nblk: int  # blocks per tile
    bi: int  # columns per tile (column mode)
    num_warps: int
    grid: int
    scalar: bool = False  # column mode: unvectorised columns, whole block columns per thread (col_tile)


def plan_tiles(g: Geometry, block: int, block_pow2: int, elem_size: int, interpreted: bool,
               override: tuple | None = None, tiles: dict | None = None) -> TilePlan:
    """Choose the tile of one program.

    ``tiles`` is the family's measured table (see each kernel module's ``TILES``): for an element size of 2
    (bf16/fp16) or 4 bytes (fp32), ``"row": (elements per tile, warps)`` along the last axis and
    ``"col": (elements along the axis, columns, warps)`` otherwise. Under the interpreter (whose cost is per
    program and per operation) one big tile is used instead. ``override=(blocks, columns, warps[, scalar])``
    replaces the choice (benchmark sweeps).
    """
    n_row_blocks = -(-g.length // block)
    if override is not None:
        nblk, bi, warps = override[:3]
        if g.inner == 1:
            return TilePlan(False, nblk, 1, warps, -(-(g.outer * n_row_blocks) // nblk))
        return TilePlan(True, nblk, bi, warps, g.outer * -(-n_row_blocks // nblk) * -(-g.inner // bi),
                        bool(override[3]) if len(override) > 3 else False)
    table = (tiles or DEFAULT_TILES).get(2 if elem_size <= 2 else 4)
    if g.inner == 1:
        elems, warps = ((1 << 16), 4) if interpreted else table["row"]
        nblk = max(1, min(next_pow2(g.outer * n_row_blocks), elems // block_pow2))
        return TilePlan(False, nblk, 1, warps, -(-(g.outer * n_row_blocks) // nblk))
    along, bi, warps = ((1 << 10), 64, 4) if interpreted else table["col"]
    bi = min(bi, next_pow2(g.inner))
    nblk = max(1, min(next_pow2(n_row_blocks), along // block_pow2))
    return TilePlan(True, nblk, bi, warps, g.outer * -(-n_row_blocks // nblk) * -(-g.inner // bi))


def block_segment(x: torch.Tensor, y: torch.Tensor, q, block: int, tiles: dict | None, tile: tuple | None,
                  extra: tuple = ()) -> tuple[int, tuple, dict, int]:
    """One tensor's share of a block-kernel launch: its programs, its positional arguments ``(x, y, *extra,
    n_blocks, n_row_blocks, L, I, cs)``, its tiling constexprs (NBLK, BI, COL, SCALAR, EVEN; the ones a launch
    shares come from ``shared_constants``) and the warps its tile was measured with."""
    g = geometry(x, q.q_dim)
    interp = is_interpreted(x)
    plan = plan_tiles(g, block, next_pow2(block), x.element_size(), interp, override=tile, tiles=tiles)
    n_row_blocks = -(-g.length // block)
    args = (x, y, *extra, g.outer * n_row_blocks, n_row_blocks, g.length, g.inner, 1)
    consts = dict(NBLK=plan.nblk, BI=plan.bi, COL=plan.col, SCALAR=plan.scalar, EVEN=g.length % block == 0)
    return plan.grid, args, consts, plan.num_warps


def shared_constants(*xs: torch.Tensor) -> dict:
    """The constexprs every tensor of a launch shares (one dtype, one device): int64 offsets if any tensor
    needs them, the output dtype, interpreted or compiled."""
    return dict(I64=any(t.numel() >= I64_FROM for t in xs), OUT_KIND=out_kind(xs[0].dtype),
                INTERPRET=is_interpreted(xs[0]))


def launch_block_kernel(kernel, x: torch.Tensor, y: torch.Tensor, q, block: int, tiles: dict | None,
                        tile: tuple | None, extra: tuple = (), constants: dict | None = None) -> None:
    """Launch a block kernel of the shared signature ``(x, y, *extra, n_blocks, n_row_blocks, L, I, cs, NBLK,
    BI, COL, SCALAR, EVEN, I64, OUT_KIND, INTERPRET, **constants)`` on contiguous ``x`` into ``y``, tiled by
    ``plan_tiles``. ``constants``: the format's constexprs (a function of ``q`` and ``block`` alone, which key
    the prepared launch with the shape, dtype and ``tile``)."""

    def prepare():
        grid, args, consts, warps = block_segment(x, y, q, block, tiles, tile, extra)
        return (grid,), args, dict(**consts, **shared_constants(x), **(constants or {}), num_warps=warps,
                                   enable_fp_fusion=False)

    launch(kernel, (q, block, x.shape, x.dtype, tile), (x, y, *extra), prepare)


I64_FROM = 2**31 - 2**24  # offsets of tensors this large are computed in int64 (a margin below 2^31)

# Measured on an H100 (scripts/bench_kernels.py --sweep, docs/benchmarks.md); families override them.
DEFAULT_TILES = {2: {"row": (1024, 4), "col": (32, 128, 4)}, 4: {"row": (1024, 4), "col": (32, 128, 4)}}
