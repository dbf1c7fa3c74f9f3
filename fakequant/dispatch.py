"""Choose the implementation of ``quant_dequant`` per format family and device.

For now only the plain-torch reference is registered; fast paths (Triton, NPU) register into
``IMPLEMENTATIONS`` with the same signature and must equal the reference bit for bit.
"""

from __future__ import annotations

from torch import Tensor

from .formats import as_qtype, reference_quant_dequant
from .qtype import QType

__all__ = ["quant_dequant", "BACKENDS"]

BACKENDS = ("torch", "triton", "npu")


def quant_dequant(x: Tensor, qtype: QType | str, backend: str | None = None) -> Tensor:
    """Quantize then dequantize ``x`` in format ``qtype`` along ``qtype.q_dim``; same shape and dtype out.

    ``backend=None`` chooses automatically; ``"torch"`` forces the reference.
    """
    q = as_qtype(qtype)
    if backend not in (None, "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)} (or None for automatic)")
        raise RuntimeError(f"backend {backend!r} is not available: no implementation is registered yet")
    return reference_quant_dequant(x, q)
