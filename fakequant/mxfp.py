"""Compatibility names for users of the MX emulation library and of the earlier fakequant.

``quantize_mx`` has microxcaling's signature and semantics, evaluated exactly (formats.md §1, §2); it
runs on the same engine as the ``e<E>m<M>k<K>b<B>`` QTypes. No numerics live here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .formats._common import saturating_cast
from .formats.mx import ElementFormat, mx_blocks

__all__ = ["quantize_mx", "_quantize_mx", "ELEM_FORMATS", "MX_ROUND_MODES"]

# microxcaling element format name -> (exponent bits, mantissa bits)
ELEM_FORMATS = {
    "fp8_e5m2": (5, 2),
    "fp8_e4m3": (4, 3),
    "fp6_e3m2": (3, 2),
    "fp6_e2m3": (2, 3),
    "fp4_e2m1": (2, 1),
    "fp4": (2, 1),
    "int8": (0, 7),
    "int4": (0, 3),
    "int2": (0, 1),
}
MX_ROUND_MODES = ("nearest", "floor", "even")
SHARED_EXP_METHODS = ("max", "none")


def _normalise_axes(axes: int | Sequence[int] | None, ndim: int) -> list[int]:
    if axes is None:
        return list(range(ndim))
    axes = [axes] if isinstance(axes, int) else list(axes)
    rank = max(ndim, 1)
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"axes must be ints, got {a!r}")
        if not -rank <= a < rank:
            raise ValueError(f"axis {a} is out of range for a tensor of rank {ndim}")
    return sorted({a % rank for a in axes})


def quantize_mx(
    A: Tensor,
    scale_bits: int,
    elem_format: str,
    shared_exp_method: str = "max",
    axes: int | Sequence[int] | None = None,
    block_size: int = 0,
    round: str = "nearest",
    flush_fp32_subnorms: bool = False,
) -> Tensor:
    """microxcaling's ``_quantize_mx`` with exact arithmetic.

    Blocks of ``block_size`` along the single axis in ``axes`` (zero-padded at the end); ``block_size=0``
    shares one exponent over all of ``axes`` (``None``: the whole tensor); ``shared_exp_method="none"``
    gives every element its own exponent. Returns a tensor of ``A``'s shape and dtype.
    """
    if not isinstance(A, Tensor) or not A.is_floating_point():
        got = A.dtype if isinstance(A, Tensor) else type(A).__name__
        raise TypeError(f"quantize_mx needs a floating tensor, got {got}")
    if elem_format not in ELEM_FORMATS:
        raise ValueError(f"elem_format {elem_format!r} is not one of {', '.join(ELEM_FORMATS)}")
    if round not in MX_ROUND_MODES:
        raise ValueError(f"round {round!r} is not one of {', '.join(MX_ROUND_MODES)}")
    if shared_exp_method not in SHARED_EXP_METHODS:
        raise ValueError(f"shared_exp_method {shared_exp_method!r} is not one of {', '.join(SHARED_EXP_METHODS)}")
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or not 1 <= scale_bits <= 8:
        raise ValueError(f"scale_bits={scale_bits!r} must be an int in 1..8")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"block_size={block_size!r} must be an int >= 0 (0 = one block per axis)")
    if A.numel() == 0:
        return A.clone()
    x = A.reshape(1) if A.dim() == 0 else A
    dims = _normalise_axes(axes, A.dim())
    if block_size > 0 and len(dims) != 1:
        raise ValueError(f"block_size={block_size} needs exactly one axis in axes, got {axes!r}")

    # Move the shared axes last and flatten them: [..., L] with L the product of their lengths.
    moved = x.to(torch.float32).movedim(dims, list(range(x.dim() - len(dims), x.dim())))
    kept_shape = moved.shape[: x.dim() - len(dims)]
    flat = moved.reshape(*kept_shape, -1)  # [..., L]
    length = flat.shape[-1]
    if shared_exp_method == "none":
        block = 1
    else:
        block = block_size if block_size > 0 else length
    pad = (-length) % block
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.reshape(*kept_shape, -1, block)  # [..., n_blocks, block]

    out = mx_blocks(
        blocks, ElementFormat(*ELEM_FORMATS[elem_format]), scale_bits, "floor", round,
        flush_subnormal_blocks=flush_fp32_subnorms,
    )
    out = out.reshape(*kept_shape, -1)[..., :length].reshape(moved.shape)
    out = out.movedim(list(range(x.dim() - len(dims), x.dim())), dims)
    return saturating_cast(out, A.dtype).reshape(A.shape)


_quantize_mx = quantize_mx


# --------------------------------------------------------------------- GEMMs (the earlier mxfp module's)
__all__ += ["mxfp_matmul", "mxfp_baddbmm", "mx_gemm_config"]
_MX_GEMM_CONFIGS: dict = {}  # (elem_format, block_size) -> FakeQuantConfig, built once each


def mx_gemm_config(elem_format: str, block_size: int):
    """The ``FakeQuantConfig`` behind ``mxfp_matmul``/``mxfp_baddbmm``: every operand of every GEMM in the
    MX format ``elem_format`` (microxcaling name) with E8M0 scales (floor rule) per ``block_size`` elements."""
    from .config import FakeQuantConfig

    if elem_format not in ELEM_FORMATS:
        raise ValueError(f"elem_format {elem_format!r} is not one of {', '.join(ELEM_FORMATS)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an int >= 1")
    key = (elem_format, block_size)
    if key not in _MX_GEMM_CONFIGS:
        e, m = ELEM_FORMATS[elem_format]
        fmt = f"e{e}m{m}k8b{block_size}"
        _MX_GEMM_CONFIGS[key] = FakeQuantConfig(input=fmt, weight=fmt, grad_output=fmt)
    return _MX_GEMM_CONFIGS[key]


def mxfp_matmul(A: Tensor, B: Tensor, elem_format: str = "fp8_e5m2", block_size: int = 32) -> Tensor:
    """``torch.matmul(A, B)`` with A, B and the gradients in MX ``elem_format``, blocks of ``block_size``.

    Deliberate change from the earlier library: each GEMM's operands are quantized from high precision along
    that GEMM's reduction axis (the earlier backward reused the forward copies and blocked the gradient
    along its last axis, the wrong one for the weight gradient); the result has torch.matmul's dtype
    (autocast included).
    """
    from .autograd import quant_matmul

    return quant_matmul(A, B, mx_gemm_config(elem_format, block_size))


def mxfp_baddbmm(
    input: Tensor, batch1: Tensor, batch2: Tensor, beta: float = 1.0, alpha: float = 1.0,
    elem_format: str = "fp8_e5m2", block_size: int = 32,
) -> Tensor:
    """``torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)`` with batch1, batch2 and the
    gradients in MX ``elem_format``; ``input`` and its gradient stay in high precision. Same deliberate
    change as ``mxfp_matmul``."""
    from .autograd import quant_baddbmm

    return quant_baddbmm(input, batch1, batch2, beta, alpha, mx_gemm_config(elem_format, block_size))
