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


# ------------------------------------------------------------------ tensor STE and q/k/v (autograd layer)
# microxcaling element names the earlier ``quant_dequant_tensor(x, elem_format=...)`` and
# ``quant_dequant_qkv(q, k, v, elem_format=...)`` took -> the earlier library's own format names.
_ELEM_TO_LEGACY = {"fp8_e4m3": "mxfp8_e4m3", "fp8_e5m2": "mxfp8_e5m2", "fp4_e2m1": "mxfp4_e2m1", "fp4": "mxfp4_e2m1"}

__all__ += ["quant_dequant_tensor", "quant_dequant_qkv"]


def _compat_qtype(fmt: QType | str | None, name: str) -> QType | None:
    """A QType from a QType, a QType string, or one of the earlier names (``mxfp8_e4m3``, ...)."""
    if fmt is None or isinstance(fmt, QType):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"{name} must be a QType, a format string or None, got {type(fmt).__name__}")
    if fmt in _LEGACY_QTYPES:  # the earlier names win over QType parsing (bf16 means the same in both)
        return QType(_LEGACY_QTYPES[fmt])
    try:
        return QType(fmt)
    except ValueError as err:
        raise ValueError(f"{name}={fmt!r} is neither one of {', '.join(_LEGACY_QTYPES)} nor a QType: {err}") from None


def quant_dequant_tensor(
    x: Tensor, forward_qtype: QType | str | None = None, backward_qtype: QType | str | None = None, *,
    elem_format: str | None = None,
) -> Tensor:
    """Fake-quantize ``x`` in ``forward_qtype``; the gradient passes straight through, fake-quantized in
    ``backward_qtype`` when given. Formats are QTypes or QType strings (each quantized along its own axis,
    default the last) or the earlier names ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp4_e2m1``, ``bf16``
    (block 32 along the last axis, floor scale). ``hif8`` here is the elementwise QType; the earlier
    per-tensor scaled HiF8 is ``quant_dequant_tensor_with_backward(x, "hif8")``.

    ``elem_format=`` takes the earlier microxcaling names (``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``) as the
    forward format. Deliberate change: the forward value is exactly Q(x), in x's dtype (the earlier
    ``x + (Q(x) - x)`` could differ from Q(x) in the last bit).
    """
    from .autograd import quant_ste

    if elem_format is not None:
        if forward_qtype is not None:
            raise ValueError("quant_dequant_tensor: give forward_qtype or elem_format, not both")
        if elem_format not in _ELEM_TO_LEGACY:
            raise ValueError(f"elem_format {elem_format!r} is not one of {', '.join(_ELEM_TO_LEGACY)}")
        forward_qtype = _ELEM_TO_LEGACY[elem_format]
    forward_q = _compat_qtype(forward_qtype, "forward_qtype")
    backward_q = _compat_qtype(backward_qtype, "backward_qtype")
    return quant_ste(x, forward_q, backward_q)


def quant_dequant_qkv(
    q: Tensor, k: Tensor, v: Tensor, minus_exp: int | None = None, forward_format: str = "mxfp8_e4m3",
    backward_quantize: bool = True, backward_format: str = "mxfp8_e4m3", *, elem_format: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``quant_dequant_tensor_with_backward`` applied to each of q, k, v (formats.md §11).

    ``elem_format=`` (the earlier microxcaling-style call ``quant_dequant_qkv(q, k, v, elem_format="fp8_e4m3")``)
    sets the forward format and leaves the gradients unquantized, as that version did. Deliberate change:
    the results keep their input dtype (the earlier function cast them to bf16); cast them yourself if the
    attention kernel needs bf16.
    """
    if elem_format is not None:
        if elem_format not in _ELEM_TO_LEGACY:
            raise ValueError(f"elem_format {elem_format!r} is not one of {', '.join(_ELEM_TO_LEGACY)}")
        forward_format, backward_quantize = _ELEM_TO_LEGACY[elem_format], False
    return tuple(
        quant_dequant_tensor_with_backward(t, forward_format, minus_exp, backward_quantize, backward_format)
        for t in (q, k, v)
    )
