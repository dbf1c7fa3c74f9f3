"""The earlier library's tensor-level entry points, with its format names (``spec/formats.md`` §11).

These call ``quant_dequant``; they hold no numerics. The deliberate changes from the earlier library:
MXFP4 uses the OCP block of 32 (not 16), and results keep the input dtype (hif8 used to return bf16).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .dispatch import quant_dequant
from .qtype import QType

__all__ = ["LEGACY_FORMATS", "legacy_quantizer", "quant_dequant_tensor_with_backward"]

# The earlier format names: MX forms use the floor scale (OCP) with blocks of 32 along the last axis.
LEGACY_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp4_e2m1", "hif8", "bf16")
_LEGACY_QTYPES = {
    "mxfp8_e4m3": "e4m3k8b32",
    "mxfp8_e5m2": "e5m2k8b32",
    "mxfp4_e2m1": "e2m1k8b32",
    "bf16": "bf16",
}


def legacy_quantizer(name: str) -> Callable[[Tensor], Tensor]:
    """The fake-quant function behind one of the earlier library's format names."""
    if name == "hif8":
        from .hifp import quant_hif8  # per-tensor scaled HiF8 (formats.md §6)

        return quant_hif8
    if name not in _LEGACY_QTYPES:
        raise ValueError(f"format {name!r} is not one of {', '.join(LEGACY_FORMATS)}")
    qtype = QType(_LEGACY_QTYPES[name])
    return lambda x: quant_dequant(x, qtype)


def _straight_through(x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
    """``x + (Q(x) - x)`` in x's dtype, the earlier library's exact arithmetic (not always equal to Q(x))."""
    return x + (quantize(x) - x)


class _LegacySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, forward_q, backward_q) -> Tensor:
        ctx.backward_q = backward_q
        return _straight_through(x, forward_q)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.backward_q is not None:
            grad = _straight_through(grad, ctx.backward_q)
        return grad, None, None  # forward_q, backward_q: not tensors


def quant_dequant_tensor_with_backward(
    tensor: Tensor,
    forward_format: str,
    minus_exp: int | None = None,
    backward_quantize: bool = False,
    backward_format: str | None = None,
) -> Tensor:
    """Fake-quantize ``tensor`` in ``forward_format``; straight-through gradient, itself fake-quantized in
    ``backward_format`` when ``backward_quantize`` is true (formats.md §11)."""
    if minus_exp is not None:
        raise NotImplementedError(f"minus_exp={minus_exp!r} has no meaning in fakequant yet; pass None")
    forward_q = legacy_quantizer(forward_format)
    backward_q = None
    if backward_quantize and backward_format is not None:
        backward_q = legacy_quantizer(backward_format)
    return _LegacySTE.apply(tensor, forward_q, backward_q)
