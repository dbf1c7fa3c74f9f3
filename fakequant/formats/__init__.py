"""Plain-torch reference numerics, one module per format family (``shared/spec/formats.md``).

These functions define the numbers; every fast path (Triton, NPU) must equal them bit for bit.
``reference_quant_dequant`` applies the rules common to every family (§0: dtype handling, axis checks,
empty and 0-dim tensors) and calls the family's function on a float32 tensor.

Public: ``reference_quant_dequant``, ``REFERENCE_IMPLS``, ``check_input``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor

from ..qtype import QType
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


def reference_quant_dequant(x: Tensor, q: QType | str) -> Tensor:
    """Fake-quantize ``x`` with ``q`` using the plain-torch reference; same shape and dtype out."""
    q = as_qtype(q)
    dim = check_input(x, q)
    if x.numel() == 0:
        return x.clone()
    if q.family == "cast":
        return x.to(_CAST_DTYPES[q.name]).to(x.dtype)  # plain IEEE casts (formats.md §10)
    x32 = x.reshape(1) if x.dim() == 0 else x
    x32 = x32.to(torch.float32)  # exact for fp16/bf16; fp64 is rounded to fp32 first (formats.md §0)
    out = reference_impl(q)(x32, q.dim(dim))
    # A contiguous result (not a view into the padded, axis-moved buffer): GEMM and attention kernels pick
    # their path by stride, and a view would keep the padding alive.
    # Only hif8 with saturate=False means to return ±inf; every other family's result can be clamped in place.
    cast = saturating_cast if q.family == "hif8" and not q.saturating else saturating_cast_
    return cast(out, x.dtype).reshape(x.shape).contiguous()
