"""Plain-torch reference numerics, one module per format family (``shared/spec/formats.md``).

These functions define the numbers; every fast path (Triton, NPU) must equal them bit for bit.
``reference_quant_dequant`` applies the rules common to every family (§0: dtype handling, axis checks,
empty and 0-dim tensors) and calls the family's function on a float32 tensor (a large one in pieces split
along another axis, which the family's blocks do not cross).

Public: ``reference_quant_dequant``, ``REFERENCE_IMPLS``, ``check_input``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor

from ..qtype import QType
from . import _common
from ._common import saturating_cast, saturating_cast_

__all__ = ["reference_quant_dequant", "REFERENCE_IMPLS", "check_input", "as_qtype"]

# family -> "module:function"; each function maps (float32 tensor, QType) -> exact float32 result.
REFERENCE_IMPLS: dict[str, str] = {
    "mx": "mx:quant_dequant_mx",
    "mx_hier": "mx:quant_dequant_mx_hier",
    "hifx": "hifloat:quant_dequant_hifx",
    "hif8": "hifloat:quant_dequant_hif8",
    "hif4": "hifloat:quant_dequant_hif4",
    "tmx": "tmx:quant_dequant_tmx",
    "nvf4": "nvfp:quant_dequant_nvf4",
    "nvfp4": "nvfp:quant_dequant_nvfp4",
    "nf4": "nf4:quant_dequant_nf4",
    "nf4_double": "nf4:quant_dequant_nf4_double",
    "int8sym": "intq:quant_dequant_int8sym",
}

_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# Block floats whose scale is searched per block rather than read off the block maximum.
SEARCHED_SCALE_IMPL = "fakequant.scale_search:quant_dequant_mse"


def reference_impl(q: QType) -> Callable[[Tensor, QType], Tensor]:
    if q.family == "mx" and q.scale_mode == "mse":
        module, func = SEARCHED_SCALE_IMPL.split(":")
    else:
        module, func = REFERENCE_IMPLS[q.family].split(":")
        module = f"{__name__}.{module}"
    return getattr(importlib.import_module(module), func)


def as_qtype(q: QType | str) -> QType:
    if isinstance(q, QType):
        return q
    if isinstance(q, str):
        return QType(q)
    raise TypeError(f"qtype must be a QType or a format string, got {type(q).__name__}")


def check_input(x: Tensor, q: QType) -> int:
    """Validate ``x`` against ``q`` and return the quantization axis as a non-negative int."""
    if not isinstance(x, Tensor):
        raise TypeError(f"quant_dequant expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"quant_dequant needs a floating tensor (float32, bfloat16, float16, float64), got {x.dtype}"
        )
    rank = max(x.dim(), 1)  # a 0-dim tensor is quantized as one element along a length-1 axis
    if not -rank <= q.q_dim < rank:
        raise ValueError(f"quantization axis dim={q.q_dim} is out of range for a tensor of rank {x.dim()}")
    return q.q_dim % rank


# On CPU, large tensors are quantized in pieces of about PIECE_ELEMENTS elements, split along an axis other
# than the quantization axis. A piece holds whole blocks (and whole int8sym slices), so it is quantized exactly
# as in the whole tensor; and every temporary of the family's code is then small enough for the allocator to
# reuse and for the cache to hold. Full-size temporaries are mapped afresh from the OS on every call, page by
# page: that, not arithmetic, was the reference's largest cost on CPU. (GPU allocators cache memory, and there
# fewer, larger launches are better.) nvfp4's per-tensor scale depends on the whole tensor (its code goes
# through the blocks in pieces itself).
_WHOLE_TENSOR_FAMILIES = ("nvfp4",)


def reference_quant_dequant(x: Tensor, q: QType | str) -> Tensor:
    """Fake-quantize ``x`` with ``q`` using the plain-torch reference; same shape and dtype out."""
    q = as_qtype(q)
    dim = check_input(x, q)
    if x.numel() == 0:
        return x.clone()
    if q.family == "cast":
        return x.to(_CAST_DTYPES[q.name]).to(x.dtype)  # plain IEEE casts (formats.md §10)
    shape = x.shape
    x = x.reshape(1) if x.dim() == 0 else x  # a 0-dim tensor is one element along a length-1 axis
    impl, q = reference_impl(q), q.dim(dim)
    # Only hif8 with saturate=False means to return ±inf; every other family's result can be clamped in place.
    cast = saturating_cast if q.family == "hif8" and not q.saturating else saturating_cast_
    # The input is converted to float32 (exact for fp16/bf16; fp64 is rounded to fp32 first, formats.md §0),
    # quantized, and cast back. The result is contiguous (not a view into the padded, axis-moved buffer): GEMM
    # and attention kernels pick their path by stride, and a view would keep the padding alive.
    axis = _piece_axis(x, q)
    if axis is None:
        return cast(impl(x.to(torch.float32), q), x.dtype).reshape(shape).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = max(1, _common.PIECE_ELEMENTS * x.shape[axis] // x.numel())
    for x_piece, out_piece in zip(x.split(rows, axis), out.split(rows, axis)):
        out_piece.copy_(cast(impl(x_piece.to(torch.float32), q), x.dtype))
    return out


def _piece_axis(x: Tensor, q: QType) -> int | None:
    """The axis along which ``reference_quant_dequant`` splits ``x`` (the longest one other than the
    quantization axis), or None to quantize it whole: small tensors, tensors not on the CPU, nvfp4, searched
    (``mse``) scales (their own code path), and tensors with no other axis."""
    if x.numel() <= _common.PIECE_ELEMENTS or x.device.type != "cpu":
        return None
    if q.family in _WHOLE_TENSOR_FAMILIES or q.scale_mode == "mse":
        return None
    others = [d for d in range(x.dim()) if d != q.q_dim % x.dim() and x.shape[d] > 1]
    return max(others, key=lambda d: x.shape[d]) if others else None
