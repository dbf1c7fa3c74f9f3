"""NVFP4 on Triton: ``nvf4`` (E4M3 block scale only) and ``nvfp4`` (TransformerEngine's two-level recipe
with a per-tensor fp32 scale), ``shared/spec/formats.md`` §8, bit-exact with ``fakequant.formats.nvfp``.

One program holds whole 16-blocks as a ``[NBLK, 16]`` tile (axis -1) or ``[NBLK, 16, BI]`` (other axes).
``nvfp4`` needs the tensor's finite absolute maximum A before any block can be scaled, so it is two passes:
a flat max-reduction (one int32 atomic max per program on the bits), then the block kernel, which walks the
tensor in reverse order so that it starts on what the reduction read last (still in L2).

Every ``fl32(.)`` of the spec is one IEEE float32 operation in the written order; divisions are
``tl.div_rn`` (correctly rounded). nvfp4's final ``fl32(q * S / g)`` is computed per block for the two
significands of E2M1 (1 and 1.5) and scaled by q's power of two, which is exact while the quotients stay
normal; a tile holding a block where they might not (tiny or huge blocks) divides each element instead.

Order as in the Triton tutorials: per-tile math, kernels, launchers.
Public: ``quant_dequant_nvf4``, ``quant_dequant_nvfp4``, ``tensor_amax``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...qtype import QType
from ._common import (
    FLT_MAX, I64_FROM, bits_of, cast_out, check_input, col_tile, copysign_plus, float_of, is_interpreted, launch,
    launch_block_kernel, load_f32, max_all, max_keep, out_kind, round_to_int, row_tile,
)

__all__ = ["quant_dequant_nvf4", "quant_dequant_nvfp4", "tensor_amax"]

ONE_SIXTH_F32 = tl.constexpr(0.1666666716337204)  # fl32(1/6)


# --------------------------------------------------------------------------------------------- tile math
@triton.jit
def _e4m3(v):
    """E4M3(v) for v >= 0 (NaN propagates): min(grid(min(v, 448); 3, -6) ties to even, 448)."""
    v = tl.minimum(v, 448.0, propagate_nan=tl.PropagateNan.ALL)
    binade = tl.maximum(bits_of(v) & 0x7F800000, 121 << 23)  # 2^p, p = max(E(v), -6)
    t = v * float_of((130 << 23) + ((127 << 23) - binade))  # v * 2^(3-p), exact, < 16
    r = round_to_int(t, 1, False)
    return tl.minimum(r * float_of(binade - (3 << 23)), 448.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e2m1(y):
    """E2M1 of y >= 0, ties to even, saturating at 6: fl32(y + C) - C with C = 2^22, 2^23, 2^24 (ulp 0.5, 1,
    2) on [0, 2), [2, 4), [4, 6]."""
    y = tl.minimum(y, 6.0, propagate_nan=tl.PropagateNan.ALL)
    c = tl.where(y < 2.0, 4194304.0, tl.where(y < 4.0, 8388608.0, 16777216.0))
    return (y + c) - c


@triton.jit
def _nvf4_tile(x):
    """nvf4 (formats.md §8): S = E4M3(fl32(amax / 6)); q = E2M1(fl32(|x| / S)); result ±q * S (exact);
    S = 0 gives zeros, a block with NaN/inf is NaN."""
    ab = bits_of(x) & 0x7FFFFFFF
    amax_b = max_keep(ab, 1)
    finite = amax_b < 0x7F800000
    s = _e4m3(tl.div_rn(float_of(tl.where(finite, amax_b, 0)), 6.0))
    s_div = tl.where(s > 0, s, 1.0)
    s_mul = tl.where(finite, s, float("nan"))
    mag = _e2m1(tl.div_rn(float_of(ab), s_div)) * s_mul
    return copysign_plus(mag, x)  # a float negation compiles to 0 - mag, which loses -0


@triton.jit
def _nvfp4_tile(x, a_bits):
    """nvfp4 (formats.md §8), TransformerEngine's order: g = min(fl32(2688 / A), FLT_MAX);
    S = E4M3(min(fl32(amax * fl32(g * fl32(1/6))), FLT_MAX)); enc = min(fl32(1 / fl32(S * fl32(1/g))), FLT_MAX);
    q = E2M1(min(fl32(|x| * enc), 6)); result ±fl32(q * S / g). ``a_bits``: the bits of A."""
    ab = bits_of(x) & 0x7FFFFFFF
    amax_b = max_keep(ab, 1)
    finite = amax_b < 0x7F800000
    g = tl.minimum(tl.div_rn(2688.0, float_of(a_bits)), FLT_MAX)  # A = 0: 2688 / 0 = inf -> FLT_MAX
    inv_g = tl.div_rn(1.0, g)
    s = _e4m3(tl.minimum(float_of(tl.where(finite, amax_b, 0)) * (g * ONE_SIXTH_F32), FLT_MAX))
    enc = tl.minimum(tl.div_rn(1.0, s * inv_g), FLT_MAX)  # S = 0: 1 / 0 = inf -> FLT_MAX
    q = _e2m1(float_of(ab) * enc)
    # fl32(q * S / g) with q = m * 2^k, m in {1, 1.5}: 2^k * fl32(m * S / g) while m * S / g * 2^k stays normal
    u1 = tl.div_rn(s, g)
    u15 = tl.div_rn(s * 1.5, g)
    m15 = ((bits_of(q) >> 22) & 1) != 0
    mag = tl.where(m15, u15, u1) * float_of(bits_of(q) & 0x7F800000)
    risky = (s > 0) & ((u1 < 2.350988701644575e-38) | (u15 >= 4.253529586511731e37))  # 2^-125, 2^125
    if max_all(risky.to(tl.int32)) > 0:
        mag = tl.div_rn(q * s, g)
    mag = tl.where(finite, mag, float("nan"))
    return copysign_plus(mag, x)  # a float negation compiles to 0 - mag, which loses -0


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _finite_amax_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, I64: tl.constexpr, IN_KIND: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """out[0] = max(out[0], bits of max |x| over the finite elements of this program's chunk)."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ab = bits_of(load_f32(x_ptr + offs, mask, IN_KIND, INTERPRET)) & 0x7FFFFFFF
    m = max_all(tl.where(ab < 0x7F800000, ab, 0))
    tl.atomic_max(out_ptr, m)


@triton.jit(do_not_specialize=["cs"])
def _nvfp_kernel(
    x_ptr, y_ptr, amax_ptr,  # input, output (same dtype, contiguous), nvfp4's tensor maximum (int32 bits)
    n_blocks, n_row_blocks, L, I, cs,  # blocks in all (row mode); 16-blocks per slice; axis length; inner size
    NBLK: tl.constexpr, BI: tl.constexpr, COL: tl.constexpr, SCALAR: tl.constexpr, EVEN: tl.constexpr,
    I64: tl.constexpr,
    TENSOR_SCALE: tl.constexpr, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if TENSOR_SCALE:
        pid = tl.num_programs(0) - 1 - pid  # reverse: start where the amax pass ended
    if COL:
        offs, mask = col_tile(pid, n_row_blocks, L, I, cs, 16, 16, NBLK, BI, SCALAR, I64)
    else:
        offs, mask = row_tile(pid, n_blocks, n_row_blocks, L, 16, 16, NBLK, EVEN, I64)
    x = load_f32(x_ptr + offs, mask, OUT_KIND, INTERPRET)
    if TENSOR_SCALE:
        y = _nvfp4_tile(x, tl.load(amax_ptr))
        # fl32(q * S / g) may round past FLT_MAX (to inf), which then saturates in the output dtype
        tl.store(y_ptr + offs, cast_out(y, OUT_KIND, INTERPRET), mask=mask)
    else:
        # q * S <= 6 * 448: exact and in range for every dtype but float16 (saturated in cast_out)
        tl.store(y_ptr + offs, cast_out(_nvf4_tile(x), OUT_KIND, INTERPRET), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
# Tile per element size (bytes): "row" (elements, warps) along the last axis, "col" (elements along the
# axis, columns, warps) otherwise; the best of scripts/bench_kernels.py --sweep on an H100 (docs/benchmarks.md).
NVF4_TILES = {2: {"row": (512, 2), "col": (16, 128, 2)}, 4: {"row": (512, 2), "col": (16, 256, 8)}}
NVFP4_TILES = {2: {"row": (1024, 2), "col": (16, 512, 4)}, 4: {"row": (1024, 4), "col": (16, 512, 4)}}


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """int32 bits of max |x| over the finite elements of contiguous ``x`` (0 when there are none), as a
    1-element tensor on x's device (no host synchronisation)."""
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = x.numel()

    def prepare():
        interp = is_interpreted(x)
        block = (1 << 16) if interp else 8192
        kwargs = {"BLOCK": block, "I64": n >= I64_FROM, "IN_KIND": out_kind(x.dtype), "INTERPRET": interp,
                  "num_warps": 8}
        return (triton.cdiv(n, block),), (x, out, n), kwargs

    launch(_finite_amax_kernel, ("amax", x.shape, x.dtype), (x, out), prepare)
    return out


def _launch(x: torch.Tensor, q: QType, tensor_scale: bool, name: str, tile, amax=None) -> torch.Tensor:
    x = check_input(x, q.q_dim, name)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    if not tensor_scale:
        amax = y  # an unused placeholder pointer for nvf4
    elif amax is None:
        amax = tensor_amax(x)
    else:
        amax = _amax_bits(amax, x)
    launch_block_kernel(_nvfp_kernel, x, y, q, 16, NVFP4_TILES if tensor_scale else NVF4_TILES, tile,
                        extra=(amax,), constants={"TENSOR_SCALE": tensor_scale})
    return y


def quant_dequant_nvf4(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """nvf4 of ``x`` along ``q.q_dim`` (formats.md §8)."""
    if q.family != "nvf4":
        raise ValueError(f"quant_dequant_nvf4: expected the nvf4 QType, got {q.desc!r} ({q.family})")
    return _launch(x, q, False, "quant_dequant_nvf4", tile)


def _amax_bits(amax, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(amax, torch.Tensor) or amax.numel() != 1 or amax.dtype != torch.float32:
        raise TypeError("amax must be a one-element float32 tensor (max |x| over the finite elements of x)")
    if amax.device != x.device:
        raise ValueError(f"amax is on {amax.device}, x on {x.device}")
    return amax.reshape(1).view(torch.int32)


def quant_dequant_nvfp4(x: torch.Tensor, q: QType, tile: tuple[int, int, int] | None = None,
                        amax: torch.Tensor | None = None) -> torch.Tensor:
    """nvfp4 of ``x`` along ``q.q_dim`` (formats.md §8): a tensor-maximum pass, then the block kernel.

    ``amax``: the tensor maximum A when the caller already has it (a one-element float32 tensor holding
    max |x| over x's finite elements, e.g. from the op that produced x); the first pass is then skipped and
    the result is the same. A wrong ``amax`` gives wrong numbers: it is not checked.
    """
    if q.family != "nvfp4":
        raise ValueError(f"quant_dequant_nvfp4: expected the nvfp4 QType, got {q.desc!r} ({q.family})")
    return _launch(x, q, True, "quant_dequant_nvfp4", tile, amax)
