"""fakequant: training-time fake quantization for PyTorch.

Quantize-then-dequantize in higher precision, with straight-through gradients, for MXFP8/6/4, HiF8, HiF4,
NVFP4, NF4 and any custom ``e<E>m<M>k<K>b<B>`` block format. Start with ``QType`` and ``quant_dequant``.
"""

from .dispatch import quant_dequant
from .qtype import QType

__version__ = "0.1.0"

__all__ = ["QType", "quant_dequant", "__version__"]
