"""Error metrics between a high-precision tensor and its fake-quantized copy.

Shared by the error report, the numerics monitor and the dump analysis so that every tool reports the same
numbers. Everything is computed in float64 on the host-side reduction only (a few scalars).
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["error_stats", "sqnr_db", "REPORT_FORMATS"]

# One representative per family, plus the MX aliases users ask about first.
REPORT_FORMATS = (
    "mxfp8e4m3", "mxfp8e5m2", "mxfp6e3m2", "mxfp6e2m3", "mxfp4", "e2m1k8b32", "hif8", "hif4", "hifx4_v12",
    "nvf4", "nvfp4", "nf4", "int8sym", "tmx6", "bf16", "fp16",
)


def sqnr_db(reference: Tensor, quantized: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - q)^2); inf when exact."""
    x = reference.double()
    noise = (x - quantized.double()).square().sum().item()
    signal = x.square().sum().item()
    if noise == 0:
        return math.inf
    if signal == 0 or not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def error_stats(reference: Tensor, quantized: Tensor) -> dict[str, float]:
    """MSE, SQNR (dB), max abs error, cosine similarity and the fraction of non-zero inputs flushed to 0."""
    x, q = reference.double().flatten(), quantized.double().flatten()
    diff = x - q
    nonzero = x != 0
    denom = x.norm() * q.norm()
    return {
        "mse": diff.square().mean().item(),
        "sqnr_db": sqnr_db(x, q),
        "max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
        "cosine": (x @ q / denom).item() if denom > 0 else float("nan"),
        "flushed_frac": ((q == 0) & nonzero).sum().item() / max(int(nonzero.sum()), 1),
    }
